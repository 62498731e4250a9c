"""cuda backend of `linear_with_lora`: a LoRA linear's forward and backward as ONE autograd node over cuBLAS.

With W (N×K), A (r×K), B (N×r), scale s, dropout p, drop(z) = z ⊙ mask / (1−p) and Bs = s·B (cast to the compute
dtype and scaled in one kernel, so no separate scaling of y, dx or dA):

    forward   h  = drop(x) Aᵀ                      cuBLAS (M×r); the mask comes from torch's fused dropout kernel
              y  = h Bsᵀ + x Wᵀ (+ bias)            h Bsᵀ first, then x Wᵀ accumulated onto it (beta = 1)
    backward  gs = dy Bs                            (M×r) = s · dy B
              dB = s · dyᵀ h                         fp32 accumulation into B's dtype
              dA = gsᵀ drop(x)                       drop(x) rebuilt from x and the saved mask, never kept
              dx = drop(gs A) + dy W                gs A first, then dy W accumulated onto it

Why this shape (H200, torch 2.11, measured 2026-12-02; scripts/probe_lora_paths.py, bench/RESULTS.md): the host,
not the GPU, bounds a LoRA step at model sizes — each eager op costs ~13–25 µs to issue there (the lent machines'
CPUs differ), a Triton launch from Python 40–170 µs. This path issues 3 GEMMs forward and 5 backward through
cuBLAS (plus the two adapter casts, one small scaling, and with dropout the mask kernel and two mask
applications), in one autograd node with nothing per-adapter in Python. The GEMMs with K = r run near memory
bandwidth, and accumulating the big GEMMs onto the low-rank term costs cuBLAS nothing measurable: GPU kernel time
of a fwd+bwd at 8192×4096→4096 r16 is 1.10× the bare layer's (HF PEFT 1.29×), wall time 1.18 ms (PEFT 1.30 ms).

Saved for backward: x (the layer's input, alive anyway), h (M×r), A and Bs in the compute dtype and, with dropout,
torch's boolean mask (1 byte per element of x; HF PEFT keeps the dropped copy of x itself). The dropout mask comes
from torch's own dropout kernel and generator, so `torch.manual_seed` reproduces it and, on CUDA, it is the very
mask the torch path (nn.Dropout) draws for the same seed.

Where peft_fast._C is built, eager calls run the same node compiled (csrc/lora_autograd.cpp): one call from Python
forward, none in backward; the reshape to M×K and back, the cast to the compute dtype and the scale happen inside
it (a view outside the node is an autograd node of its own). H200 host cost of a fwd+bwd at tiny sizes
(scripts/probe_lora_paths.py host, 2026-12-02, two machines): 435 / 913 µs against HF PEFT's 530 / 1385 and the bare
layer's 86 / 437. In a bench model step (scripts/profile_model_step.py) a LoRA linear adds ~12 kernel launches and
~50 ATen calls to the bare layer's; HF PEFT adds ~20 launches and ~115 calls. torch.compile and functorch
transforms keep the Python code paths below.

In CUDA builds the node's low-rank half can run instead on peft_fast's fused kernels (csrc/lora_kernels.h; bf16/fp16
compute, rank ≤ 128, widths multiples of 8): forward one kernel (hs = s·drop(x)Aᵀ and y = hs Bᵀ + bias, the
adapters read in their own dtype, the dropout bits drawn once from torch's Philox state and kept bit-packed, 1/16
of x) then cuBLAS accumulates x Wᵀ onto y; backward one kernel for gs = s·dy B and dx = drop(gs A), cuBLAS
accumulating dy W, and one for dA = gsᵀ drop(x) and dB = dyᵀ hs (fixed summation order). 3 launches a fwd+bwd
beside cuBLAS's instead of 11–14; `dispatch.fused_kernels` says when (the measured rank and size rule). Their masks are
their own, not torch's dropout kernel's: same statistics, reproducible under torch.manual_seed.

Runs on CUDA in auto mode; on CPU tensors only when forced (PEFT_FAST_BACKEND=cuda / use_backend("cuda")), which
the CPU tests use: the same torch code, so the same numbers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .common import CONV1D, FLOAT_DTYPES, compute_dtype, fold_terms, linear_reason, no_grad_needed, param
from . import dispatch, one_gemm
from .dispatch import Skip, forced_backend, register
from .extension import _C
from .terms import LoraTerm

# The modules a LoRA layer holds only for adapters whose term is no plain LoRA term (tuners/lora/layer.py): Arrow's
# routers, KaSA's singular values, VeLoRA's projections. A layer holding any of them takes its general path.
VARIANT_MODULES = frozenset(("lora_arrow", "lora_diag", "lora_velora_embed"))

_NOT_CUDA = Skip("input not on CUDA")
# mm's out_dtype overload (torch ≥ 2.8 on CUDA: fp16/bf16 inputs accumulated into fp32 output); decided once, at
# import, so that neither eager calls nor torch.compile traces carry any state about it
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_into(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale · (a @ b) in `dtype`; on CUDA a 16-bit product goes straight into an fp32 result (no rounding to 16
    bits on the way, one launch)."""
    if _MM_OUT_DTYPE and dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda:
        out = torch.mm(a, b, out_dtype=dtype)
    else:
        out = torch.mm(a, b)
        if out.dtype != dtype:
            out = out.to(dtype)
    return out.mul_(scale) if scale != 1.0 else out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _dropped(t: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    return t if mask is None else torch.ops.aten.native_dropout_backward(t, mask, 1.0 / (1.0 - p))


def scaled_as(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale · t in `dtype` in one kernel (the product rounded once, into the output; traced: plain ops, which
    inductor fuses anyway)."""
    if scale == 1.0:
        return _as(t, dtype)
    if torch.compiler.is_compiling():
        return (t * scale).to(dtype)
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


def lora_forward(x, w_kn, bias, a, bs, p: float):
    """(y, h, mask) for 2-D x (M×K), w_kn the K×N view of the base weight, a (r×K) and bs = s·B (N×r), all in x's
    dtype."""
    if p > 0.0:
        xd, mask = torch.native_dropout(x, p, True)
    else:
        xd, mask = x, None
    h = torch.mm(xd, a.t())
    del xd  # the dropped copy lives only for this GEMM
    y = torch.mm(h, bs.t()) if bias is None else torch.addmm(bias, h, bs.t())
    return y.addmm_(x, w_kn), h, mask


class FusedLoraLinear(torch.autograd.Function):
    """y = x Wᵀ + bias + s·drop(x) Aᵀ Bᵀ as one autograd node (the formulas are the module docstring's)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, p: float, kn: bool):
        dt = x.dtype
        a, bs, w = _as(lora_a, dt), scaled_as(lora_b, scale, dt), _as(weight, dt)
        y, h, mask = lora_forward(x, w if kn else w.t(), bias, a, bs, p)
        ctx.save_for_backward(x, w, a, bs, h, mask)
        ctx.scale, ctx.p, ctx.kn = scale, p, kn
        ctx.dtypes = (weight.dtype, lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, bs, h, mask = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        w_dtype, a_dtype, b_dtype, bias_dtype = ctx.dtypes
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy = _as(dy, x.dtype)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        gs = torch.mm(dy, bs) if (need_a or need_x) else None  # s · dy B
        if need_b:
            grad_b = _mm_into(dy.t(), h, s, b_dtype)
        if need_a:
            grad_a = _mm_into(gs.t(), _dropped(x, mask, p), 1.0, a_dtype)
        if need_x:
            grad_x = _dropped(torch.mm(gs, a), mask, p).addmm_(dy, w.t() if ctx.kn else w)
        if need_w:  # only when the user trains the base weight too
            grad_w = (torch.mm(x.t(), dy) if ctx.kn else torch.mm(dy.t(), x)).to(w_dtype)
        if need_bias:
            grad_bias = dy.sum(0).to(bias_dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def supports(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> Optional[str]:
    """None when this path can run the call, else why not (a `Skip` when that is simply normal)."""
    if not x.is_cuda and forced_backend() != "cuda":
        return _NOT_CUDA
    return linear_reason(x, base, terms, max_rank=None)


# Function.apply's Python wrapper (default-argument binding, functorch bookkeeping) costs about as much host time as
# two GEMM launches; eager calls outside functorch transforms and torch.compile go to the C entry point directly.
_apply_eager = super(torch.autograd.Function, FusedLoraLinear).apply

# FusedLoraLinear compiled (csrc/lora_autograd.cpp, in peft_fast._C where it is built): one call from Python forward,
# no Python at all in backward. Eager calls take it when present; the tests set it to a CPU build.
CPP_LORA_LINEAR = getattr(_C, "lora_linear", None)


@register("linear_with_lora", "cuda", supports=supports)
def linear_with_lora(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
    dtype = compute_dtype(x)
    lora_a, lora_b, scale, lora_bias = fold_terms(terms, dtype)
    bias = param(base, "bias")
    if lora_bias is not None:
        bias = lora_bias if bias is None else _as(bias, dtype) + lora_bias
    p = terms[0].dropout_p
    weight = param(base, "weight")
    kn = type(base) is not nn.Linear  # supports() let only nn.Linear and transformers' Conv1D (K×N weight) through
    if CPP_LORA_LINEAR is not None and not torch.compiler.is_compiling() and \
            not torch._C._are_functorch_transforms_active():
        # the node casts to `dtype` and reshapes inside (no autograd node around it); no graph node without grads
        kernels = dispatch.fused_kernels_for(x, weight.shape[1] if kn else weight.shape[0], lora_a.shape[0])
        if dispatch.ONE_GEMM_MIN_ROWS is not None and kernels:
            one_gemm.ensure(x, lora_a.shape[0], kn, dtype, lora_a.dtype)
        return dispatch.call_node(CPP_LORA_LINEAR, x, weight, bias, lora_a, lora_b, scale, p, kn, dtype, kernels)
    k = x.shape[-1]
    x2 = _as(x.reshape(-1, k), dtype)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = _as(bias, dtype)
    if no_grad_needed(x2, weight, bias, lora_a, lora_b):  # inference: no autograd node at all
        w = _as(weight, dtype)
        out = lora_forward(x2, w if kn else w.t(), bias, _as(lora_a, dtype), scaled_as(lora_b, scale, dtype), p)[0]
    elif torch.compiler.is_compiling():
        # traced: the same arithmetic as differentiable torch ops; AOT autograd derives the backward and inductor
        # fuses both. (Tracing FusedLoraLinear instead gave all-zero adapter grads in a layer whose input needs no
        # grad, torch 2.11, tests/test_gpu_cuda_lora.py, 2026-12-02; cause not found.)
        w = _as(weight, dtype)
        w_kn = w if kn else w.t()
        xd = torch.nn.functional.dropout(x2, p, True) if p > 0 else x2
        # the scale goes on the small M×r product: torch.add(base, low, alpha=scale) compiled to base + low, the
        # alpha lost (torch 2.11 CUDA and 2.13 CPU; the bench's gate caught it, tests/test_cuda_lora.py pins it)
        low = torch.mm(torch.mm(xd, _as(lora_a, dtype).t()) * scale, _as(lora_b, dtype).t())
        base_out = torch.mm(x2, w_kn) if bias is None else torch.addmm(bias, x2, w_kn)
        out = base_out + low
    elif torch._C._are_functorch_transforms_active():
        out = FusedLoraLinear.apply(x2, weight, bias, lora_a, lora_b, scale, p, kn)
    else:
        out = _apply_eager(x2, weight, bias, lora_a, lora_b, scale, p, kn)
    return out.view(*x.shape[:-1], out.shape[-1])


def eager_layer_call(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A LoRA Linear layer's whole unmerged forward for the common case, or None for the general path.

    The common case: one plain LoRA adapter (no DoRA, no lora_B bias), adapters enabled and not merged, on an
    nn.Linear / Conv1D base without hooks, x on CUDA, auto policy, eager mode. There the general path (the layer's checks → dispatch.call → supports →
    linear_with_lora above) always ends in one CPP_LORA_LINEAR call; this function makes the same decisions and the
    same call from one flat function: on the lent hosts each Python call level costs ~1 µs and a LoRA model issues
    hundreds of layers a step (tests/test_cuda_lora.py checks that both paths hand the node the same arguments).
    """
    if CPP_LORA_LINEAR is None or not x.is_cuda:
        return None
    args = eager_node_args(layer, x)
    if args is None:
        return None
    if dispatch.ONE_GEMM_MIN_ROWS is not None and args[-1]:  # (args: x, W, bias, A, B, s, p, kn, dtype, kernels)
        one_gemm.ensure(x, args[3].shape[0], args[7], args[8], args[3].dtype)
    try:
        return dispatch.call_node(CPP_LORA_LINEAR, *args)
    except torch.OutOfMemoryError:  # (dispatch.call would only run it twice more)
        raise
    except Exception:  # noqa: BLE001 - the general path retries on torch and takes the backend off (dispatch.call)
        return None


def single_plain_adapter(layer: nn.Module, op: str) -> Optional[tuple]:
    """(base layer, A's weight, B's weight, scale, dropout p) of a LoRA layer's one active plain adapter, for the
    flat eager paths of `op` (here and ops/cuda_qlora.py); None where the general path must run: a policy that would
    not send `op` straight to the cuda backend, traced or under a functorch transform, adapters disabled or merged,
    several active adapters, DoRA, a lora_B bias, a tensor scale, a dropout module of another kind, input casting
    off, hooks on the base layer, an aLoRA adapter, an Arrow, KaSA or VeLoRA adapter in the layer."""
    if not dispatch.auto_goes_straight_to(op, "cuda"):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if layer._disable_adapters or layer.merged_adapters:  # the base layer alone
        return None
    modules = layer._modules
    name = layer._active_adapter
    if type(name) is not str:
        if type(name) is not list or len(name) != 1:  # several active adapters: the general path folds them
            return None
        name = name[0]
    lora_a = modules["lora_A"]._modules.get(name)
    lora_b = modules["lora_B"]._modules.get(name)
    base = modules["base_layer"]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_b._parameters["bias"] is not None:
        return None
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    if not layer.cast_input_dtype_enabled or layer.use_dora.get(name, False) or layer.use_alora.get(name, False):
        return None
    if not VARIANT_MODULES.isdisjoint(modules):
        return None
    scale = layer.scaling[name]
    if type(scale) is not float and type(scale) is not int:
        return None
    dropout = modules["lora_dropout"]._modules[name]
    if type(dropout) is nn.Identity:
        p = 0.0
    elif isinstance(dropout, nn.Dropout):
        p = dropout.p if dropout.training else 0.0
    else:
        return None
    return base, lora_a._parameters["weight"], lora_b._parameters["weight"], scale, p


def eager_node_args(layer: nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """CPP_LORA_LINEAR's arguments for `layer(x)` in the common case (see eager_layer_call), None otherwise. Device-
    blind, so the CPU suite can compare it with the general path."""
    adapter = single_plain_adapter(layer, "linear_with_lora")
    if adapter is None:
        return None
    base, a, b, scale, p = adapter
    kn = type(base) is not nn.Linear
    if kn and type(base) is not CONV1D:
        return None
    params = base._parameters
    weight, bias = params["weight"], params.get("bias")
    w_dtype = weight.dtype
    device_type = "cuda" if x.is_cuda else x.device.type  # (x.device builds a torch.device each time)
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif x.dtype != w_dtype:
        return None
    else:
        dtype = x.dtype
    if dtype not in FLOAT_DTYPES or w_dtype not in FLOAT_DTYPES or a.dtype not in FLOAT_DTYPES or \
            b.dtype not in FLOAT_DTYPES:
        return None
    if x.shape[-1] != weight.shape[0 if kn else 1]:
        return None
    kernels = dispatch.fused_kernels_for(x, weight.shape[1 if kn else 0], a.shape[0])
    return x, weight, bias, a, b, scale, p, kn, dtype, kernels
