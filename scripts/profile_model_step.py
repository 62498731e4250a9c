"""Profile (GPU): where the host time of one bench model training step goes, per implementation.

The model suite is host-bound (wall time far above GPU kernel time), so the question is which ops the host spends
its time issuing. Builds the bench's quick model case (1B Llama, 2×1024, LoRA r16 on all projections, dropout 0.05,
bf16 autocast, AdamW), warms up, then profiles a few steps with torch.profiler and prints, per implementation, the
step's wall time, the ops by self CPU time and how many ops and kernel launches one step issues.
    python3 scripts/profile_model_step.py [--qlora | --consumer] [base peft peft_fast]
--qlora profiles the bench's QLoRA model case instead (NF4 base, bitsandbytes needed); --consumer the 7B-shaped
QLoRA case (NF4 + double quantization, checkpointing, 1×2048; peft and peft_fast), which is GPU-bound: its table
is sorted by GPU kernel time instead. --phases, instead of the op tables: per implementation the device→host syncs a
step makes (where in Python they come from) and, per phase (forward, backward, optimizer), the host's issue time
after a synchronize against the GPU's time for that phase (CUDA events): which phase the host bounds.
"""

import statistics
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from peft_fast.benchmark.cases import LLAMA_1B, ModelTrainCase, QLoraTrainCase
from peft_fast.benchmark.consumer import ConsumerQLoraCase

STEPS = 3


def prepared_case(qlora=False, consumer=False):
    """The bench case this script profiles, prepared on the GPU in bf16."""
    case = ConsumerQLoraCase() if consumer else (QLoraTrainCase if qlora else ModelTrainCase)(LLAMA_1B, 2, 1024)
    case.prepare(torch.device("cuda"), torch.bfloat16)
    return case


def warm_impl(case, name):
    """Implementation `name` of the case, after three steps (compiles, cuBLAS handles, the allocator's pools)."""
    impl = case.build(name)
    for i in range(3):
        impl.step(i % case.n_inputs)
    torch.cuda.synchronize()
    return impl


def main(names, qlora=False, consumer=False):
    case = prepared_case(qlora, consumer)
    for name in names:
        impl = warm_impl(case, name)
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


def phases(names, qlora=False):
    case = prepared_case(qlora)
    for name in names:
        impl = warm_impl(case, name)
        model, opt = impl.extra["model"], impl.extra.get("optimizer")
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            impl.step(0)
        torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where = sorted({f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in syncs})
        print(f"\n=== {name}: {len(syncs)} device->host syncs a step; from {where[:8]}", flush=True)
        rows = {"forward": [], "backward": [], "optimizer": [], "step wall": []}
        gpu = {"forward": [], "backward": [], "optimizer": []}
        for i in range(6):
            ids = case.ids[i % case.n_inputs]
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ev[0].record()
            with case._autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            ev[1].record()
            t1 = time.perf_counter()
            loss.backward()
            ev[2].record()
            t2 = time.perf_counter()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            ev[3].record()
            t3 = time.perf_counter()
            torch.cuda.synchronize()
            t4 = time.perf_counter()
            for key, dt in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t0)):
                rows[key].append(dt * 1e3)
            for key, (a, b) in zip(gpu, zip(ev, ev[1:])):
                gpu[key].append(a.elapsed_time(b))
        print("  host issue ms (median of 6, each step after a synchronize) vs GPU ms of the phase (events):")
        for key in gpu:
            print(f"    {key:10s} host {statistics.median(rows[key]):7.2f}   GPU {statistics.median(gpu[key]):7.2f}")
        print(f"    step wall  {statistics.median(rows['step wall']):7.2f} ms", flush=True)
        del impl, model, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    args = sys.argv[1:]
    qlora, consumer = "--qlora" in args, "--consumer" in args
    names = [a for a in args if not a.startswith("--")]
    if "--phases" in args:
        phases(names or ["base", "peft", "peft_fast"], qlora)
        sys.exit(0)
    main(names or (["peft", "peft_fast"] if consumer else ["base", "peft", "peft_fast"]), qlora, consumer)
