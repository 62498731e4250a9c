"""Run benchmark cases: build each implementation in turn, check it, time it, measure its memory, free it."""

from __future__ import annotations

import gc
import os
import platform
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .cases import COMPILE_VARIANTS, IMPLS, hf_peft, tolerance
from .timing import kernel_time_ms, peak_memory, time_fn, time_interleaved


@dataclass
class ImplResult:
    name: str
    median_ms: Optional[float] = None
    kernel_ms: Optional[float] = None  # GPU kernel time of one step (CUDA only); far below median_ms: host-bound
    samples_ms: list[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    saved_bytes: Optional[int] = None
    rel_err: Optional[float] = None
    ok: Optional[bool] = None  # None: not checked (the bare base)
    check_detail: Optional[str] = None  # what the correctness check measured, when the case says (model cases)
    units_per_s: Optional[float] = None
    fits: Optional[dict] = None  # memory budget (GiB) → whether a step ran within it (cases with memory_budgets)
    error: Optional[str] = None


@dataclass
class CaseResult:
    id: str
    group: str
    params: dict
    tolerance: float
    impls: dict[str, ImplResult] = field(default_factory=dict)
    out_bytes: Optional[int] = None

    @property
    def wrong(self) -> list[str]:
        return [n for n, r in self.impls.items() if r.ok is False or r.error]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def fits_in(step: Callable[[int], None], device: torch.device, gib: float) -> bool:
    """Whether one `step(0)` runs on a card of `gib` GiB: torch's allocator is limited to that size less what this
    process already holds outside it (the CUDA context, cuBLAS workspaces), and an out-of-memory error means no."""
    _free(device)
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    free, total = torch.cuda.mem_get_info(device)
    outside = (total - free) - torch.cuda.memory_reserved(device)  # the context etc., which a real card holds too
    budget = gib * 2**30 - outside
    if budget <= torch.cuda.memory_allocated(device):
        return False
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    try:
        step(0)
        torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        _free(device)


def impl_names(case, device: torch.device) -> tuple[str, ...]:
    """The implementations a case times here: the forced-backend rows ("peft_fast triton") and the compiled ones
    ("peft_fast compile") only on CUDA, where they differ from plain peft_fast (and compiling is quick)."""
    names = getattr(case, "impl_names", IMPLS)
    gpu_only = (" triton",) + tuple(f" {variant}" for variant in COMPILE_VARIANTS)
    return tuple(n for n in names if device.type == "cuda" or not n.endswith(gpu_only))


def run_case(case, device: torch.device, dtype: torch.dtype, repeats: int = 20, min_time_s: float = 0.0,
             on_impl: Optional[Callable[[str], None]] = None) -> CaseResult:
    """Check, time and measure every implementation of `case`; the bare base first, as the ratios' denominator.
    One implementation at a time (built, checked, timed, measured, freed), or, for a case with `interleave = True`
    (host-bound ones), all built and checked first and then timed in interleaved rounds (timing.time_interleaved)."""
    result = CaseResult(case.id, case.group, case.params, tolerance(dtype))
    case.prepare(device, dtype)
    repeats = min(repeats, getattr(case, "max_repeats", repeats))
    interleave = getattr(case, "interleave", False)
    built: dict[str, object] = {}  # name → impl, interleaved cases only: timed together after every check
    try:
        for name in impl_names(case, device):
            if on_impl is not None:
                on_impl(name)
            res = ImplResult(name)
            try:
                impl = case.build(name)
                if impl is None:  # HF PEFT not installed
                    continue
                _check(impl, res, case, result.tolerance)
                result.out_bytes = impl.extra.get("out_bytes", result.out_bytes)
                if res.ok is not False:
                    if impl.extra.get("peak_while_recording"):  # the first steps record the CUDA graphs
                        impl.extra["recording_peak"] = peak_memory(
                            lambda: [impl.step(i % case.n_inputs) for i in range(3)], device)
                    if interleave:
                        built[name] = impl
                    else:
                        timing = time_fn(impl.step, device, case.n_inputs, repeats=repeats, min_time_s=min_time_s)
                        _measure(impl, res, timing, case, device)
                del impl
            except Exception as exc:  # one broken implementation must not hide the others' numbers
                _record_error(res, exc)
            result.impls[name] = res
            if not interleave:
                _free(device)
        if built:
            try:
                timings = time_interleaved({name: impl.step for name, impl in built.items()}, device, case.n_inputs,
                                           repeats=repeats)
                for name, impl in built.items():
                    _measure(impl, result.impls[name], timings[name], case, device)
            except Exception as exc:  # noqa: BLE001 - reported on every implementation timed together
                for name in built:
                    _record_error(result.impls[name], exc)
    finally:
        built.clear()
        case.release()
        _free(device)
    return result


def _check(impl, res: ImplResult, case, tol: float) -> None:
    """Before any timing: a wrong result never gets a time."""
    if impl.check is not None:
        case.check_detail = None
        res.rel_err = impl.check()
        res.ok = bool(res.rel_err < tol)
        res.check_detail = case.check_detail


def _measure(impl, res: ImplResult, timing, case, device: torch.device) -> None:
    """Fill res from a timing of impl and its memory, kernel time and throughput."""
    recording_peak = impl.extra.get("recording_peak")  # (CUDA-graph impls: measured before the timing, in run_case)
    res.samples_ms = [round(t, 5) for t in timing.samples_ms]
    res.median_ms = timing.median_ms
    res.peak_bytes = recording_peak or peak_memory(lambda: impl.step(0), device)
    res.kernel_ms = kernel_time_ms(lambda: impl.step(0), device)
    if impl.saved_bytes is not None:
        res.saved_bytes = impl.saved_bytes()
    if impl.units:
        res.units_per_s = impl.units / (res.median_ms / 1e3)
    if impl.extra.get("memory_budgets") and device.type == "cuda":
        res.fits = {str(gib): fits_in(impl.step, device, gib) for gib in impl.extra["memory_budgets"]}


def _record_error(res: ImplResult, exc: Exception) -> None:
    res.error = f"{type(exc).__name__}: {exc}"
    res.ok = False
    traceback.print_exc()


def settings() -> dict:
    """peft_fast's dispatch settings in effect (read once at import) and the PEFT_FAST_* variables that were set, so
    that a saved run says which routes it timed (e.g. PEFT_FAST_ONE_GEMM_ROWS=off)."""
    from ..ops import dispatch

    return {"cuda_kernels": dispatch.CUDA_KERNELS, "one_gemm_min_rows": dispatch.ONE_GEMM_MIN_ROWS,
            "one_gemm_produce_min_rows": dispatch.ONE_GEMM_PRODUCE_MIN_ROWS,
            "one_gemm_max_rank": dispatch.ONE_GEMM_MAX_RANK, "decode_kernel": dispatch.DECODE_KERNEL,
            "env": {key: value for key, value in sorted(os.environ.items()) if key.startswith("PEFT_FAST_")}}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    import peft_fast

    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft_fast": peft_fast.__version__,
        "peft": getattr(hf_peft(), "__version__", None),
        "cpu_threads": torch.get_num_threads(),
        "settings": settings(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def to_json(results: list[CaseResult]) -> list[dict]:
    return [asdict(r) for r in results]
