"""LoftQ initialization (`init_lora_weights="loftq"`, https://arxiv.org/abs/2310.08659; PEFT's module path).

For a full-precision weight W, alternately quantize the part the adapter does not explain and take the best rank-r
approximation of what quantization lost: Q = deq(quant(W − BA)), then B, A from the SVD of W − Q. The base weight
becomes Q (the values a 4-/8-bit model will hold once quantized) and the adapter starts as that rank-r correction.
Quantization is bitsandbytes' (NF4 with blocksize 64 and no double quantization, or LLM.int8()'s row-wise int8),
done by peft_fast's own code on the weight's device: no GPU required.
"""

from __future__ import annotations

import torch

from .. import quantization as Q


def quantize_dequantize(weight: torch.Tensor, num_bits: int) -> torch.Tensor:
    """fp32 `weight` through bitsandbytes' quantizer and back: NF4 (blocksize 64) or row-wise int8."""
    if num_bits == 4:
        packed, state = Q.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        return Q.dequantize_4bit(packed, state, dtype=torch.float32)
    scale = weight.abs().amax(dim=1, keepdim=True)
    codes = torch.round(weight * (127.0 / scale.clamp_min(torch.finfo(torch.float32).tiny)))
    return codes * scale * (1.0 / 127)


def low_rank_decomposition(weight: torch.Tensor, reduced_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L·R the best rank-`reduced_rank` approximation of `weight`, the singular values split evenly."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:reduced_rank].sqrt()
    return u[:, :reduced_rank] * root, root[:, None] * vh[:reduced_rank]


@torch.no_grad()
def loftq_init(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1):
    """(Q in weight's dtype, lora_A = R, lora_B = L) after `num_iter` rounds of quantize / SVD."""
    if num_bits not in (4, 8):
        raise ValueError(f"LoftQ quantizes to 4 bits (NF4) or 8 bits (int8), got loftq_bits={num_bits!r}")
    if num_iter <= 0:
        raise ValueError(f"LoftQ needs at least one iteration, got loftq_iter={num_iter!r}")
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    full = weight.detach().float()
    residual = full
    for step in range(num_iter):
        dequantized = quantize_dequantize(residual, num_bits)
        lora_b, lora_a = low_rank_decomposition(full - dequantized, reduced_rank)
        if step + 1 < num_iter:
            residual = full - lora_b @ lora_a
    return dequantized.to(weight.dtype), lora_a, lora_b
