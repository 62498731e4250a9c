"""Timing and memory measurement: CUDA events on a GPU, perf_counter on the CPU; medians after warm-up."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def time_fn(fn: Callable[[int], None], device: torch.device, n_inputs: int, warmup: int = 3, repeats: int = 20,
            min_time_s: float = 0.0) -> Timing:
    """Median time of `fn(i)`, rotating i over n_inputs input sets (so a GPU's L2 cannot serve repeats).

    GPU: one CUDA-event pair per call, after `warmup` calls (and at least 25 ms of warm-up). CPU: perf_counter per
    call; on both, at least `repeats` samples and at least `min_time_s` of measuring.
    """
    cuda = device.type == "cuda"
    i = 0
    t_end = time.perf_counter() + (0.025 if cuda else 0.0)
    for _ in range(warmup):
        fn(i % n_inputs)
        i += 1
    while cuda and time.perf_counter() < t_end:
        fn(i % n_inputs)
        i += 1
        torch.cuda.synchronize(device)
    timing = Timing()
    deadline = time.perf_counter() + min_time_s
    while len(timing.samples_ms) < repeats or time.perf_counter() < deadline:
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % n_inputs)
            stop.record()
            stop.synchronize()
            timing.samples_ms.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn(i % n_inputs)
            timing.samples_ms.append((time.perf_counter() - t0) * 1e3)
        i += 1
        if len(timing.samples_ms) >= 10 * repeats:
            break
    return timing


def time_interleaved(fns: dict[str, Callable[[int], None]], device: torch.device, n_inputs: int, warmup: int = 2,
                     repeats: int = 5) -> dict[str, Timing]:
    """Median wall time of each `fns[name](i)` (perf_counter around a call the device is synchronized before and
    after), timed in rounds that take one sample of every function in turn.

    For host-bound cases (decode): the lent machines' host speed drifts over minutes, so timing one implementation
    after another compares different hosts (the bench's decode rows put merged adapters, the very model of the bare
    base, at 1.29× of it, H100, 2026-12-06; interleaved they came out at 1.00×)."""
    cuda = device.type == "cuda"
    for fn in fns.values():
        for i in range(warmup):
            fn(i % n_inputs)
    timings = {name: Timing() for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(r % n_inputs)
            if cuda:
                torch.cuda.synchronize(device)
            timings[name].samples_ms.append((time.perf_counter() - t0) * 1e3)
    return timings


def kernel_time_ms(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """GPU kernel time of one `fn()` (torch.profiler, all CUDA kernels summed), None on CPU. Beside the wall time
    it shows whether a step is bound by the GPU or by the host issuing the work."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    return sum(e.self_device_time_total for e in events) / 1e3


def peak_memory(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak bytes allocated on a CUDA device while `fn` runs, above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_activation_bytes(forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during `forward()`, not counting the storages of
    the tensors in `exclude` (parameters, and the layer's input, which its caller keeps anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())

