"""Triton backend of `linear_with_lora`: a LoRA linear's forward and backward as two custom ops.

Forward: the shrink hs = s·drop(x)Aᵀ (dropout mask generated in-kernel), then the base GEMM with the low-rank term —
cuBLAS accumulating (beta = 1) onto the Triton-written term by default, or all in Triton with the term in the GEMM's
epilogue (PEFT_FAST_GEMM=triton); small no-dropout inference calls are one launch. Backward: dB and dh from dy,
dA with the mask regenerated, dx = dy·W + drop(dh·A). Two `torch.library` custom ops (`peft_fast::lora_linear_fwd` / `lora_linear_bwd`) wrap the kernels of
`peft_fast.kernels.lora_linear`, with fake implementations and an autograd formula, so eager autograd and
`torch.compile` both see one opaque op per direction (no graph break). What torch does well stays outside the ops
as ordinary differentiable torch code: autocast casts, folding several adapters into one larger-rank term (each
adapter's scale folded into its B), folding lora_B biases into the base bias. Saved for backward: x (the layer's
input, kept alive anyway), hs = s·drop(x)Aᵀ (M×r) and the dropout seed — never a mask or a dropped copy of x.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .common import FLOAT_DTYPES as _FLOAT_DTYPES
from .common import compute_dtype as _compute_dtype
from .common import fold_terms, linear_reason, new_seed, new_seed_tensor, no_grad_needed, weight_kn as _weight_kn
from .common import terms_reason as _terms_reason
from .dispatch import Skip, forced_backend, register
from .terms import LoraTerm

from peft_fast.kernels import lora_linear as K  # noqa: E402  (imports triton)


# ------------------------------------------------------------------------------------------------ kernel calls
GEMM_ENV = "PEFT_FAST_GEMM"
# At or below this many rows an inference forward without dropout is one launch (shrink fused into the GEMM's K
# loop): decode is launch-bound. Not yet tuned by measurement.
FUSED_SMALL_M = 64


def _parse_gemm_mode(value: Optional[str]) -> str:
    mode = (value or "cublas").strip().lower()
    if mode not in ("cublas", "triton"):
        raise ValueError(f"{GEMM_ENV}={mode!r} is not 'cublas' or 'triton'")
    return mode


GEMM_MODE = _parse_gemm_mode(os.environ.get(GEMM_ENV))  # read once; tests set the attribute


def gemm_mode() -> str:
    """Who runs the big GEMMs (x Wᵀ, dy W) on this backend: "cublas" (default) accumulates them with beta = 1 onto
    the low-rank term a Triton kernel wrote (one extra pass over the output); "triton" runs them in Triton with the
    low-rank term in the epilogue (no extra pass, but only as fast as Triton's GEMM is here). The first H100 run
    (2026-11-23) had the all-Triton forward at 3.1× the cuBLAS base layer, hence the default."""
    return GEMM_MODE


def _forward(x, weight, bias, lora_a, lora_b, scale, p, seed, weight_kn, need_hs=True):
    w_kn = weight if weight_kn else weight.t()  # K×N view of the base weight
    if not need_hs and p == 0.0 and (x.shape[0] <= FUSED_SMALL_M or gemm_mode() == "triton"):
        out = K.gemm_lora(x, w_kn, bias, None, lora_b.t(), 1.0, 0.0, 0, x.dtype, shrink_a=lora_a, shrink_scale=scale)
        return out, None
    hs = K.shrink(x, lora_a, scale, p, seed)
    if gemm_mode() == "triton":
        return K.gemm_lora(x, w_kn, bias, hs, lora_b.t(), 1.0, 0.0, 0, x.dtype), hs
    out = K.lowrank(hs, lora_b.t(), bias, 1.0, 0.0, 0, x.dtype)
    return out.addmm_(x, w_kn), hs


def lora_weight_grads(dy, x, lora_a, lora_b, hs, scale, p, seed):
    """(dhs, dA, dB) of the low-rank term: dhs = dy B (dh = s·dhs), dB = dyᵀ hs (s is inside hs), and
    dA = s/(1−p) · dhsᵀ (mask ⊙ x) with the mask regenerated from the seed."""
    dhs = dy @ lora_b.to(dy.dtype)
    grad_b = (dy.t() @ hs.to(dy.dtype)).to(lora_b.dtype)
    grad_a = (K.grad_a(dhs, x, p, seed) * (scale / (1.0 - p))).to(lora_a.dtype)
    return dhs, grad_a, grad_b


def _backward(dy, x, weight, lora_a, lora_b, hs, scale, p, seed, weight_kn, need_dx):
    dhs, grad_a, grad_b = lora_weight_grads(dy, x, lora_a, lora_b, hs, scale, p, seed)
    if not need_dx:
        return x.new_empty(0), grad_a, grad_b
    w_nk = weight.t() if weight_kn else weight  # N×K view: dx = dy W + drop(dh A)
    if gemm_mode() == "triton":
        grad_x = K.gemm_lora(dy, w_nk, None, dhs, lora_a, scale / (1.0 - p), p, seed, x.dtype)
    else:
        grad_x = K.lowrank(dhs, lora_a, None, scale / (1.0 - p), p, seed, x.dtype).addmm_(dy, w_nk)
    return grad_x, grad_a, grad_b


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("peft_fast::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
    lora_b: torch.Tensor, scale: float, p: float, seed: torch.Tensor, weight_kn: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Wᵀ + bias + s·drop(x)AᵀBᵀ, s·drop(x)Aᵀ) for 2-D x; W is N×K, or K×N when weight_kn."""
    return _forward(x, weight, bias, lora_a, lora_b, scale, p, int(seed.item()) if p > 0 else 0, weight_kn)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, p, seed, weight_kn):
    n = weight.shape[1] if weight_kn else weight.shape[0]
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("peft_fast::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    hs: torch.Tensor, scale: float, p: float, seed: torch.Tensor, weight_kn: bool, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx or an empty tensor, dA, dB) of lora_linear_fwd."""
    seed_value = int(seed.item()) if p > 0 else 0
    return _backward(dy, x, weight, lora_a, lora_b, hs, scale, p, seed_value, weight_kn, need_dx)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, hs, scale, p, seed, weight_kn, need_dx):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, p, seed, weight_kn = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.scale, ctx.p, ctx.weight_kn = scale, p, weight_kn
    ctx.bias_dtype = None if bias is None else bias.dtype


def _autograd_backward(ctx, grad_out, _grad_hs):
    x, weight, lora_a, lora_b, hs, seed = ctx.saved_tensors
    need_x, need_w, need_bias = ctx.needs_input_grad[:3]
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    grad_x, grad_a, grad_b = torch.ops.peft_fast.lora_linear_bwd(
        grad_out, x, weight, lora_a, lora_b, hs, ctx.scale, ctx.p, seed, ctx.weight_kn, need_x
    )
    grad_w = grad_bias = None
    if need_w:  # only when the user trains the base weight too
        grad_w = (x.t() @ grad_out) if ctx.weight_kn else (grad_out.t() @ x)
        grad_w = grad_w.to(weight.dtype)
    if need_bias:
        grad_bias = grad_out.sum(0).to(ctx.bias_dtype)
    return (grad_x if need_x else None), grad_w, grad_bias, grad_a, grad_b, None, None, None, None


lora_linear_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ dispatch entry
def interpreting() -> bool:
    """CPU tensors run the kernels in Triton's interpreter only when asked for (tests: PEFT_FAST_BACKEND=triton)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and forced_backend() == "triton"


_NOT_CUDA = Skip("input not on CUDA, Triton kernels run on CUDA")


def supports(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> Optional[str]:
    """None when the fused Triton path can run this call, else why not (a `Skip` when that is simply normal).
    Auto mode does not list this backend for linear_with_lora (dispatch.AUTO_RULES): forced only."""
    if not x.is_cuda and not (x.device.type == "cpu" and interpreting()):
        return _NOT_CUDA
    return linear_reason(x, base, terms, K.MAX_RANK)


def terms_reason(terms: list[LoraTerm]) -> Optional[str]:
    """Why the Triton kernels cannot take these adapter terms, or None."""
    return _terms_reason(terms, K.MAX_RANK)


@register("linear_with_lora", "triton", supports=supports)
def linear_with_lora(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
    dtype = _compute_dtype(x)
    weight, bias = base.weight.to(dtype), None if base.bias is None else base.bias.to(dtype)
    lora_a, lora_b, scale, lora_bias = fold_terms(terms, dtype)
    if lora_bias is not None:
        bias = lora_bias if bias is None else bias + lora_bias
    p = terms[0].dropout_p
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.to(dtype).reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight_kn = _weight_kn(base)
    if no_grad_needed(x2, weight, bias, lora_a, lora_b) and not torch.compiler.is_compiling():
        # inference: straight to the kernels, no autograd or op-dispatch overhead (matters at decode sizes)
        seed = new_seed(p)
        out, _ = _forward(x2, weight, bias, lora_a, lora_b, scale, p, seed, weight_kn, need_hs=False)
    else:
        seed = new_seed_tensor(p)
        out, _ = torch.ops.peft_fast.lora_linear_fwd(x2, weight, bias, lora_a, lora_b, scale, p, seed, weight_kn)
    return out.reshape(*lead, out.shape[-1])
