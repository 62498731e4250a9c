"""Profile (GPU): where the host time of one bench model training step goes, per implementation.

The model suite is host-bound (wall time far above GPU kernel time), so the question is which ops the host spends
its time issuing. Builds the bench's quick model case (1B Llama, 2×1024, LoRA r16 on all projections, dropout 0.05,
bf16 autocast, AdamW), warms up, then profiles a few steps with torch.profiler and prints, per implementation, the
step's wall time, the ops by self CPU time and how many ops and kernel launches one step issues.
    python3 scripts/profile_model_step.py [--qlora | --consumer] [base peft peft_fast]
--qlora profiles the bench's QLoRA model case instead (NF4 base, bitsandbytes needed); --consumer the 7B-shaped
QLoRA case (NF4 + double quantization, checkpointing, 1×2048; peft and peft_fast), which is GPU-bound: its table
is sorted by GPU kernel time instead.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from peft_fast.benchmark.cases import LLAMA_1B, ModelTrainCase, QLoraTrainCase
from peft_fast.benchmark.consumer import ConsumerQLoraCase

STEPS = 3


def main(names, qlora=False, consumer=False):
    device = torch.device("cuda")
    case = ConsumerQLoraCase() if consumer else (QLoraTrainCase if qlora else ModelTrainCase)(LLAMA_1B, 2, 1024)
    case.prepare(device, torch.bfloat16)
    for name in names:
        impl = case.build(name)
        for i in range(3):
            impl.step(i % case.n_inputs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(STEPS):
            impl.step(i % case.n_inputs)
        host = (time.perf_counter() - t0) / STEPS * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / STEPS * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(STEPS):
                impl.step(i % case.n_inputs)
            torch.cuda.synchronize()
        events = prof.key_averages()
        cpu_ops = [e for e in events if e.key.startswith("aten::")]
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
        print(f"\n=== {name}: step {wall:.1f} ms wall, host returns after {host:.1f} ms; per step "
              f"{sum(e.count for e in cpu_ops) / STEPS:.0f} aten ops, {launches / STEPS:.0f} kernel launches")
        sort = "self_cuda_time_total" if consumer else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))
        del impl
        torch.cuda.empty_cache()


if __name__ == "__main__":
    args = sys.argv[1:]
    qlora, consumer = "--qlora" in args, "--consumer" in args
    names = [a for a in args if not a.startswith("--")]
    main(names or (["peft", "peft_fast"] if consumer else ["base", "peft", "peft_fast"]), qlora, consumer)
