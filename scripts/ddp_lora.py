"""LoRA training under torch DDP with peft_fast, as a user runs it: no launcher of peft_fast's own.

    torchrun --nproc_per_node=2 scripts/ddp_lora.py --out ddp_out                      # GPUs, NCCL
    torchrun --nproc_per_node=2 scripts/ddp_lora.py --device cpu --backend gloo --out ddp_out   # CPUs
    torchrun --nproc_per_node=2 scripts/ddp_lora.py --fsdp --out fsdp_out                 # FSDP2 (fully_shard)

Every rank builds the same Llama-shaped model from a config (random weights, same seed: no download), wraps
`get_peft_model(...)` in DistributedDataParallel and trains on its shard of each global batch; gradients are averaged
across ranks, so N ranks with global batch B compute what one process computes with batch B. Rank 0 writes
`losses.json` (the global mean loss per step; with --fsdp also whether the saved adapter loads back into a fresh
sharded model whole) and the adapter (`save_pretrained(is_main_process=rank == 0)`); with
--nproc_per_node=1 the same script is the one-process reference (tests/test_ddp.py compares the two).
--fail-rank R makes rank R raise at step 1, to check that the other ranks do not hang.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_fast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    lora = peft_fast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                init_lora_weights=False, task_type="CAUSAL_LM")
    return peft_fast.get_peft_model(model, lora)


def shard(model) -> None:
    """FSDP2: each decoder layer and the whole model fully_shard-ed."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def reload_matches(args, device) -> bool:
    """Whether the saved adapter, loaded into a fresh sharded model, comes back whole and equal (every rank)."""
    from safetensors.torch import load_file

    import peft_fast

    fresh = build_model(args).to(device)
    shard(fresh)
    saved = load_file(os.path.join(args.out, "adapter", "adapter_model.safetensors"))
    peft_fast.set_peft_model_state_dict(fresh, saved)
    back = peft_fast.get_peft_model_state_dict(fresh)
    return sorted(back) == sorted(saved) and all(torch.equal(back[k].cpu(), saved[k]) for k in saved)


def global_batches(args):
    """The same global batches on every rank (token ids from one seeded generator)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, args.vocab, (args.global_batch, args.seq), generator=g) for _ in range(args.steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default=None, help="nccl (default on cuda) or gloo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard each decoder layer and the model) "
                        "instead of DDP")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (non-reentrant)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="torch.compile each decoder layer with this backend (inductor, aot_eager, eager)")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()

    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of the {world} ranks")
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(args).to(device)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:  # regional compilation, as the bench does: one graph serves every decoder layer
        for layer in model.base_model.model.model.layers:
            layer.compile(backend=args.compile)
    if args.fsdp:  # parameters become DTensor shards; save_pretrained gathers the adapter's whole tensors
        shard(model)
        ddp = model
    else:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    per_rank = args.global_batch // world
    losses = []
    try:
        for step, batch in enumerate(global_batches(args)):
            if step == 1 and args.fail_rank == rank:
                raise RuntimeError(f"deliberate failure on rank {rank} (--fail-rank)")
            ids = batch[rank * per_rank:(rank + 1) * per_rank].to(device)
            loss = ddp(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        model.save_pretrained(os.path.join(args.out, "adapter"), is_main_process=rank == 0)
        dist.barrier()  # the adapter files are written
        reloaded = reload_matches(args, device) if args.fsdp else None
        if rank == 0:
            with open(os.path.join(args.out, "losses.json"), "w") as f:
                json.dump({"world_size": world, "losses": losses, "fsdp_reload_matches": reloaded}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every file is written and closed, and every rank is past the last barrier: leave without running destructors.
    # Tearing gloo down at interpreter exit has aborted a rank ("terminate called without an active exception": a
    # clean-clone CI run of tests/test_ddp.py's fsdp2 case, 2026-12-08, after it ran 8 of 8 by hand) and hung one
    # (tests/ddp_trainer_child.py says how).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
