"""CUDA backend of `quantized_linear_with_lora` for decode: the small-M 4-bit GEMV of csrc/qgemv.cu (→ peft_fast._C).

Inference only (no autograd), M ≤ 16 rows, bf16 / fp16 compute, NF4 / FP4 weights with K and blocksize multiples
of 32. It reads the packed weight once; the low-rank term rides in its epilogue (hs = s·x·Aᵀ is a tiny torch
matmul). Auto mode does not pick it until it is measured faster than bitsandbytes (dispatch.AUTO_RULES):
PEFT_FAST_BACKEND=cuda selects it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .common import fold_terms
from .dispatch import Skip, register
from .extension import WHY_NO_EXTENSION, _C
from .terms import LoraTerm

MAX_ROWS = 16


def _absmax_fp32(state) -> torch.Tensor:
    from .triton_qlora import _absmax_fp32 as cached

    return cached(state)


def supports(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> Optional[str]:
    if _C is None:
        return Skip(WHY_NO_EXTENSION)
    if not x.is_cuda:
        return Skip(f"input on {x.device.type}")
    if type(base).__name__ != "Linear4bit" or not hasattr(getattr(base, "weight", None), "quant_state"):
        return Skip(f"base layer is {type(base).__name__}, the GEMV takes bitsandbytes Linear4bit")
    k = x.shape[-1]
    if x.numel() // max(k, 1) > MAX_ROWS:
        return Skip(f"more than {MAX_ROWS} rows: the GEMV is for decode")
    if torch.is_grad_enabled() and (x.requires_grad or any(t.lora_A.weight.requires_grad for t in terms)):
        return Skip("gradients needed: the GEMV is inference-only")
    state = base.weight.quant_state
    dtype = getattr(base, "compute_dtype", None) or x.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return f"compute dtype {dtype} is not bf16 or fp16"
    if k % 32 or state.blocksize % 32 or getattr(state, "packing_format_for_cpu", False):
        return "K and blocksize must be multiples of 32, in bitsandbytes' standard layout"
    if any(t.dropout_p > 0 for t in terms):
        return "dropout is active (training mode)"
    if sum(t.lora_A.weight.shape[0] for t in terms) > 128:
        return "total rank exceeds 128"
    return None


@register("quantized_linear_with_lora", "cuda", supports=supports)
def quantized_linear_with_lora(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
    state = base.weight.quant_state
    dtype = getattr(base, "compute_dtype", None) or x.dtype
    n, k = int(state.shape[0]), int(state.shape[1])
    x2 = x.to(dtype).reshape(-1, k).contiguous()
    bias = None if base.bias is None else base.bias.to(dtype)
    hs = lora_b = None
    if terms:
        lora_a, lora_b, scale, lora_bias = fold_terms(terms, dtype)
        hs = ((x2 @ lora_a.to(dtype).t()) * scale).contiguous()
        lora_b = lora_b.to(dtype).contiguous()
        if lora_bias is not None:
            bias = lora_bias if bias is None else bias + lora_bias
    qdata = base.weight.data.reshape(-1)
    qdata = qdata if qdata.dtype == torch.uint8 else qdata.view(torch.uint8)
    y = _C.qgemv_lora(x2, qdata.contiguous(), state.code.float().contiguous(), _absmax_fp32(state), state.blocksize,
                      n, k, None if bias is None else bias.contiguous(), hs, lora_b)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
