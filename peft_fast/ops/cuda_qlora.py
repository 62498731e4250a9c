"""CUDA backend of `quantized_linear_with_lora` (a LoRA layer over a bitsandbytes 4-bit / 8-bit linear), and the flat
eager path of a LoRA Linear4bit layer:

* Every call the flat path below does not take: bitsandbytes computes the base output (its own dequantize +
  GEMM and autograd), and the LoRA term is added by ONE C++ autograd node (csrc/lora_autograd.cpp, `lora_add`):
  h = drop(x) Aᵀ, y = base_out + h Bsᵀ (Bs = s·B), backward gs = dy Bs, dB = s·dyᵀh, dA = gsᵀ drop(x),
  dx = drop(gs A) — the formulas of ops/cuda_lora.py without W. HF PEFT runs the same term as two nn.Linear
  modules, an nn.Dropout, a scaling and an add under autocast, each op issued from Python and each its own
  autograd node; the bench's QLoRA step is bound by that host work (wall 4× the GPU kernel time, H200).
  Under autocast an fp32 base output (the inputs after a prepared model's fp32 norms) gets the term added in fp32,
  as PEFT adds it. Auto mode takes this path on CUDA, for training and inference.
* The flat eager path of a LoRA Linear4bit layer (`eager_qlora_call`): one plain adapter, auto policy, and either
  at least QLORA_NODE_MIN_ROWS rows (training and prefill) or an inference call of at most QLORA_GEMV_MAX_ROWS rows
  (decode). ONE C++ node for the whole layer (csrc/lora_autograd.cpp `qlora_linear`), nothing in Python either way:
  - training / prefill: W dequantized from its 4 bits into a buffer for the one cuBLAS GEMM (csrc/dequant4.cu,
    bit-identical to bitsandbytes), y = x Wᵀ (+ bias) + the LoRA term as in ops/cuda_lora.py, backward dequantizing
    again for dx as bitsandbytes does. It replaces bitsandbytes' Python autograd Function (forward and backward) and
    the separate base output of the path above; at these sizes bitsandbytes itself dequantizes and calls cuBLAS, so
    the GPU work is the same and the host's is what goes.
  - decode: no dequantized copy. csrc/qgemv.cu multiplies x by the packed weight on tensor cores (each 4-bit code
    read once, the double-quantized absmax decoded in the kernel), then the LoRA term is added by the fused kernels.
  Between the two (17 to QLORA_NODE_MIN_ROWS − 1 rows, or a decode call that records a graph) bitsandbytes' own
  kernels + the LoRA-term node above.
* The forced cuda backend (PEFT_FAST_BACKEND=cuda / use_backend("cuda")) runs decode calls through the same GEMV kernel
  from Python (`_gemv`: `_C.qgemv_lora`, the LoRA term in its epilogue).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .common import FLOAT_DTYPES, compute_dtype, fold_terms, terms_reason
from . import dispatch, one_gemm
from .cuda_lora import single_plain_adapter
from .dispatch import Skip, forced_backend, register
from .extension import WHY_NO_EXTENSION, _C
from .terms import LoraTerm
from .torch_ref import add_quantized_terms

MAX_ROWS = 16


def _absmax_fp32(state) -> torch.Tensor:
    from .triton_qlora import _absmax_fp32 as cached

    return cached(state)


# the LoRA-term node and the whole-layer QLoRA node (csrc/lora_autograd.cpp); the CPU tests set them to a CPU build
CPP_LORA_ADD = getattr(_C, "lora_add", None)
CPP_QLORA_LINEAR = getattr(_C, "qlora_linear", None)


def _is_bnb_linear(base: nn.Module, kinds: tuple[str, ...] = ("Linear4bit", "Linear8bitLt")) -> bool:
    return type(base).__name__ in kinds and type(base).__module__.startswith("bitsandbytes")


def lora_add_reason(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> Optional[str]:
    """Why the base-output + LoRA-node path cannot take this call, or None."""
    if CPP_LORA_ADD is None:
        return Skip(WHY_NO_EXTENSION or "peft_fast._C has no lora_add (rebuild with pip install -e .)")
    if not x.is_cuda and forced_backend() != "cuda":
        return Skip(f"input on {x.device.type}")
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return Skip("traced or under a functorch transform: the torch ops, which the tracer sees through")
    if not _is_bnb_linear(base):
        return Skip(f"base layer is {type(base).__name__}, not a bitsandbytes Linear4bit / Linear8bitLt")
    if base._forward_hooks or base._forward_pre_hooks:
        return "the base layer has forward hooks"  # (they would run; but PEFT's order is not guaranteed then)
    return terms_reason(terms, None)


def gemv_reason(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> Optional[str]:
    """Why the decode GEMV cannot take this call, or None."""
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


def _use_gemv(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> bool:
    # the GEMV only where forced: auto mode does not take it before it is measured faster than bitsandbytes'
    return forced_backend() == "cuda" and gemv_reason(x, base, terms) is None


def supports(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> Optional[str]:
    return None if _use_gemv(x, base, terms) else lora_add_reason(x, base, terms)


@register("quantized_linear_with_lora", "cuda", supports=supports)
def quantized_linear_with_lora(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
    if _use_gemv(x, base, terms):
        return _gemv(x, base, terms)
    return _base_then_lora_node(x, base, terms)


def _base_then_lora_node(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
    result = base(x)
    dtype = compute_dtype(x)
    if not terms:
        return result
    if result.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return add_quantized_terms(x, result, base, terms)  # PEFT casts each term to the result's dtype here
    lora_a, lora_b, scale, lora_bias = fold_terms(terms, dtype)
    if lora_bias is not None:
        result = result + lora_bias
    kernels = dispatch.fused_kernels_for(x, lora_b.shape[0], lora_a.shape[0])
    return dispatch.call_node(CPP_LORA_ADD, x, result, lora_a, lora_b, scale, terms[0].dropout_p, dtype, kernels)


def _gemv(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
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


# set when the QLoRA node failed in a way its ATen retry did not cover (its dequantization kernel): the flat path is
# then off for the process, with one warning, and the path above (bitsandbytes + lora_add) runs every call
_QLORA_NODE_FAILED: Optional[str] = None


def eager_qlora_call(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A LoRA Linear4bit layer's whole forward as one CPP_QLORA_LINEAR call in the common case, None for the general
    path (see the module docstring; tests/test_cuda_qlora.py checks both give the same numbers)."""
    global _QLORA_NODE_FAILED
    if CPP_QLORA_LINEAR is None or not x.is_cuda or _QLORA_NODE_FAILED is not None:
        return None
    args = qlora_node_args(layer, x)
    if args is None:
        return None
    if dispatch.ONE_GEMM_MIN_ROWS is not None and args[-1]:  # (args: x, bias, A, B, … , dtype, dequant kernel, kernels)
        one_gemm.ensure(x, args[2].shape[0], False, args[16], args[2].dtype)
    try:
        out = dispatch.call_node(CPP_QLORA_LINEAR, *args)
    except torch.OutOfMemoryError:  # the step does not fit: not the node's failure (the bench's fits check)
        raise
    except Exception as err:  # noqa: BLE001 - the general path runs this call and every later one
        _QLORA_NODE_FAILED = dispatch.describe_failure(err)
        warnings.warn(f"peft_fast: the QLoRA node failed here ({_QLORA_NODE_FAILED}); bitsandbytes computes the base "
                      "output from now on")
        return None
    return out if out.dtype == x.dtype else out.to(x.dtype)  # bitsandbytes returns x's dtype


def _gemv_takes(x: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor, state) -> bool:
    """Whether the node's decode GEMM (csrc/qgemv.cu) takes a call of ≤ QLORA_GEMV_MAX_ROWS rows: one that records no
    graph, K and blocksize multiples of 32, the kernels allowed, an sm_80+ GPU (else bitsandbytes' kernels run it)."""
    bias = base._parameters.get("bias")
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False
    if x.shape[-1] % 32 or state.blocksize % 32 or dispatch.CUDA_KERNELS == "off":
        return False
    return not x.is_cuda or dispatch.kernels_run_on(x.device)


def qlora_node_args(layer: nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """CPP_QLORA_LINEAR's arguments for `layer(x)`, None where the general path runs (device-blind, for the CPU
    suite). Taken where it computes what bitsandbytes + HF PEFT compute, in bf16 or fp16: under autocast
    bitsandbytes' GEMM (dequantize, then F.linear) runs in autocast's dtype whatever the layer's compute_dtype and
    x's dtype (a prepared model's fp32 norms hand it fp32), and so does the LoRA term; without autocast both run in
    x's dtype, which must then be the layer's compute_dtype. The output comes back in x's dtype, as bitsandbytes
    returns it."""
    adapter = single_plain_adapter(layer, "quantized_linear_with_lora")
    if adapter is None:
        return None
    base, a, b, scale, p = adapter
    if not _is_bnb_linear(base, ("Linear4bit",)):
        return None
    weight = base._parameters["weight"]
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
        return None
    n, k = int(state.shape[0]), int(state.shape[1])
    if x.shape[-1] != k:
        return None
    rows = x.numel() // k
    if rows < dispatch.QLORA_NODE_MIN_ROWS and not (rows <= dispatch.QLORA_GEMV_MAX_ROWS and
                                                     _gemv_takes(x, base, a, b, state)):
        return None
    device_type = "cuda" if x.is_cuda else x.device.type
    if torch.is_autocast_enabled(device_type):  # bitsandbytes' F.linear runs under autocast, whatever compute_dtype
        dtype = torch.get_autocast_dtype(device_type)
        if not x.is_floating_point():
            return None
    else:  # bitsandbytes casts x to compute_dtype (None: x's own, once its first call has set it)
        dtype = x.dtype
        if base.compute_dtype not in (None, dtype):
            return None
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        return None
    nested = getattr(state, "state2", None) is not None
    absmax2 = code2 = offset = None
    blocksize2 = 0
    if nested:
        absmax2, code2, blocksize2, offset = state.state2.absmax, state.state2.code, state.state2.blocksize, state.offset
        if not isinstance(offset, torch.Tensor):
            return None
    kernels = dispatch.fused_kernels_for(x, n, a.shape[0])
    dequant_kernel = dispatch.CUDA_KERNELS != "off"
    return (x, base._parameters.get("bias"), a, b, weight, state.code, state.absmax, absmax2, code2, offset, n, k,
            state.blocksize, blocksize2, scale, p, dtype, dequant_kernel, kernels)
