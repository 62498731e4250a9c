"""Triton backend of `quantized_linear_with_lora` for bitsandbytes 4-bit (NF4 / FP4) base layers (QLoRA).

Forward y = x·deq(W)ᵀ + s·drop(x)AᵀBᵀ and input gradient dx = dy·deq(W) + drop(dh·A) run as the LoRA GEMM kernel
with the weight tile dequantized inside its K loop (`kernels.lora_linear._dequant_4bit_tile`): no dequantized copy of
W is ever written, kept for backward, or shared between layers. The low-rank parts are the LoRA kernels' (shrink
with in-kernel dropout, epilogue, dA), wrapped in `torch.library` custom ops with an autograd formula.

Auto mode does not pick this backend yet (dispatch.AUTO_RULES): it has not been measured on a GPU against
bitsandbytes' own path. PEFT_FAST_BACKEND=triton selects it (on CUDA, or in Triton's interpreter on the CPU for tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from peft_fast.kernels import lora_linear as K
from peft_fast.kernels import quant4

from ..quantization import NESTED_BLOCKSIZE, NestedState, QuantState4bit, block_absmax, code_4bit, dynamic_code
from ..quantization import _check_blocksize
from .dispatch import Skip, register
from .terms import LoraTerm
from .triton_lora import (
    _FLOAT_DTYPES,
    fold_terms,
    interpreting,
    lora_weight_grads,
    new_seed,
    new_seed_tensor,
    no_grad_needed,
    terms_reason,
)

_ABSMAX_ATTR = "_peft_fast_absmax_fp32"  # cached on the quant state itself (bnb's QuantState is unhashable)


def _absmax_fp32(state) -> torch.Tensor:
    """fp32 absmax per block, undoing double quantization once per weight rather than on every call."""
    key = (state.absmax._version, state.absmax.data_ptr())
    hit = getattr(state, _ABSMAX_ATTR, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = block_absmax(state).contiguous()
    setattr(state, _ABSMAX_ATTR, (key, value))
    return value


def _packed(qdata, code, absmax, n: int, k: int, blocksize: int) -> K.Packed4bit:
    return K.Packed4bit(qdata, code, absmax, blocksize, n, k)


def _forward(x, qdata, code, absmax, n, k, blocksize, bias, lora_a, lora_b, scale, p, seed, need_hs=True):
    weight = _packed(qdata, code, absmax, n, k, blocksize)
    if not need_hs and p == 0.0:  # one launch: the shrink rides along in the GEMM's K loop
        out = K.gemm_lora(x, weight, bias, None, lora_b.t(), 1.0, 0.0, 0, x.dtype, shrink_a=lora_a,
                          shrink_scale=scale)
        return out, None
    hs = K.shrink(x, lora_a, scale, p, seed)
    return K.gemm_lora(x, weight, bias, hs, lora_b.t(), 1.0, 0.0, 0, x.dtype), hs


@torch.library.custom_op("peft_fast::qlora_linear_fwd", mutates_args=())
def qlora_linear_fwd(
    x: torch.Tensor, qdata: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int,
    bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x·deq(W)ᵀ + bias + s·drop(x)AᵀBᵀ, s·drop(x)Aᵀ) for 2-D x and a packed 4-bit W (N×K)."""
    return _forward(x, qdata, code, absmax, n, k, blocksize, bias, lora_a, lora_b, scale, p,
                    int(seed.item()) if p > 0 else 0)


@qlora_linear_fwd.register_fake
def _(x, qdata, code, absmax, n, k, blocksize, bias, lora_a, lora_b, scale, p, seed):
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("peft_fast::qlora_linear_bwd", mutates_args=())
def qlora_linear_bwd(
    dy: torch.Tensor, x: torch.Tensor, qdata: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, n: int, k: int,
    blocksize: int, lora_a: torch.Tensor, lora_b: torch.Tensor, hs: torch.Tensor, scale: float, p: float,
    seed: torch.Tensor, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx or an empty tensor, dA, dB) of qlora_linear_fwd; dx = dy·deq(W) + drop(dh·A), dequantized in-tile."""
    seed_value = int(seed.item()) if p > 0 else 0
    dhs, grad_a, grad_b = lora_weight_grads(dy, x, lora_a, lora_b, hs, scale, p, seed_value)
    if not need_dx:
        return x.new_empty(0), grad_a, grad_b
    weight_nk = _packed(qdata, code, absmax, n, k, blocksize).t()
    grad_x = K.gemm_lora(dy, weight_nk, None, dhs, lora_a, scale / (1.0 - p), p, seed_value, x.dtype)
    return grad_x, grad_a, grad_b


@qlora_linear_bwd.register_fake
def _(dy, x, qdata, code, absmax, n, k, blocksize, lora_a, lora_b, hs, scale, p, seed, need_dx):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, qdata, code, absmax, n, k, blocksize, bias, lora_a, lora_b, scale, p, seed = inputs
    ctx.save_for_backward(x, qdata, code, absmax, lora_a, lora_b, output[1], seed)
    ctx.meta = (n, k, blocksize, scale, p)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _autograd_backward(ctx, grad_out, _grad_hs):
    x, qdata, code, absmax, lora_a, lora_b, hs, seed = ctx.saved_tensors
    n, k, blocksize, scale, p = ctx.meta
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[7]
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    grad_x, grad_a, grad_b = torch.ops.peft_fast.qlora_linear_bwd(
        grad_out, x, qdata, code, absmax, n, k, blocksize, lora_a, lora_b, hs, scale, p, seed, need_x
    )
    grad_bias = grad_out.sum(0).to(ctx.bias_dtype) if need_bias else None
    return ((grad_x if need_x else None), None, None, None, None, None, None, grad_bias, grad_a, grad_b,
            None, None, None)


qlora_linear_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ dispatch entry
def _is_bnb_4bit(base: nn.Module) -> bool:
    return type(base).__name__ == "Linear4bit" and hasattr(getattr(base, "weight", None), "quant_state")


def supports(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> Optional[str]:
    if not x.is_cuda and not (x.device.type == "cpu" and interpreting()):
        return Skip("input not on CUDA, Triton kernels run on CUDA")
    if not _is_bnb_4bit(base):
        return Skip("the fused dequant kernel takes bitsandbytes Linear4bit base layers only")
    state = base.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return "the 4-bit weight is in bitsandbytes' CPU-repacked layout"
    if state.quant_type not in ("nf4", "fp4"):
        return f"quant_type {state.quant_type!r} is not nf4 or fp4"
    if base._forward_hooks or base._forward_pre_hooks:
        return "the base layer has forward hooks, which the fused kernel would bypass"
    if _compute_dtype(base, x) not in _FLOAT_DTYPES:
        return f"compute dtype {_compute_dtype(base, x)} is not fp16, bf16 or fp32"
    return terms_reason(terms)


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    return getattr(base, "compute_dtype", None) or x.dtype


@register("quantized_linear_with_lora", "triton", supports=supports)
def quantized_linear_with_lora(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
    """As bitsandbytes' Linear4bit: computed in its compute_dtype, returned in the input's dtype."""
    dtype = _compute_dtype(base, x)
    weight = base.weight
    state = weight.quant_state
    n, k = int(state.shape[0]), int(state.shape[1])
    qdata = weight.data.reshape(-1)
    qdata = qdata if qdata.dtype == torch.uint8 else qdata.view(torch.uint8)
    code, absmax = state.code.to(torch.float32), _absmax_fp32(state)
    bias = None if base.bias is None else base.bias.to(dtype)
    lead = x.shape[:-1]
    x2 = x.to(dtype).reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not terms:  # no active adapter: the dequant GEMM alone
        out = K.gemm_lora(x2, _packed(qdata, code, absmax, n, k, state.blocksize), bias, None, None, 0.0, 0.0, 0,
                          dtype)
        return out.reshape(*lead, n).to(x.dtype)
    lora_a, lora_b, scale, lora_bias = fold_terms(terms, dtype)
    if lora_bias is not None:
        bias = lora_bias if bias is None else bias + lora_bias
    p = terms[0].dropout_p
    if no_grad_needed(x2, None, bias, lora_a, lora_b) and not torch.compiler.is_compiling():
        out, _ = _forward(x2, qdata, code, absmax, n, k, state.blocksize, bias, lora_a, lora_b, scale, p,
                          new_seed(p), need_hs=False)
    else:
        out, _ = torch.ops.peft_fast.qlora_linear_fwd(x2, qdata, code, absmax, n, k, state.blocksize, bias, lora_a,
                                                      lora_b, scale, p, new_seed_tensor(p))
    return out.reshape(*lead, n).to(x.dtype)


def _dequant_supports(packed: torch.Tensor, state, dtype=None) -> Optional[str]:
    if not packed.is_cuda and not (packed.device.type == "cpu" and interpreting()):
        return Skip("weight not on CUDA")
    if getattr(state, "packing_format_for_cpu", False):
        return "the 4-bit weight is in bitsandbytes' CPU-repacked layout"
    return None


@register("dequantize_4bit", "triton", supports=_dequant_supports)
def dequantize_4bit(packed: torch.Tensor, state, dtype=None) -> torch.Tensor:
    """One pass over the packed bytes (bit-identical to the torch reference)."""
    return quant4.dequantize_4bit(packed, state.code, _absmax_fp32(state), state.blocksize, state.shape,
                                  dtype or state.dtype)


def _quant_supports(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                    compress_statistics: bool = False) -> Optional[str]:
    if not weight.is_cuda and not (weight.device.type == "cpu" and interpreting()):
        return Skip("weight not on CUDA")
    return None


@register("quantize_4bit", "triton", supports=_quant_supports)
def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  compress_statistics: bool = False):
    """One program per quantization block (bit-identical to the torch reference), double quantization included."""
    _check_blocksize(blocksize)
    code = code_4bit(quant_type, weight.device)
    packed, absmax = quant4.quantize_blockwise(weight.reshape(-1), code, blocksize, pack4=True)
    state = QuantState4bit(absmax, weight.shape, code, blocksize, quant_type, weight.dtype)
    if compress_statistics:
        offset = absmax.mean()
        code2 = dynamic_code().to(weight.device)
        qabsmax, absmax2 = quant4.quantize_blockwise(absmax - offset, code2, NESTED_BLOCKSIZE, pack4=False)
        state.absmax, state.offset, state.state2 = qabsmax, offset, NestedState(absmax2, code2)
    return packed.unsqueeze(1), state
