"""Child of tests/test_ddp.py, launched with torchrun: transformers' Trainer trains a peft_fast LoRA model on the CPU
under DDP (one process per rank, gloo) and checkpoints it. argv: output folder."""

import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peft_fast


def main(out: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = peft_fast.get_peft_model(LlamaForCausalLM(config), peft_fast.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        ids = torch.randint(0, 128, (16,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=4, save_strategy="steps",
                             save_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_steps=1, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    trainer.save_model(out + "/final")
    # Both ranks wait for each other, then leave without running destructors. Trainer leaves the process group up, and
    # tearing it down has gone wrong two ways here: a rank that exited with gloo's threads still running aborted
    # ("terminate called without an active exception", seen once in CI), and after destroy_process_group a rank
    # hung for good at interpreter exit, the DDP reducer dropping the group's last reference with the GIL held while
    # gloo's worker thread waited for the GIL to free a finished barrier's tensors (torch's ~ProcessGroupGloo joining
    # that thread; gdb, 2026-12-07). The files are written and closed by now.
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
