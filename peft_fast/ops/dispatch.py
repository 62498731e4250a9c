"""The backend policy: which backend (cuda | triton | torch) runs a LoRA op, in one file.

Each op is a name ("linear_with_lora", "lora_embedding", …). Backends register an implementation per op with a
`supports(*args)` predicate that says whether the backend *can* run the call. Whether auto mode *should* pick it
is this file's rule table, `AUTO_RULES`: per op, the backends auto mode tries in order, each with the condition
(measured on a GPU, see the comments) under which it wins. torch is always the last resort.

Forcing a backend: `PEFT_FAST_BACKEND=torch|triton|cuda|auto` is read once, at import, as the process default;
`use_backend("triton")` overrides it for the current thread inside a `with` block (tests, the benchmark, a
server thread). A forced backend runs every op it implements; an op it does not implement runs on torch; a
forced backend that cannot take a call falls back to torch with one warning naming the reason.

The cuda backend's C++ nodes run the low-rank half of a LoRA linear either on peft_fast's own CUDA kernels
(csrc/lora_kernels.h: bf16/fp16 compute, rank ≤ 128; 3 launches a fwd+bwd beside the cuBLAS GEMMs) or on ATen ops
(about 11–14). `fused_kernels(m, k, n, r)` decides per call: `CUDA_KERNELS` ("auto" | "on" | "off", from
PEFT_FAST_CUDA_KERNELS, read once, default "auto"; `use_cuda_kernels(...)` overrides it inside a `with` block) and,
in auto mode, the rank and size rule measured beside it (FUSED_ANY_SIZE_RANK, FUSED_MAX_WORK).

A predicate's reason is a plain string (the backend would normally run this call but cannot: auto mode warns once,
naming it) or a `Skip` (the call is simply not for this backend, e.g. a CPU tensor for a GPU kernel: no warning).

A kernel call that fails in auto mode (a GPU it was never run on: no bf16 tensor cores, too little shared memory,
a Triton compile error) does not stop the job: the call is run again on torch, and when torch succeeds
the backend is taken off that op for the rest of the process, with one warning naming the error. When torch
fails as well the call itself was bad: torch's exception is raised and nothing is taken off. Running out of GPU memory
is never taken for a kernel failure: it propagates at once, at both levels. Forced backends and
traced calls (torch.compile) are not retried, so a developer sees the kernel's own error. (This covers the op
call itself, i.e. the forward; an error inside a fused backward surfaces from `backward()`.) One level below, the
cuda backend's node retries a call whose fused kernels fail on its ATen route (`call_node`): only the kernels are
then turned off, not the backend. GPUs below sm_80 never take the kernels (`kernels_run_on` warns once per such
GPU; csrc's lora_kernels_support refuses them as well).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "PEFT_FAST_BACKEND"


class Skip(str):
    """A refusal that is normal for the call (no warning in auto mode)."""


# Auto mode's rule table. Each entry: (backend, condition or None). A condition returns None when auto should take
# the backend for this call, else a Skip. Ops that are not listed run on torch in auto mode.
AUTO_RULES: dict[str, tuple[tuple[str, Optional[Callable[..., Optional[str]]]], ...]] = {
    # cuBLAS GEMMs + torch's CUDA kernels in one autograd node (ops/cuda_lora.py). H200 bf16, 2026-12-02: beats
    # HF PEFT and the torch path at every measured size, fwd+bwd and inference (bench/RESULTS.md).
    "linear_with_lora": (("cuda", None),),
    # The Triton 4-bit kernels are bit-identical to the torch reference and one pass over the weight.
    "dequantize_4bit": (("triton", None),),
    "quantize_4bit": (("triton", None),),
    # bitsandbytes' base output + the LoRA term as one C++ node (ops/cuda_qlora.py; its decode GEMV only when
    # forced). H200, 2026-12-02: 23% fewer ATen calls, 8% fewer launches and 0.5 GB less peak memory than HF PEFT
    # in the bench's QLoRA step.
    "quantized_linear_with_lora": (("cuda", None),),
}


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    supports: Callable[..., Optional[str]]  # returns None when it can run the call, else the reason it cannot


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_warned: set[tuple[str, str, str]] = set()
_FAILED: set[tuple[str, str]] = set()  # (op, backend) pairs that failed at run time where torch did not


def _parse(value: Optional[str]) -> Optional[str]:
    """None for auto, else a backend name; ValueError naming the variable for anything else."""
    value = (value or "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS + ('auto',)}")
    return value


try:
    _DEFAULT: Optional[str] = _parse(os.environ.get(ENV_VAR))
    _DEFAULT_ERROR: Optional[ValueError] = None
except ValueError as err:  # raised at the first dispatch, so that `import peft_fast` itself still works
    _DEFAULT, _DEFAULT_ERROR = None, err

_local = threading.local()

KERNEL_MODES = ("auto", "on", "off")


def _kernel_mode(value) -> str:
    """The kernel mode ("auto", "on" or "off") that a mode name, a bool or PEFT_FAST_CUDA_KERNELS's 1/0 means."""
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = {"1": "on", "0": "off", "true": "on", "false": "off"}.get(str(value).strip().lower(),
                                                                         str(value).strip().lower())
    if mode not in KERNEL_MODES:
        raise ValueError(f"PEFT_FAST_CUDA_KERNELS / use_cuda_kernels: {value!r} is not one of {KERNEL_MODES} (or 1/0)")
    return mode


try:
    CUDA_KERNELS: str = _kernel_mode(os.environ.get("PEFT_FAST_CUDA_KERNELS", "auto"))
except ValueError as err:  # a typo in the variable must not break `import peft_fast`: warn, keep the default
    warnings.warn(f"peft_fast: {err}; using 'auto'")
    CUDA_KERNELS = "auto"


def _rows_setting(value, default: Optional[int] = None, name: str = "PEFT_FAST_ONE_GEMM_ROWS") -> Optional[int]:
    """A row threshold (or rank) from the environment variable `name`: `default` when unset or empty, None for "off",
    else a non-negative int (a bad value warns and counts as unset, so that `import peft_fast` never fails on it)."""
    if value is None or not str(value).strip():
        return default
    if str(value).strip().lower() == "off":
        return None
    try:
        rows = int(str(value).strip())
        if rows < 0:
            raise ValueError
        return rows
    except ValueError:
        warnings.warn(f"peft_fast: {name}={value!r} is not a non-negative integer or 'off'; ignored")
        return default


# The C++ node's one-GEMM route (csrc/lora_autograd.cpp, kernels/lora_gemm_tma.py): from ONE_GEMM_MIN_ROWS rows a
# training forward on a Hopper GPU computes y = x Wᵀ + hs Bᵀ (+ bias) in one Triton GEMM, and its backward
# dx = dy W + drop(gs A) in another; ops/one_gemm.py compiles and registers the kernels on the first
# call of each dtype and weight layout (rank ≤ 16: the ranks measured). PEFT_FAST_ONE_GEMM_ROWS (read once) sets the
# rows, "off" turns it off. H100, bf16, fp32 adapters, 2026-12-07 (bench layer suite, wall × the bare layer, default
# route → one GEMM): M8192 K=N=4096 r16 fwd+bwd p0 1.28× → 1.22×, M8192 K4096 N14336 p0 1.15× → 1.09×; probe, p0.1,
# forward alone on the route: M8192 K=N=4096 1.41× → 1.37×, M2048 K=N=2048 2.12× → 1.30×. dx with dropout on the
# route too, its keep-bit kernel at 128×256 tiles (kernels/lora_gemm_tma.py KEEP_CONFIG): kprobe tma, H100, p 0.1,
# fwd+bwd GPU µs, dx on the default route → on the route: M8192 K=N=4096 984 → 975, M4096 K=N=4096 519 → 506, M2048
# K4096 N11008 620 → 609, M2048 K=N=2048 110.5 → 105.8; M8192 K4096 N14336 3146 → 3199 (wall 3280 → 3088).
ONE_GEMM_MIN_ROWS: Optional[int] = _rows_setting(os.environ.get("PEFT_FAST_ONE_GEMM_ROWS"), 1024)
# … at ranks up to ONE_GEMM_MAX_RANK: PEFT_FAST_ONE_GEMM_MAX_RANK=<rank>|off (read once; unset: 16, the ranks
# measured on the route; at most 64 is taken, the largest rank block its kernels are compiled for). Above rank 16 only
# the kernels that read h are registered: the producing ones spill registers from rank block 32 on (ptxas sm_90a,
# 128×256 tiles: 40 and 172 bytes at rank block 32, 340 and 888 at 64). Auto mode sends r32/r64 calls of the largest
# layers to the ATen route (fused_kernels' size rule), so timing the route there takes PEFT_FAST_CUDA_KERNELS=on too.
ONE_GEMM_MAX_RANK: int = min(_rows_setting(os.environ.get("PEFT_FAST_ONE_GEMM_MAX_RANK"), 16,
                                           "PEFT_FAST_ONE_GEMM_MAX_RANK") or 0, 64)
ONE_GEMM_PRODUCE_MAX_RANK = 16
# … and on it, from ONE_GEMM_PRODUCE_MIN_ROWS rows without dropout, the GEMMs that make the low-rank product themselves
# (h = s·x·Aᵀ in the forward, gs = s·dy·B in dx, from the tiles of the first column blocks, which the row block's other
# tiles wait for at their last MMA step) instead of a shrink kernel reading x or dy once more before each GEMM.
# PEFT_FAST_ONE_GEMM_PRODUCE=<rows>|off (read once). H100, bf16, fp32 adapters, r16, p 0, 2026-12-07 (kprobe tma, wall
# µs fwd+bwd and GPU µs, the route reading the shrink's product → producing it): M8192 K=N=4096 998 → 966 (GPU 973 →
# 899); M8192 K4096 N14336 3278 → 3118 (GPU 3161 → 3040); but M2048 K4096 N11008 690 → 719 (GPU 610 → 638) and M2048
# K=N=2048 GPU 99.5 → 103.6: with few row blocks every first-round tile waits for the producers, which are slower by
# their extra MMA. Bench layer suite, same host: M8192 K=N=4096 fwd+bwd 1.17× → 1.15× the bare layer. Since h is split
# over up to 8 producers a row block (kernels/lora_gemm_tma.py producer_splits; 2026-12-07 14:45 UTC, another H100, GPU
# µs, one producer → split, against reading h): M8192 K=N=4096 914 → 899 (927), M4096 K=N=4096 488 → 473 (480; wall 534
# against 574), M2048 K4096 N11008 619 → 609 (599), M2048 K=N=2048 103 → 98.5 (99.1); M8192 K4096 N14336 2921 → 2951
# (3025). So from 4096 rows; at 2048 reading h still ties or wins.
ONE_GEMM_PRODUCE_MIN_ROWS: Optional[int] = _rows_setting(os.environ.get("PEFT_FAST_ONE_GEMM_PRODUCE"), 4096,
                                                         "PEFT_FAST_ONE_GEMM_PRODUCE")


def _switch_setting(name: str) -> Optional[bool]:
    """An on/off switch from the environment variable `name`: None when unset or empty (the built-in default), True
    for on/1/true, False for off/0/false (anything else warns and counts as unset)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("on", "1", "true", "off", "0", "false"):
        return value in ("on", "1", "true")
    warnings.warn(f"peft_fast: {name}={value!r} is not on or off; ignored")
    return None


# Whether inference calls of at most 16 rows run the one-launch decode kernel (csrc/lora_decode.cu, Hopper) instead of
# cuBLAS's GEMM (qgemv's for 4-bit weights) then the rows kernel: PEFT_FAST_DECODE_KERNEL=on|off sets it for LoRA and
# 4-bit QLoRA layers alike (read once, applied when the extension loads); unset, the extension's defaults: on for LoRA
# layers, off for 4-bit ones (csrc/lora_autograd.cpp `decode_kernel` says why).
DECODE_KERNEL: Optional[bool] = _switch_setting("PEFT_FAST_DECODE_KERNEL")

# Auto mode's rule: the fused kernels at total rank ≤ FUSED_ANY_SIZE_RANK whatever the size, and above it while
# M·(K+N)·r ≤ FUSED_MAX_WORK; the ATen route beyond. H100, bf16, fp32 adapters, 2026-12-06 (scripts/probe_lora_kernels.py
# layer, one process; wall µs per fwd+bwd × the bare layer, kernels vs ATen route vs HF PEFT; GPU kernel time ×):
#   M8192 K=N=4096 r16 p0      1.37× vs 1.65× vs 2.63×   (GPU 1.32× vs 1.27×)
#   same, p0.1                 1.39× vs 1.66× vs 2.72×   (GPU 1.42× vs 1.51×)
#   M8192 K4096 N14336 r16     1.20× vs 1.22× vs 2.16×   (p0.1: 1.27× vs 1.31×)
#   M4096 K=N=2048 r16         2.91× vs 3.80× vs 4.74×;  M2048 K2048 N8192 r16 1.71× vs 2.51× vs 3.28×
#   decode M16 K=N=4096 fwd    180 vs 303 vs 332 µs
#   M8192 K=N=4096 r64 p0      1.54× vs 1.61× wall, but GPU 1.59× vs 1.26×: where the GPU bounds the step (many
#                              layers queued) the ATen route's cuBLAS GEMMs win at high rank and many rows
# (ranks below 16 cost the kernels what rank 16 does: padded). 2^29 keeps high ranks on the kernels where the host
# bounds the step (the 1B model's largest projection at 2×1024 tokens is 2^28.3 at rank 16).
FUSED_ANY_SIZE_RANK = 16
FUSED_MAX_WORK = 1 << 29

# A LoRA Linear4bit layer's flat eager path (ops/cuda_qlora.py eager_qlora_call: the whole layer as one C++ node that
# dequantizes W for a cuBLAS GEMM) from this many rows up; below it bitsandbytes' own small-M kernels, which read the
# packed weight once (bitsandbytes 0.50 itself takes dequantize + GEMM above ~512 rows on sm90 for these sizes).
QLORA_NODE_MIN_ROWS = 512
# … and for an inference call (no graph recorded) of at most this many rows (decode), where the node skips the
# dequantized copy: csrc/qgemv.cu multiplies by the packed weight directly (tensor cores, one read of the 4 bits),
# then the LoRA term is added. K and blocksize must be multiples of 32 (the kernel's chunks), the GPU sm_80+.
# H100, bf16, NF4 + double quantization, 4096→4096 r16, bench qlora suite (wall ms, GPU kernel ms; bare bf16 layer
# 0.037 / 0.009): M16 HF PEFT + bitsandbytes 0.218 (0.048), this route 0.053 (0.025); M1 0.179 (0.020) vs 0.049 (0.021).
# bitsandbytes' own small-M kernel is as fast on the GPU at M1; its Python op layer is what costs.
QLORA_GEMV_MAX_ROWS = 16


def fused_kernels_for(x: torch.Tensor, n: int, r: int) -> bool:
    """fused_kernels for input x (…×K rows) of a layer with N outputs and total rank r."""
    k = x.shape[-1]
    return fused_kernels(x.numel() // max(k, 1), k, n, r) and (not x.is_cuda or kernels_run_on(x.device))


_CAPABLE: dict[int, bool] = {}  # CUDA device index → whether the fused kernels run there


def kernels_run_on(device: torch.device) -> bool:
    """Whether peft_fast's fused CUDA kernels run on this GPU: compute capability 8.0 or newer (bf16 tensor cores;
    csrc/lora_kernels refuses older GPUs as well). A T4 or V100 gets one warning naming it and keeps the cuda
    backend's ATen route."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capable = _CAPABLE.get(index)
    if capable is None:
        major, minor = torch.cuda.get_device_capability(index)
        capable = _CAPABLE[index] = major >= 8
        if not capable:
            warnings.warn(f"peft_fast: the fused CUDA LoRA kernels need compute capability 8.0 or newer (bf16 tensor "
                          f"cores); {torch.cuda.get_device_name(index)} has {major}.{minor}, so the cuda backend runs "
                          "its ATen route there")
    return capable


def fused_kernels(m: int, k: int, n: int, r: int) -> bool:
    """Whether the cuda backend's node should take the fused kernels for an M×K → N LoRA linear of total rank r (the
    node still falls back to ATen where the kernels cannot take the call: dtype, rank > 128, widths)."""
    mode = CUDA_KERNELS
    if mode == "auto":
        return _KERNELS_FAILED is None and (r <= FUSED_ANY_SIZE_RANK or m * (k + n) * r <= FUSED_MAX_WORK)
    return mode == "on"


def describe_failure(err: BaseException) -> str:
    """A kernel failure in one line for a warning: its type and the first line of its message (at most 200 chars)."""
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first_line}"


# set when the fused kernels failed at run time in auto mode (the node's ATen route then runs every call)
_KERNELS_FAILED: Optional[str] = None


def call_node(node, *args):
    """node(*args) for a cuda-backend C++ node whose last argument says whether to take the fused kernels. If they
    fail in auto kernel mode (a GPU they were not built for, too little shared memory …) the same call runs on
    the node's ATen route, and when that succeeds the kernels are off for the rest of the process, with one
    warning naming the error; the cuda backend itself stays on. Kernels forced "on" are not retried."""
    global _KERNELS_FAILED
    try:
        return node(*args)
    except torch.OutOfMemoryError:  # a step that does not fit, not a kernel that cannot run here
        raise
    except Exception as err:  # noqa: BLE001 - any kernel failure, see the docstring
        if not args[-1] or CUDA_KERNELS != "auto":
            raise
        out = node(*args[:-1], False)  # raises (for the caller) if the call itself is bad
        _KERNELS_FAILED = describe_failure(err)
        warnings.warn(f"peft_fast: the fused CUDA LoRA kernels failed here ({_KERNELS_FAILED}); the cuda backend "
                      "runs its ATen route from now on")
        return out


@contextlib.contextmanager
def use_cuda_kernels(mode) -> Iterator[None]:
    """Inside the block, the cuda backend's low-rank half runs on peft_fast's kernels wherever they apply ("on" /
    True), on ATen ops ("off" / False), or as the size rule says ("auto"); process-wide (the kernels are a build
    feature, not a per-thread policy), restored on exit."""
    global CUDA_KERNELS
    previous, CUDA_KERNELS = CUDA_KERNELS, _kernel_mode(mode)
    try:
        yield
    finally:
        CUDA_KERNELS = previous


def forced_backend() -> Optional[str]:
    """The backend forced for this thread (innermost `use_backend`, else PEFT_FAST_BACKEND), None for auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _DEFAULT_ERROR is not None:
        raise _DEFAULT_ERROR
    return _DEFAULT


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force `name` ("torch" | "triton" | "cuda" | "auto"/None) for ops called in this thread inside the block;
    the previous policy comes back on exit, also when the block raises."""
    backend = _parse(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def register(op: str, backend: str, supports: Optional[Callable[..., Optional[str]]] = None):
    """Decorator registering `fn` as `backend`'s implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports or (lambda *a, **k: None))
        return fn

    return deco


def choose(op: str, *args, **kwargs) -> str:
    """Name of the backend that will run `op` for these arguments."""
    return _choose(op, forced_backend(), args, kwargs)


def _choose(op: str, forced: Optional[str], args: tuple, kwargs: dict) -> str:
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    if forced is not None:
        impl = impls.get(forced)
        if impl is None:
            return "torch"
        reason = impl.supports(*args, **kwargs)
        if reason is None:
            return forced
        _warn_once(op, forced, reason)
        return "torch"
    for backend, rule in AUTO_RULES.get(op, ()):
        impl = impls.get(backend)
        if impl is None or (op, backend) in _FAILED:
            continue
        reason = impl.supports(*args, **kwargs)
        if reason is None:
            if rule is None or rule(*args, **kwargs) is None:
                return backend
        elif not isinstance(reason, Skip):
            _warn_once(op, backend, reason)
    return "torch"


def auto_goes_straight_to(op: str, backend: str) -> bool:
    """Whether this thread's policy runs `op` on `backend` whenever the backend can take the call: auto mode, the
    backend first in AUTO_RULES with no condition, and not taken off the op after a failure. (A caller that checks
    the backend's own `supports` conditions itself may then skip `call`.)"""
    rules = AUTO_RULES.get(op, ())
    return forced_backend() is None and bool(rules) and rules[0] == (backend, None) and (op, backend) not in _FAILED


def call(op: str, *args, **kwargs):
    forced = forced_backend()
    backend = _choose(op, forced, args, kwargs)
    impls = _REGISTRY[op]
    if backend == "torch" or forced is not None or _is_compiling():
        return impls[backend].fn(*args, **kwargs)
    try:
        return impls[backend].fn(*args, **kwargs)
    except torch.OutOfMemoryError:  # the call does not fit; the backend itself is fine
        raise
    except Exception as err:  # noqa: BLE001 - any kernel failure: see the module docstring
        result = impls["torch"].fn(*args, **kwargs)  # raises (and so re-raises for the caller) if the call is bad
        _FAILED.add((op, backend))
        _warn_once(op, backend, f"it failed here ({describe_failure(err)}); torch runs this op from now on")
        return result


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def available_backends(op: str) -> list[str]:
    return [b for b in BACKENDS if b in _REGISTRY.get(op, {})]


def _warn_once(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"peft_fast: {op} runs on torch instead of {backend}: {reason}")
