"""Probe (GPU): where a LoRA model's decode step spends its host time.

Decode at batch 1 is host-bound (the bench's 1B decode: wall 6× the GPU kernel time), so what a LoRA layer costs
there is the host time to issue it. Prints:
  layers  µs per call of one M=1 no-grad forward, bf16 autocast, 2048→2048, r16 fp32 adapters, over 112 distinct
          layers (the 1B model's count): bare nn.Linear, peft_fast's layer and the pieces of its flat path, HF PEFT;
          then torch.profiler's host time per op of peft_fast's calls.
  model   ms per 16-token generate of the bench's 1B model, base / peft_fast / merged / HF PEFT timed in interleaved
          rounds (host speed drifts on the lent machines, so back-to-back blocks would compare different hosts).
Run on the device with the project installed:  python3 scripts/probe_decode.py [layers model]
"""

import copy
import statistics
import sys
import time

import torch
from torch import nn

import peft_fast
from peft_fast.ops import cuda_lora, dispatch

DT = torch.bfloat16
N_LAYERS = 112


def per_call_us(fn, items, rounds=30):
    """Median over rounds of (time to call fn on every item) / len(items); no sync inside a round."""
    times = []
    for i in range(rounds + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        t1 = time.perf_counter()
        if i >= 5:
            times.append((t1 - t0) / len(items) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def lora_layers(lib, k=2048, r=16):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(k, k, bias=False) for _ in range(N_LAYERS))

    torch.manual_seed(0)
    holder = Holder().to("cuda", DT)
    model = lib.get_peft_model(copy.deepcopy(holder), lib.LoraConfig(r=r, lora_alpha=2 * r,
                                                                      target_modules=["layers." + str(i) for i in
                                                                                      range(N_LAYERS)]))
    model.eval()
    return list(holder.layers), list(model.base_model.model.layers)


def layers_table():
    import peft

    x = torch.randn(1, 1, 2048, device="cuda", dtype=DT)
    bare, pf = lora_layers(peft_fast)
    _, hf = lora_layers(peft)
    with torch.no_grad(), torch.autocast("cuda", dtype=DT):
        args = [cuda_lora.eager_node_args(layer, x) for layer in pf]
        assert all(a is not None for a in args), "the flat path did not take the layers"
        node = cuda_lora.CPP_LORA_LINEAR
        rows = [
            ("bare nn.Linear call", lambda m: m(x), bare),
            ("F.linear (bare weight)", lambda m: torch.nn.functional.linear(x, m.weight), bare),
            ("peft_fast layer call (auto)", lambda m: m(x), pf),
            ("  eager_node_args only", lambda m: cuda_lora.eager_node_args(m, x), pf),
            ("  C++ node only, fused kernels", lambda a: node(*a), args),
            ("  C++ node only, ATen route", lambda a: node(*a[:-1], False), args),
            ("  dispatch.call_node + node", lambda a: dispatch.call_node(node, *a), args),
            ("HF PEFT layer call", lambda m: m(x), hf),
        ]
        print(f"\n=== layers: host µs per call, M=1 K=N=2048 r16, bf16 autocast, no grad, {N_LAYERS} layers")
        for name, fn, items in rows:
            print(f"  {name:34s} {per_call_us(fn, items):8.2f}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                for m in pf:
                    m(x)
        print("\n  peft_fast layer calls (10 × 112), host time per op:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=44))


def model_table(rounds=7):
    import peft

    from peft_fast.benchmark.cases import LLAMA_1B, DecodeCase

    case = DecodeCase(LLAMA_1B, new_tokens=16)
    case.prepare(torch.device("cuda"), DT)
    models = {"base": copy.deepcopy(case.cpu_model).to("cuda")}
    for name, lib in (("peft_fast", peft_fast), ("peft", peft)):
        model = copy.deepcopy(case.cpu_model).to("cuda")
        model = lib.get_peft_model(model, lib.LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
        models[name] = model
    models["peft_fast merged"] = copy.deepcopy(models["peft_fast"]).merge_and_unload()
    steps = {name: case._generate(model) for name, model in models.items()}
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        step(0)
    for _ in range(rounds):
        for name, step in steps.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(0)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["base"])
    print(f"\n=== model: 1B Llama, 16-token generate, b1, bf16 autocast; ms (median of {rounds} interleaved rounds)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:18s} {med:8.1f} ms  {med / base:5.2f}× base   (min {min(ts):.1f})")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["layers", "model"]
    print(torch.__version__, torch.cuda.get_device_name(), "extension:", cuda_lora.CPP_LORA_LINEAR is not None,
          flush=True)
    if "layers" in parts:
        layers_table()
    if "model" in parts:
        model_table()
