"""`peft-fast` command line: `peft-fast finetune` runs a short LoRA fine-tune of a tiny Llama built from a config.

It needs no downloads: the model has random weights and the data is a fixed synthetic sequence task (each
sequence counts up modulo the vocabulary), which a LoRA adapter learns within a few dozen steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _finetune(args: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_fast as peft

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).to(device)
    lora = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.print_trainable_parameters()

    def batch(n: int) -> torch.Tensor:
        start = torch.randint(0, config.vocab_size, (n, 1), device=device)
        return (start + torch.arange(args.seq_len, device=device)) % config.vocab_size

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = batch(args.batch_size)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s on {device}")
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    print(f"adapter saved to {os.path.abspath(args.out)}: {sorted(os.listdir(args.out))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    ft = sub.add_parser("finetune", help="short LoRA fine-tune of a tiny Llama built from a config (no downloads)")
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--seq-len", type=int, default=32)
    ft.add_argument("--r", type=int, default=8)
    ft.add_argument("--lr", type=float, default=3e-3)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ft.add_argument("--out", default="peft_fast_out/adapter")
    args = parser.parse_args(argv)
    if args.command in (None, "finetune"):
        if args.command is None:
            args = ft.parse_args([])
        return _finetune(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
