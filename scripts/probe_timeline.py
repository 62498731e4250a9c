"""Where a bench layer step's wall time goes beyond its GPU time: one step of each implementation under
torch.profiler (host and GPU on one clock), timed as the bench times it (the GPU idle before the step, a sync
after). Prints per implementation: wall (first host op → last GPU work), GPU busy, the latency before the first GPU
work, and each GPU idle gap inside the step with the host ops that ran while the GPU waited; then the host ops of
peft_fast's step with their host µs. Usage: probe_timeline.py [case …] with case = [q]M,K,N,p[,fwd] (q: the QLoRA
layer case, bitsandbytes needed; default: the bench's layer cases). Chrome traces go to $OUT/timeline_*.json."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import torch

from peft_fast.benchmark.cases import LayerCase, QLoraLayerCase

GAP_US = 4.0  # GPU idle shorter than this is launch granularity, not a wait
GPU_CATS = ("kernel", "gpu_memset", "gpu_memcpy")


def step_events(trace: dict, label: str) -> tuple[list, list, list, tuple]:
    """(host ops, runtime calls, GPU work) of the step the `label` annotation spans, and that span."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    span = next(e for e in events if e.get("name") == label and e.get("cat") in ("user_annotation", "cpu_op"))
    t0, t1 = span["ts"], span["ts"] + span["dur"]
    host = [e for e in events if e.get("cat") == "cpu_op" and t0 <= e["ts"] <= t1]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and t0 <= e["ts"] <= t1]
    ids = {e["args"].get("correlation") for e in runtime}
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and e["args"].get("correlation") in ids),
                 key=lambda e: e["ts"])
    return host, runtime, gpu, (t0, t1)


def report(name: str, trace: dict, label: str, show_host: bool) -> None:
    host, runtime, gpu, (t0, t1) = step_events(trace, label)
    if not gpu:
        print(f"{name}: no GPU work in the step")
        return
    end = max(e["ts"] + e["dur"] for e in gpu)
    busy = sum(e["dur"] for e in gpu)
    launch_of = {e["args"].get("correlation"): e for e in runtime}
    print(f"\n## {name}: wall {end - t0:.1f} µs (host step {t1 - t0:.1f}), GPU busy {busy:.1f}, "
          f"{len(gpu)} GPU items, first GPU work at +{gpu[0]['ts'] - t0:.1f}")
    prev_end = gpu[0]["ts"]
    for e in gpu:
        gap = e["ts"] - prev_end
        if gap > GAP_US:
            launch = launch_of.get(e["args"].get("correlation"))
            waits = [h["name"] for h in host if prev_end <= h["ts"] < (launch["ts"] if launch else e["ts"])]
            print(f"  idle {gap:7.1f} µs at +{prev_end - t0:8.1f} before {e['name'][:60]!r} "
                  f"(launched at +{(launch['ts'] - t0) if launch else float('nan'):.1f}); host then: "
                  f"{', '.join(dict.fromkeys(waits))[:300]}")
        prev_end = max(prev_end, e["ts"] + e["dur"])
    print("  GPU items: " + "; ".join(f"{e['name'][:40]} {e['dur']:.1f}" for e in gpu)[:1500])
    if show_host:
        top = sorted((h for h in host), key=lambda h: h["ts"])
        print("  host ops (start +µs, µs): " + "; ".join(f"{h['name']} +{h['ts'] - t0:.0f} {h['dur']:.0f}"
                                                       for h in top if h["dur"] >= 3)[:3000])


def profile_case(case: LayerCase, names, out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.cuda.is_available()  # (on a CPU only the trace parsing is exercised)
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    case.prepare(device, dtype)
    print(f"\n# {case.id}")
    for name in names:
        impl = case.build(name)
        if impl is None:
            continue
        for i in range(8):  # warm-up: compiling, the route's registration, the allocator's pools
            impl.step(i % case.n_inputs)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for i in range(3):
                with record_function(f"step{i}"):
                    impl.step(i % case.n_inputs)
                sync()
        # (file names of letters, digits, '.', '_' and '-' only: the device returns no others)
        path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9._-]+", "_", f"timeline_{case.id}_{name}") + ".json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        report(name, trace, "step2", show_host=name == "peft_fast")
        del impl
        if cuda:
            torch.cuda.empty_cache()
    case.release()


def parse(arg: str) -> LayerCase:
    kind = QLoraLayerCase if arg.startswith("q") else LayerCase
    parts = arg.lstrip("q").split(",")
    m, k, n = (int(v) for v in parts[:3])
    p = float(parts[3]) if len(parts) > 3 else 0.0
    backward = not (len(parts) > 4 and parts[4] == "fwd")
    return kind(m, k, n, 16, p, backward) if kind is LayerCase else kind(m, k, n, 16, p, backward, triton_row=False)


def main() -> None:
    cases = [parse(a) for a in sys.argv[1:]] or [LayerCase(8192, 4096, 4096, 16, 0.0, True),
                                                LayerCase(8192, 4096, 4096, 16, 0.1, True),
                                                LayerCase(16, 4096, 4096, 16, 0.0, False)]
    out_dir = os.environ.get("OUT") or tempfile.mkdtemp()
    os.makedirs(out_dir, exist_ok=True)
    for case in cases:
        profile_case(case, ("base", "peft", "peft_fast"), out_dir)


if __name__ == "__main__":
    main()
