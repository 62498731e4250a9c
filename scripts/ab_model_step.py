"""A/B timing (GPU) of the bench's model training step, implementations interleaved step by step, so that the lent
machines' noisy host (the same step's wall time moved 2× within one call, 2026-12-02) slows every one alike.
    python3 scripts/ab_model_step.py [--qlora] [ROUNDS]        prints per implementation median / min ms and tok/s
"""

import statistics
import sys
import time

import torch

from peft_fast.benchmark.cases import LLAMA_1B, ModelTrainCase, QLoraTrainCase

NAMES = ("peft", "peft_fast")


def main(qlora: bool, rounds: int) -> None:
    device = torch.device("cuda")
    case = (QLoraTrainCase if qlora else ModelTrainCase)(LLAMA_1B, 2, 1024)
    case.prepare(device, torch.bfloat16)
    impls = {name: case.build(name) for name in NAMES}
    for impl in impls.values():
        for i in range(3):
            impl.step(i % case.n_inputs)
    times = {name: [] for name in NAMES}
    for r in range(rounds):
        for name in NAMES if r % 2 == 0 else reversed(NAMES):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            impls[name].step(r % case.n_inputs)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    tokens = case.batch * case.seq
    print(f"{'qlora' if qlora else 'lora'} 1B step, {rounds} interleaved rounds:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:10s} median {med:7.1f} ms  min {min(ts):7.1f} ms  {tokens / med:7.0f} tok/s")
    ratio = statistics.median(a / b for a, b in zip(times["peft"], times["peft_fast"]))
    print(f"  median per-round PEFT / peft_fast: {ratio:.3f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main("--qlora" in args, int(next((a for a in args if a.isdigit()), "20")))
