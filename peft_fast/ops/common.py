"""Backend-neutral helpers of the fused LoRA linear paths (cuda_lora, triton_lora, triton_qlora, cuda_qlora): what a
call looks like (compute dtype, weight layout), whether its adapter terms can be fused, and how several adapters
fold into one term. No kernel imports here, so each backend can load without the others."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dispatch import Skip
from .terms import LoraTerm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_SEED = torch.zeros((), dtype=torch.int64)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover
        return None


CONV1D = _conv1d_class()


def weight_kn(base: nn.Module) -> bool:
    """True for transformers' Conv1D, whose weight is stored K×N (in × out)."""
    return CONV1D is not None and type(base) is CONV1D


def param(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """`module.<name>` for a parameter slot (None when registered as None) without nn.Module.__getattr__, which
    costs ~0.5 µs a lookup; the fused paths read about ten per forward. Anything else falls back to getattr."""
    try:
        return module._parameters[name]
    except KeyError:
        return getattr(module, name)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when autocast is on for x's device, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def linear_reason(x: torch.Tensor, base: nn.Module, terms: list[LoraTerm], max_rank: Optional[int]) -> Optional[str]:
    """Why a fused LoRA linear (nn.Linear / Conv1D base) cannot take this call, or None. (Runs on every call: each
    attribute is read once.)"""
    kn = weight_kn(base)
    if type(base) is not nn.Linear and not kn:
        return f"base layer is {type(base).__name__}, the fused path takes nn.Linear or transformers Conv1D"
    if base._forward_hooks or base._forward_pre_hooks:
        return "the base layer has forward hooks, which the fused path would bypass"
    weight = param(base, "weight")
    dtype, w_dtype = compute_dtype(x), weight.dtype
    if dtype not in FLOAT_DTYPES or w_dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} / base weight {w_dtype} is not fp16, bf16 or fp32"
    if x.dtype != w_dtype and not torch.is_autocast_enabled(x.device.type):
        return f"input dtype {x.dtype} differs from the base weight's {w_dtype}"
    if x.shape[-1] != weight.shape[0 if kn else 1]:
        return f"input width {x.shape[-1]} does not match the base layer"
    return terms_reason(terms, max_rank)


def terms_reason(terms: list[LoraTerm], max_rank: Optional[int]) -> Optional[str]:
    """Why the fused paths cannot take these adapter terms (of at most `max_rank` in all, None: any), or None."""
    rank = 0
    for term in terms:
        if isinstance(term.scaling, torch.Tensor):  # prepare_model_for_compiled_hotswap's tensor scalings
            return Skip("the adapter's scaling is a tensor: the fused paths would read it on the host (a device sync "
                        "per layer); the torch path multiplies by it")
        lora_a, lora_b = term.lora_A, term.lora_B
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return "adapter weights are not nn.Linear"
        dropout = term.dropout
        if type(dropout) is not nn.Identity and not isinstance(dropout, nn.Dropout):
            return f"dropout module {type(dropout).__name__} is not nn.Dropout"
        weight_a = param(lora_a, "weight")
        if weight_a.dtype not in FLOAT_DTYPES or param(lora_b, "weight").dtype not in FLOAT_DTYPES:
            return f"adapter dtype {weight_a.dtype} is not fp16, bf16 or fp32"
        rank += weight_a.shape[0]
    if len(terms) > 1 and any(t.dropout_p > 0 for t in terms):
        return "several active adapters with dropout in training: each needs its own mask"
    if max_rank is not None and rank > max_rank:
        return f"total rank of the active adapters exceeds {max_rank}"
    return None


def fold_terms(terms: list[LoraTerm], dtype: torch.dtype):
    """(A, B, scale, lora-bias) of one term; several adapters become one term of their summed rank (each scale
    folded into its B). Differentiable torch code: gradients reach every adapter's A and B."""
    if len(terms) == 1:
        t = terms[0]
        lora_b = t.lora_B
        bias = param(lora_b, "bias")
        return param(t.lora_A, "weight"), param(lora_b, "weight"), t.scaling, \
            None if bias is None else bias.to(dtype) * t.scaling
    a = torch.cat([t.lora_A.weight.to(dtype) for t in terms], 0)
    b = torch.cat([t.lora_B.weight.to(dtype) * t.scaling for t in terms], 1)
    biases = [t.lora_B.bias.to(dtype) * t.scaling for t in terms if t.lora_B.bias is not None]
    return a, b, 1.0, (sum(biases) if biases else None)


def no_grad_needed(*tensors: Optional[torch.Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def new_seed(p: float) -> int:
    """A dropout seed from torch's CPU generator (torch.manual_seed makes masks reproducible); 0 without dropout."""
    return int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0


def new_seed_tensor(p: float) -> torch.Tensor:
    """The same as a CPU tensor, for the custom ops (a Python int would be specialised by torch.compile)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else _NO_SEED
