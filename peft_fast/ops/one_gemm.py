"""Turns on the C++ node's one-GEMM route (dispatch.ONE_GEMM_MIN_ROWS says why and from how many rows): on the first
node call of each device, dtype, rank block and weight layout, the route's Triton kernels are compiled for that GPU
and registered with peft_fast._C (kernels/lora_gemm_tma.register_for_node: forward and dx, with and without
dropout), and the row threshold is set; unless dispatch.ONE_GEMM_PRODUCE_MIN_ROWS is off, also, per adapter dtype,
the kernels that make the low-rank product themselves (no shrink kernel before them), which the node takes without
dropout from that many rows (at rank ≤ 16). Below Hopper, with less shared memory a block than a Hopper GPU's (a
consumer Blackwell), above dispatch.ONE_GEMM_MAX_RANK (16 unless set: the ranks measured), or when compiling fails (one
warning), the node keeps its default route. Off, nothing here runs."""

from __future__ import annotations

import warnings

import torch

from . import dispatch
from .extension import _C

_done: set = set()  # (device index, dtype, rank, kn[, adapter dtype]) already registered or found unsupported
_failed = False


def ensure(x: torch.Tensor, rank: int, kn: bool, dtype: torch.dtype,
           adapter_dtype: torch.dtype = torch.float32) -> None:
    """Register the route's kernels for a node call on `x` (compute dtype `dtype`, LoRA rank `rank`, K×N weight when
    `kn`, adapters in `adapter_dtype`), once."""
    produce_key = (x.get_device(), dtype, rank, kn, adapter_dtype)
    if produce_key in _done:  # (every node call of a layer comes here: this test first, and no torch.device made)
        return
    global _failed
    rows = dispatch.ONE_GEMM_MIN_ROWS
    if rows is None or _failed or _C is None or not hasattr(_C, "lora_kernels_register_tma") or not x.is_cuda:
        return
    if torch.cuda.is_current_stream_capturing():  # (no compiling or module loading inside a CUDA-graph capture:
        return                                    # the next call outside one registers)
    key = produce_key[:4]  # (the kernels that read h: one registration for all adapter dtypes)
    plain = key not in _done
    _done.update((key, produce_key))
    if dtype not in (torch.bfloat16, torch.float16) or rank > dispatch.ONE_GEMM_MAX_RANK or \
            torch.cuda.get_device_capability(x.device)[0] < 9:
        return
    produce_rows = dispatch.ONE_GEMM_PRODUCE_MIN_ROWS
    produce = produce_rows is not None and adapter_dtype in (torch.float32, dtype) and \
        rank <= dispatch.ONE_GEMM_PRODUCE_MAX_RANK
    if not plain and not produce:
        return
    try:
        from ..kernels import lora_gemm_tma

        if lora_gemm_tma.device_shared_limit(x.device) < lora_gemm_tma.HOPPER_SHARED_BYTES:
            return  # (its 128×256 tiles are sized for a Hopper-class block; a GPU with less keeps the default route)
        lora_gemm_tma.register_for_node(_C, x.device, dtype, ranks=(rank,), kn=(kn,), plain=plain,
                                        produce_adapters=(adapter_dtype,) if produce else ())
        _C.lora_kernels_set_tma_rows(rows)
        if produce:
            _C.lora_kernels_set_tma_produce_rows(produce_rows)
    except Exception as err:  # noqa: BLE001 - a route that cannot be set up leaves the default one, said once
        _failed = True
        warnings.warn(f"peft_fast: the one-GEMM route could not be set up ({type(err).__name__}: {err}); the default "
                      "route runs")
