"""The ops layer: every LoRA forward goes through these functions; `dispatch` picks the backend per call.

Tuner layers build `LoraTerm`s / `EmbeddingTerm`s from their state and call one function here; they never call a
kernel directly. The torch implementations (torch_ref) are always registered; kernel backends register themselves
when importable. `use_backend("torch" | "triton" | "cuda" | "auto")` forces a backend inside a `with` block.
"""

from . import torch_ref  # noqa: F401  (registers the torch backend)
from . import cuda_lora  # noqa: F401  (registers the cuBLAS-composed LoRA linear; needs nothing beyond torch)
from .dispatch import Skip, available_backends, choose, forced_backend, register, use_backend, use_cuda_kernels
from .terms import EmbeddingTerm, LoraTerm
from .dispatch import call as _call


def lora_linear(x, result, terms):
    """result + Σ s·B(A(drop(x))) over `terms` (one per active adapter); returns a tensor of result's dtype."""
    if not terms:
        return result
    return _call("lora_linear", x, result, terms)


def linear_with_lora(x, base_layer, terms):
    """The whole forward of a LoRA Linear / Conv1D layer: base_layer(x) + Σ s·B(A(drop(x))) over `terms`.

    The cuda backend runs it as one autograd node over cuBLAS (ops/cuda_lora.py); the Triton backend as Triton
    kernels behind custom ops (ops/triton_lora.py)."""
    return _call("linear_with_lora", x, base_layer, terms)


def quantized_linear_with_lora(x, base_layer, terms):
    """The whole forward of a LoRA layer over a bitsandbytes 4-bit / 8-bit linear (QLoRA)."""
    return _call("quantized_linear_with_lora", x, base_layer, terms)


def quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False):
    """(packed uint8 bytes shaped (n/2, 1), QuantState4bit) of `weight`, byte-compatible with bitsandbytes."""
    return _call("quantize_4bit", weight, blocksize, quant_type, compress_statistics)


def dequantize_4bit(packed, state, dtype=None):
    """A whole bitsandbytes 4-bit weight in `dtype` (default: the dtype it was quantized from)."""
    return _call("dequantize_4bit", packed, state, dtype)


def loha_delta_weight(w1a, w1b, w2a, w2b, scale, t1=None, t2=None):
    """LoHa's weight delta (Hadamard product of two low-rank products, times scale)."""
    return _call("loha_delta_weight", w1a, w1b, w2a, w2b, scale, t1, t2)


def lokr_delta_weight(w1, w2, scale):
    """LoKr's weight delta (Kronecker product of two factors, times scale)."""
    return _call("lokr_delta_weight", w1, w2, scale)


def lora_linear_mixed_batch(x, result, groups):
    """Mixed-batch inference: `groups` is [(row indices, LoraTerm)]; adds each row's own adapter term."""
    return _call("lora_linear_mixed_batch", x, result, groups)


def lora_embedding(x, result, terms, base_layer):
    if not terms:
        return result
    return _call("lora_embedding", x, result, terms, base_layer)


def lora_embedding_mixed_batch(x, result, groups, base_layer):
    return _call("lora_embedding_mixed_batch", x, result, groups, base_layer)


try:  # the Triton backend registers itself when Triton is importable
    from . import triton_lora, triton_qlora  # noqa: F401
except ImportError:  # pragma: no cover - Triton missing
    triton_lora = triton_qlora = None
from . import cuda_qlora  # noqa: E402,F401  (registers only a Skip-ing backend when peft_fast._C is not built)

__all__ = [
    "Skip",
    "linear_with_lora",
    "quantized_linear_with_lora",
    "quantize_4bit",
    "dequantize_4bit",
    "loha_delta_weight",
    "lokr_delta_weight",
    "LoraTerm",
    "EmbeddingTerm",
    "lora_linear",
    "lora_linear_mixed_batch",
    "lora_embedding",
    "lora_embedding_mixed_batch",
    "available_backends",
    "choose",
    "forced_backend",
    "register",
    "use_backend",
    "use_cuda_kernels",
]
