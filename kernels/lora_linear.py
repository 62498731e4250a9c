"""Fused LoRA linear kernels (DESIGN.md §2): shrink with in-kernel dropout, GEMM with a low-rank epilogue, dA.

With W (N×K), A (R×K), B (N×R), scale s, dropout p and a Philox mask keyed by (seed, m·K + k):

    shrink      hs = s · (mask ⊙ x / (1−p)) Aᵀ                     (M×R; scale folded in)
    gemm        out = X Y (+ bias) + c · mask? ⊙ (H L)               forward: X=x, Y=Wᵀ, H=hs, L=Bᵀ, c=1, no mask
                                                                    dx:      X=dy, Y=W, H=dhs, L=A, c=s/(1−p), mask
                (FUSE_SHRINK: H = s·X Aᵀ accumulated in the same K loop, one launch, p = 0 only;
                 K = 0: the low-rank term alone, onto which a cuBLAS GEMM accumulates with beta = 1)
    dA          dA = s/(1−p) · dhsᵀ (mask ⊙ x)                      (R×K; partial sums over M splits)

The mask is never stored: `tl.rand(seed, m·K + k)` regenerates the same bits in the shrink, the dx epilogue and
dA. Every operand is loaded in its own dtype and cast to the compute dtype (the input's) before `tl.dot`, which
accumulates in fp32; fp32 inputs use IEEE fp32 dots unless torch allows TF32 matmuls.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET = tl.constexpr(_INTERPRET)
# PEFT_FAST_TRITON_AUTOTUNE=0 gives each kernel one fixed config: no benchmarking of candidates on a new shape
# (the GPU tests set it, so they time nothing and compile each kernel once per specialisation).
AUTOTUNE = os.environ.get("PEFT_FAST_TRITON_AUTOTUNE", "1") != "0"
MAX_RANK = 256  # largest (folded) rank the epilogue takes in one tile


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _m_bucket(m: int) -> int:
    """Autotuning key for M: tune once per power-of-two bucket, not once per sequence length."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


# ----------------------------------------------------------------------------------------------------- configs
def _gemm_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4)]
    shapes = [
        # large M (training / prefill)
        (128, 256, 64, 8, 3, 8),
        (256, 128, 64, 8, 3, 8),
        (128, 128, 64, 8, 4, 4),
        (128, 128, 64, 8, 3, 8),
        (64, 256, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        # small M (decode): narrow N tiles so the grid covers the SMs while W streams once
        (16, 64, 256, 1, 4, 4),
        (16, 32, 256, 1, 4, 4),
        (16, 128, 128, 1, 4, 4),
        (32, 64, 128, 1, 4, 4),
        (64, 64, 128, 8, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_stages=s, num_warps=w)
        for bm, bn, bk, g, s, w in shapes
    ]


def _prune_gemm_configs(configs, named_args, **kwargs):
    m = named_args["M"]
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    large = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    return (small if m <= 64 else large) or configs


def _stream_configs(block_k_large: int):
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32})]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_K": block_k_large}, num_stages=3, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bm, bk, s, w in [(64, block_k_large, 3, 4), (32, block_k_large, 4, 4), (64, 64, 4, 4), (128, 64, 3, 8),
                             (16, block_k_large, 4, 4)]
    ]


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _keep_mask(seed, offsets, p):
    return tl.rand(seed, offsets) >= p


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b with b cast to a's dtype; the interpreter computes 16-bit dots wrongly, so it gets fp32 operands
    (exactly the products the tensor cores form from 16-bit inputs, accumulated in fp32 as they do)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)


@triton.jit
def _dequant_4bit_tile(q_ptr, code_ptr, absmax_ptr, rows, cols, K, stride_r, stride_c, blocksize,
                       EVEN_K: tl.constexpr):
    """fp32 tile [rows × cols] of a bitsandbytes 4-bit weight whose element (r, c) has flat index
    r·stride_r + c·stride_c: byte idx // 2 (high nibble for even idx), code value × absmax[idx // blocksize]."""
    idx = rows[:, None] * stride_r + cols[None, :] * stride_c
    if EVEN_K:
        byte = tl.load(q_ptr + (idx >> 1)).to(tl.int32)
    else:
        byte = tl.load(q_ptr + (idx >> 1), mask=rows[:, None] < K, other=0).to(tl.int32)
    nibble = (byte >> (((idx & 1) ^ 1) * 4)) & 0xF
    value = tl.load(code_ptr + nibble) * tl.load(absmax_ptr + idx // blocksize)
    if not EVEN_K:
        value = tl.where(rows[:, None] < K, value, 0.0)
    return value


@triton.autotune(configs=_stream_configs(128), key=["M_BUCKET", "K", "BLOCK_R", "HAS_MASK"])
@triton.jit(do_not_specialize=["seed"])  # a new seed per call must not compile a new kernel
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    scale, p, seed,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk0 = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_MASK:
            offs = rm[:, None] * K + rk[None, :]
            x = tl.where(_keep_mask(seed, offs, p), x, tl.zeros_like(x))
        a = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & k_ok[:, None], other=0.0)
        acc = _dot(x, a, acc, PRECISION)
    if HAS_MASK:
        acc = acc * (scale / (1.0 - p))
    else:
        acc = acc * scale
    tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, acc.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rr[None, :] < R))


@triton.autotune(configs=_gemm_configs(),
                 key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_LORA", "HAS_MASK", "FUSE_SHRINK", "Y_4BIT"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["seed"])
def _gemm_lora_kernel(
    x_ptr, y_ptr, bias_ptr, h_ptr, l_ptr, a_ptr, out_ptr, code_ptr, absmax_ptr,
    M, N, K, R, M_BUCKET, quant_blocksize,
    stride_xm, stride_xk, stride_yk, stride_yn, stride_hm, stride_hr, stride_lr, stride_ln,
    stride_ar, stride_ak, stride_om, stride_on,
    lora_scale, shrink_scale, p, seed,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    Y_4BIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    # grouped tile order: GROUP_M row-tiles share each column tile while it sits in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    # rows/columns past the edge wrap around (their results are never stored), so the K loop's loads need no
    # M/N mask and, when BLOCK_K divides K, no mask at all. (No max_contiguous hint: a wrapped edge tile is not
    # contiguous, and a vectorised load on that promise could read past the end of the tensor.)
    rm_in = rm % M
    rn_in = rn % N
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    a_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
    b_ptrs = y_ptr + rk[:, None] * stride_yk + rn_in[None, :] * stride_yn
    s_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar  # Aᵀ tile, for the fused shrink
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        if Y_4BIT:  # Y is a 4-bit (NF4/FP4) weight: dequantize the tile in registers, never in memory
            b = _dequant_4bit_tile(y_ptr, code_ptr, absmax_ptr, k0 + rk, rn_in, K, stride_yk, stride_yn,
                                   quant_blocksize, EVEN_K)
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        acc = _dot(a, b, acc, PRECISION)
        if FUSE_SHRINK:  # h = x Aᵀ from the x tile already in registers (no dropout on this path)
            at = tl.load(s_ptrs, mask=(rk[:, None] < K - k0) & r_ok[None, :], other=0.0)
            h_acc = _dot(a, at, h_acc, PRECISION)
            s_ptrs += BLOCK_K * stride_ak
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_yk

    if HAS_LORA:
        if FUSE_SHRINK:  # rounded to the input dtype, as the separate shrink stores it
            h = (h_acc * shrink_scale).to(x_ptr.dtype.element_ty)
        else:
            h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        lw = tl.load(l_ptr + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        low_rank = _dot(h, lw, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
        if HAS_MASK:
            offs = rm[:, None] * N + rn[None, :]
            low_rank = tl.where(_keep_mask(seed, offs, p), low_rank, 0.0)
        acc += low_rank * lora_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_stream_configs(64), key=["M_BUCKET", "K", "BLOCK_R", "HAS_MASK"])
@triton.jit(do_not_specialize=["seed"])
def _grad_a_kernel(
    dh_ptr, x_ptr, out_ptr, M, K, R, M_BUCKET, rows_per_split,
    stride_dm, stride_dr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    p, seed,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    k_ok = rk < K
    r_ok = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_MASK:
            offs = rm[:, None] * K + rk[None, :]
            x = tl.where(_keep_mask(seed, offs, p), x, tl.zeros_like(x))
        dh = tl.load(dh_ptr + rm[None, :] * stride_dm + rr[:, None] * stride_dr,
                     mask=m_ok[None, :] & r_ok[:, None], other=0.0)
        acc = _dot(dh.to(x.dtype), x, acc, PRECISION)
    tl.store(out_ptr + split * stride_os + rr[:, None] * stride_or + rk[None, :] * stride_ok, acc,
             mask=r_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------- launchers
def shrink(x: torch.Tensor, a: torch.Tensor, scale: float, p: float, seed: int, out=None) -> torch.Tensor:
    """hs = scale · drop(x) aᵀ for x (M×K), a (R×K); dtype of x (written into `out` when given)."""
    m, k = x.shape
    r = a.shape[0]
    h = torch.empty((m, r), device=x.device, dtype=x.dtype) if out is None else out
    if m == 0:
        return h
    block_r = _block_r(r)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    _shrink_kernel[grid](
        x, a, h, m, k, r, _m_bucket(m),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), h.stride(0), h.stride(1),
        float(scale), float(p), int(seed),
        HAS_MASK=p > 0.0, PRECISION=_precision(x.dtype), BLOCK_R=block_r,
    )
    return h


def gemm_lora(x: torch.Tensor, y: torch.Tensor, bias, h, low, lora_scale: float, p: float, seed: int,
              out_dtype: torch.dtype, out=None, shrink_a=None, shrink_scale: float = 1.0) -> torch.Tensor:
    """out = x y (+ bias) + lora_scale · mask? ⊙ (h low), for x (M×K), y (K×N) views, h (M×R), low (R×N) views.

    With `shrink_a` (R×K) instead of h, h = shrink_scale · x shrink_aᵀ is computed inside the K loop from the x
    tiles the GEMM loads anyway (one launch, x read once; no dropout). x may have K = 0 columns: then out is the
    low-rank term alone (see `lowrank`)."""
    m, k = x.shape
    n = y.shape[1]
    out = torch.empty((m, n), device=x.device, dtype=out_dtype) if out is None else out
    if m == 0 or n == 0:
        return out
    quant = y if isinstance(y, Packed4bit) else None
    if quant is not None and y.shape[0] != k:
        raise ValueError(f"gemm_lora: x has {k} columns, the 4-bit weight view {y.shape[0]} rows")
    fuse = shrink_a is not None
    has_lora = h is not None or fuse
    r = (shrink_a.shape[0] if fuse else h.shape[1]) if has_lora else 0
    if r > MAX_RANK:
        raise ValueError(f"gemm_lora: rank {r} exceeds the fused epilogue's limit {MAX_RANK}")
    if fuse and p > 0.0:
        raise ValueError("gemm_lora: the fused shrink takes no dropout; run shrink() for p > 0")
    h_t = h if h is not None else x
    low_t = low if has_lora else x
    a_t = shrink_a if fuse else x
    strides = (
        h.stride(0) if h is not None else 0, h.stride(1) if h is not None else 0,
        low.stride(0) if has_lora else 0, low.stride(1) if has_lora else 0,
        a_t.stride(0) if fuse else 0, a_t.stride(1) if fuse else 0,
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if quant is not None:
        y_args, y_strides, blocksize = (quant.data, quant.code, quant.absmax), quant.strides, quant.blocksize
    else:
        y_args, y_strides, blocksize = (y, x, x), (y.stride(0), y.stride(1)), 1
    _gemm_lora_kernel[grid](
        x, y_args[0], bias if bias is not None else x, h_t, low_t, a_t, out, y_args[1], y_args[2],
        m, n, k, r, _m_bucket(m), blocksize,
        x.stride(0), x.stride(1), *y_strides, *strides, out.stride(0), out.stride(1),
        float(lora_scale), float(shrink_scale), float(p), int(seed),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_MASK=has_lora and p > 0.0, FUSE_SHRINK=fuse,
        Y_4BIT=quant is not None, PRECISION=_precision(x.dtype), BLOCK_R=_block_r(r),
    )
    return out


class Packed4bit(NamedTuple):
    """A bitsandbytes 4-bit weight W (N×K, packed row-major) seen as the GEMM's right operand: `transposed=False`
    is Wᵀ (K×N, the forward x Wᵀ), `transposed=True` is W (N×K, the input gradient dy W)."""

    data: torch.Tensor  # uint8, (N·K + 1) // 2 bytes
    code: torch.Tensor  # fp32 [16]
    absmax: torch.Tensor  # fp32, one per block (double quantization already undone)
    blocksize: int
    n: int
    k: int
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k) if self.transposed else (self.k, self.n)

    @property
    def strides(self) -> tuple[int, int]:
        """Flat-index strides of the logical view's (row, column)."""
        return (self.k, 1) if self.transposed else (1, self.k)

    def t(self) -> "Packed4bit":
        return self._replace(transposed=not self.transposed)


def lowrank(h: torch.Tensor, low: torch.Tensor, bias, lora_scale: float, p: float, seed: int,
            out_dtype: torch.dtype) -> torch.Tensor:
    """lora_scale · mask? ⊙ (h low) (+ bias) alone, M×N: the term a cuBLAS GEMM then accumulates onto (beta = 1)."""
    m, n = h.shape[0], low.shape[1]
    empty = h.new_empty((m, 0))
    return gemm_lora(empty, empty.new_empty((0, n)), bias, h, low, lora_scale, p, seed, out_dtype)


def grad_a(dh: torch.Tensor, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Σ_m dhᵀ (mask ⊙ x) in fp32 (R×K); the caller applies s/(1−p). Partial sums over M splits, then one sum."""
    m, k = x.shape
    r = dh.shape[1]
    block_r = _block_r(r)
    if m == 0:
        return torch.zeros((r, k), device=x.device, dtype=torch.float32)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    # enough (K-tile, M-split) programs to fill the GPU twice over, each split a whole number of 128-row blocks
    k_tiles = triton.cdiv(k, 64)
    splits = max(1, min(triton.cdiv(m, 128), triton.cdiv(2 * sms, k_tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), 128) * 128
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty((splits, r, k), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(k, meta["BLOCK_K"]), splits)

    _grad_a_kernel[grid](
        dh, x, partial, m, k, r, _m_bucket(m), rows_per_split,
        dh.stride(0), dh.stride(1), x.stride(0), x.stride(1), partial.stride(0), partial.stride(1),
        partial.stride(2), float(p), int(seed),
        HAS_MASK=p > 0.0, PRECISION=_precision(x.dtype), BLOCK_R=block_r,
    )
    return partial.sum(0) if splits > 1 else partial[0]
