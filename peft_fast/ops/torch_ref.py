"""Plain-torch implementations of the LoRA ops: the reference every kernel is tested against, and the CPU path.

The arithmetic and its order are PEFT's (result + lora_B(lora_A(dropout(x))) * scaling, accumulated in the
adapter's dtype and cast back to the base output's dtype), so outputs match HF PEFT bit for bit on the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import register
from .terms import EmbeddingTerm, LoraTerm


@register("lora_linear", "torch")
def lora_linear(x: torch.Tensor, result: torch.Tensor, terms: list[LoraTerm]) -> torch.Tensor:
    """result + Σ_i s_i · B_i(A_i(drop_i(x))) for Linear / Conv1D / ConvNd adapters (A, B are modules)."""
    out_dtype = result.dtype
    for term in terms:
        if x.dtype != term.dtype:
            x = x.to(term.dtype)
        result = result + term.lora_B(term.lora_A(term.dropout(x))) * term.scaling
    return result.to(out_dtype)


@register("linear_with_lora", "torch")
def linear_with_lora(x: torch.Tensor, base_layer: nn.Module, terms: list[LoraTerm]) -> torch.Tensor:
    """base_layer(x) + Σ_i s_i · B_i(A_i(drop_i(x))): the whole LoRA Linear / Conv1D forward."""
    return lora_linear(x, base_layer(x), terms)


@register("quantized_linear_with_lora", "torch")
def quantized_linear_with_lora(x: torch.Tensor, base_layer: nn.Module, terms: list[LoraTerm], *args, **kwargs):
    """A bitsandbytes 4/8-bit base layer plus LoRA terms, in PEFT's order for these layers: the base output is
    cloned (4-bit), and each term is cast to its dtype before being added unless autocast is on."""
    return add_quantized_terms(x, base_layer(x, *args, **kwargs), base_layer, terms)


def add_quantized_terms(x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module, terms: list[LoraTerm]):
    """The LoRA terms added to a bitsandbytes layer's output `result`, PEFT's way (see quantized_linear_with_lora)."""
    if hasattr(getattr(base_layer, "weight", None), "quant_state"):
        result = result.clone()  # as PEFT: backprop through the 4-bit matmul's output view can fail otherwise
    convert = not torch.is_autocast_enabled(x.device.type)
    for term in terms:
        xa = x.to(term.dtype) if convert and x.dtype != term.dtype else x
        output = term.lora_B(term.lora_A(term.dropout(xa))) * term.scaling
        result = result + (output.to(result.dtype) if convert else output)
    return result


@register("lora_linear_mixed_batch", "torch")
def lora_linear_mixed_batch(
    x: torch.Tensor, result: torch.Tensor, groups: list[tuple[list[int], LoraTerm]]
) -> torch.Tensor:
    """Per-row adapters: rows `idx` of `result` get the term of their adapter (rows of "__base__" get none)."""
    out_dtype = result.dtype
    for rows, term in groups:
        sub_batch = x[rows].to(term.dtype)
        delta = term.lora_B(term.lora_A(term.dropout(sub_batch))) * term.scaling
        result[rows] += delta.to(out_dtype)
    return result


def _embed(x: torch.Tensor, weight: torch.Tensor, base_layer) -> torch.Tensor:
    return F.embedding(
        x,
        weight,
        padding_idx=base_layer.padding_idx,
        max_norm=base_layer.max_norm,
        norm_type=base_layer.norm_type,
        scale_grad_by_freq=base_layer.scale_grad_by_freq,
        sparse=base_layer.sparse,
    )


@register("lora_embedding", "torch")
def lora_embedding(x: torch.Tensor, result: torch.Tensor, terms: list[EmbeddingTerm], base_layer) -> torch.Tensor:
    """result + Σ_i s_i · embed(x, A_iᵀ) B_iᵀ (· embed_scale) for nn.Embedding adapters."""
    out_dtype = result.dtype
    for term in terms:
        delta = (_embed(x, term.lora_A.T, base_layer) @ term.lora_B.T) * term.scaling
        if term.embed_scale is not None:
            delta = delta * term.embed_scale.to(delta.dtype)
        result = result + delta
    return result.to(out_dtype)


@register("lora_embedding_mixed_batch", "torch")
def lora_embedding_mixed_batch(
    x: torch.Tensor, result: torch.Tensor, groups: list[tuple[list[int], EmbeddingTerm]], base_layer
) -> torch.Tensor:
    for rows, term in groups:
        delta = (_embed(x[rows], term.lora_A.T, base_layer) @ term.lora_B.T) * term.scaling
        if term.embed_scale is not None:
            delta = delta * term.embed_scale.to(delta.dtype)
        result[rows] += delta
    return result


@register("loha_delta_weight", "torch")
def loha_delta_weight(w1a, w1b, w2a, w2b, scale: float, t1=None, t2=None) -> torch.Tensor:
    """LoHa's ΔW = (W1a W1b) ⊙ (W2a W2b) · scale; with Tucker cores t1/t2 (effective conv) each factor is rebuilt
    from its core first. Flat (out × in·k) or conv-shaped; the caller reshapes to the base weight's shape."""
    if t1 is not None:
        rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        return rebuild1 * rebuild2 * scale
    return ((w1a @ w1b) * (w2a @ w2b)) * scale


@register("lokr_delta_weight", "torch")
def lokr_delta_weight(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """LoKr's ΔW = (W1 ⊗ W2) · scale (Kronecker product; W1 broadcast over a conv kernel)."""
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return _kron(w1, w2) * scale


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.kron's values (each a single product a[i]·b[j]) by broadcasting; torch.kron itself fails on some
    trailing size-1 layouts (HF PEFT crashes on rank-1 effective-conv LoKr Conv1d because of it)."""
    if a.dim() < b.dim():  # as torch.kron: the smaller operand gets leading 1-dims
        a = a.reshape((1,) * (b.dim() - a.dim()) + tuple(a.shape))
    elif b.dim() < a.dim():
        b = b.reshape((1,) * (a.dim() - b.dim()) + tuple(b.shape))
    a_view = [s for d in a.shape for s in (d, 1)]
    b_view = [s for d in b.shape for s in (1, d)]
    return (a.reshape(a_view) * b.reshape(b_view)).reshape([x * y for x, y in zip(a.shape, b.shape)])


def lokr_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W2 of an effective-conv LoKr layer rebuilt from its Tucker core."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


@register("dequantize_4bit", "torch")
def dequantize_4bit(packed: torch.Tensor, state, dtype=None) -> torch.Tensor:
    """A bitsandbytes 4-bit weight, dequantized (peft_fast.quantization's reference arithmetic)."""
    from ..quantization import dequantize_4bit as reference

    return reference(packed, state, dtype)


@register("quantize_4bit", "torch")
def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False):
    """(packed bytes, QuantState4bit) of a weight in bitsandbytes' layout (peft_fast.quantization's reference)."""
    from ..quantization import quantize_4bit as reference

    return reference(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics)
