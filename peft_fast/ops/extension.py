"""The optional CUDA C++ extension peft_fast._C (csrc/), loaded once for every op module that uses it.

It is built only where torch has CUDA and nvcc is found at install time (setup.py); elsewhere its absence is normal
and silent. An extension that is there but does not load (typically built against another torch: undefined
symbols) is reported in one RuntimeWarning, and the Triton / torch paths run instead.
"""

from __future__ import annotations

import importlib
import warnings

try:
    _C = importlib.import_module("peft_fast._C")
    WHY_NO_EXTENSION = None
except ImportError as exc:
    _C = None
    if isinstance(exc, ModuleNotFoundError) and exc.name == "peft_fast._C":
        WHY_NO_EXTENSION = "peft_fast._C is not built (no CUDA torch / nvcc at install time)"
    else:
        WHY_NO_EXTENSION = f"peft_fast._C does not load (built for another torch? rebuild with pip install -e .): {exc}"
        warnings.warn(f"{WHY_NO_EXTENSION}; using the Triton / torch paths", RuntimeWarning, stacklevel=2)

if _C is not None and hasattr(_C, "lora_kernels_set_decode_kernel"):  # (built with the fused kernels)
    from .dispatch import DECODE_KERNEL

    if DECODE_KERNEL is not None:
        _C.lora_kernels_set_decode_kernel(DECODE_KERNEL)
        _C.lora_kernels_set_decode_kernel_4bit(DECODE_KERNEL)
