"""Triton dequantization of a bitsandbytes 4-bit (NF4 / FP4) weight: the whole matrix, in one pass.

Used where a full dequantized weight is what is wanted (merging an adapter into a 4-bit layer on a GPU); the GEMMs
never need it, they dequantize tiles in registers (`lora_linear._dequant_4bit_tile`). The arithmetic is the torch
reference's (`peft_fast.quantization.dequantize_4bit`): code value × block absmax in fp32, then one rounding to the
output dtype, so results are bit-identical.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dequant_4bit_kernel(q_ptr, code_ptr, absmax_ptr, out_ptr, n, blocksize, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)  # flat element index
    ok = idx < n
    byte = tl.load(q_ptr + (idx >> 1), mask=ok, other=0).to(tl.int32)
    nibble = (byte >> (((idx & 1) ^ 1) * 4)) & 0xF  # element 2j sits in the high nibble
    value = tl.load(code_ptr + nibble) * tl.load(absmax_ptr + idx // blocksize, mask=ok, other=0.0)
    tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_4bit(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                    shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """W (`shape`, `dtype`) from its packed bytes, fp32 code table and fp32 per-block absmax."""
    n = 1
    for d in shape:
        n *= d
    # Triton's interpreter truncates fp32 → bf16 instead of rounding to nearest even (the GPU rounds): there the
    # kernel writes fp32 and torch does the one rounding
    kernel_dtype = torch.float32 if INTERPRET and dtype != torch.float32 else dtype
    out = torch.empty(shape, device=packed.device, dtype=kernel_dtype)
    if n == 0:
        return out.to(dtype)
    q = packed.reshape(-1)
    q = q if q.dtype == torch.uint8 else q.view(torch.uint8)
    block = 1024

    _dequant_4bit_kernel[(triton.cdiv(n, block),)](
        q, code.to(torch.float32).contiguous(), absmax.to(torch.float32).contiguous(), out, n, blocksize, BLOCK=block,
    )
    return out.to(dtype)
