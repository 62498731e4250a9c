"""Triton quantization and dequantization of bitsandbytes 4-bit (NF4 / FP4) weights, whole matrices in one pass.

Used where a full weight is what is wanted (merging an adapter into a 4-bit layer on a GPU: dequantize, add,
quantize); the GEMMs never need it, they dequantize tiles in registers (`lora_linear._dequant_4bit_tile`). The
arithmetic is the torch reference's (`peft_fast.quantization`), operation for operation, so results are
bit-identical: dequantization is code value × block absmax in fp32 then one rounding; quantization scales each
block by its absmax (x · (1/absmax); the short tail block x / absmax) and takes the nearest code (ties down), the
8-bit blockwise quantizer of double quantization likewise with the 256-value dynamic code.
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


@triton.jit
def _quantize_blockwise_kernel(x_ptr, bounds_ptr, order_ptr, q_ptr, absmax_ptr, n,
                               BLOCK: tl.constexpr, NBOUNDS: tl.constexpr, PACK4: tl.constexpr):
    """One quantization block per program: absmax, scale, nearest code index (original code order), store."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    tail = (pid + 1) * BLOCK > n
    safe = tl.maximum(amax, 1e-38)
    scaled = tl.where(tail, x / safe, x * (1.0 / safe))
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    b = tl.arange(0, NBOUNDS)
    bounds = tl.load(bounds_ptr + b)
    rank = tl.sum((bounds[None, :] < scaled[:, None]).to(tl.int32), axis=1)  # torch.bucketize(right=False)
    q = tl.load(order_ptr + rank)
    tl.store(absmax_ptr + pid, tl.where(tail, safe, amax))
    if PACK4:  # two codes a byte, element 2j in the high nibble
        hi, lo = tl.split(tl.reshape(q, (BLOCK // 2, 2)))
        byte_offs = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
        tl.store(q_ptr + byte_offs, ((hi << 4) | lo).to(tl.uint8), mask=byte_offs < (n + 1) // 2)
    else:
        tl.store(q_ptr + offs, q.to(tl.uint8), mask=offs < n)


def _bounds_and_order(code: torch.Tensor, pad_to: int):
    """Midpoints of the sorted code (padded with +inf to a power of two) and sorted → original index."""
    order = torch.argsort(code)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    pad = torch.full((pad_to - bounds.numel(),), float("inf"), device=code.device)
    return torch.cat([bounds, pad]).contiguous(), order.to(torch.int32).contiguous()


def quantize_blockwise(flat: torch.Tensor, code: torch.Tensor, blocksize: int, pack4: bool):
    """(codes — packed nibbles if pack4 — , fp32 absmax per block) of a flat tensor."""
    n = flat.numel()
    blocks = triton.cdiv(n, blocksize)
    bounds, order = _bounds_and_order(code.to(flat.device, torch.float32), triton.next_power_of_2(code.numel()))
    q = torch.empty(((n + 1) // 2,) if pack4 else (n,), device=flat.device, dtype=torch.uint8)
    absmax = torch.empty(blocks, device=flat.device, dtype=torch.float32)
    if n:
        _quantize_blockwise_kernel[(blocks,)](flat.contiguous(), bounds, order, q, absmax, n, BLOCK=blocksize,
                                              NBOUNDS=bounds.numel(), PACK4=pack4)
    return q, absmax
