"""One GEMM with the LoRA term inside it, for Hopper: out = X·Y (+ the low-rank term) (+ bias), on TMA descriptors
and a persistent grid (KERNELS.md, candidate design 2). The C++ node takes it once Python has registered the
compiled kernels (register_for_node) and set a row threshold (`_C.lora_kernels_set_tma_rows`; peft_fast/ops/one_gemm.py
does both on a layer's first call, dispatch.ONE_GEMM_MIN_ROWS has the measurements);
scripts/probe_lora_kernels.py `tma` times it against cuBLAS and the default route; tests/test_kernels_lora_gemm_tma.py
checks it against `reference` below (interpreter on the CPU, real sizes on the GPU).

    forward   out = x Wᵀ + hs Bᵀ (+ bias)               X = x (M×K), Y = W (N×K, "k-major"), H = hs (M×R), L = B (N×R)
    dx        out = dy W + drop(gs A) = dy W + (gs A) ⊙ keep / (1−p)
                                                      X = dy (M×N'), Y = W (N'×K', row-major), H = gs, L = Aᵀ … as
                                                      L = A stored (R×K') read transposed, keep bits (M × K'/8)

Why: the default route writes the low-rank term (M×N) and lets cuBLAS add its GEMM onto it (beta = 1): one extra
write and one extra read of the output, ~40 µs a direction at 8192×4096 on an H100, which puts a floor of ~1.19× the
bare layer under fwd+bwd. Here the term is one more MMA step after the K loop, into the same fp32 tile (with dropout
the first step instead, scaled by the keep bits before the K loop accumulates onto it), and the output is written
once. It wins only if the GEMM itself keeps up with cuBLAS, hence TMA loads, 128×256 tiles, a persistent grid with
grouped tile order.

Producing h (PRODUCE_H; the node's route without dropout, dispatch.ONE_GEMM_PRODUCE_MIN_ROWS): the GEMM makes H itself,
hs = s·x·Aᵀ in the forward, gs = s·dy·B in dx, so that no shrink kernel reads x or dy once more before it (42 µs at
8192×4096 on an H100). Tile t < ⌈M/BM⌉ is column block 0 of row block t, the producer: one narrow MMA more a K step
(X's tile against the adapter's BK×BR tile), then H stored and a flag per row block set (release); every other tile
of the row block, numbered after all producers, waits for the flag (acquire) only at its term step. Waiting on lower
tile numbers cannot deadlock while every program of the persistent grid (one a multiprocessor at most) is resident.
Where the row blocks are fewer than half the programs (2048 rows: 16 of 132), one producer a row block would hold up
every tile of the first round by its extra MMAs, so the work is split: column blocks 0 … S−1 (S = producer_splits,
at most MAX_SPLITS) each make h's partial sum over 1/S of the K steps (their K loop starts at their slice and wraps
round), store it in fp32 behind the flags and count themselves in (release); every tile of the row block, producers
included, waits for the count to reach S and sums the S partials in order (the same bits in every tile; producer 0
stores h). All S·⌈M/BM⌉ producers are numbered first and fit the grid's first round, so each waits only on programs
running beside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import _block_r

try:  # host-side TMA descriptors (Triton ≥ 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: lora_gemm is not available (the C++ route needs none)
    TensorDescriptor = None

# Tile shape and pipeline depth by default (Hopper, bf16): the probe sweeps others
# (FLATTEN: the tile and K loops pipelined as one, so the next tile's loads start under this one's epilogue;
# WARP_SPECIALIZE: producer / consumer warps for the K loop, where the Triton build supports it on the GPU;
# EARLY_H: the producing kernels' other tiles ask for h as they start, not after their K loop: measured neutral, so
# off: layer fwd+bwd GPU µs on an H100, split producers → early, M8192 K=N=4096 907.9 → 908.5, N14336 3028 → 2956,
# M4096 475.8 → 473.4, M2048 K4096 N11008 620.2 → 615.4, all within the bare layer's own spread between runs)
DEFAULT_CONFIG = {"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8, "FLATTEN": False, "WARP_SPECIALIZE": False,
                  "EARLY_H": False, "num_stages": 3, "num_warps": 8}
# dx with dropout bits: the same tiles. At 128×256 the expanded bits spill 96 bytes beside the accumulator (ptxas
# sm_90a), at 128×128 with 4 stages nothing, yet 128×256 ran faster (H100, 8192×4096×4096: 408.6 µs against 450.8
# alone; the layer's fwd+bwd at p 0.1 GPU 975 µs against 1018, bench/RESULTS.md 2026-12-07)
KEEP_CONFIG = dict(DEFAULT_CONFIG)
# The most producers a row block (PRODUCE_H): S = min(MAX_SPLITS, programs // row blocks, column blocks, K steps)
MAX_SPLITS = 8


HOPPER_SHARED_BYTES = 232448  # a Hopper block's shared memory limit


def device_shared_limit(device: torch.device) -> int:
    """The most shared memory a block may opt in to on this GPU, in bytes, as Triton's driver reports it (232,448 on
    an H100 or H200; about 99 KiB on a consumer Blackwell, sm_120)."""
    from triton.runtime import driver

    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def _fitting_config(config: dict | None, rank_block: int, has_keep: bool = False, produce: bool = False) -> dict:
    """The tile config (None: KEEP_CONFIG with keep bits, else DEFAULT_CONFIG) with its pipeline made shallow enough
    for the term's operands: h (BM×BR) and L (BR×BN) are loaded before the K loop and sit in shared memory beside the
    K loop's stages and the output tile, so at 128×256×64 three stages fit rank block 16 but not 32 or 64 (262,168
    bytes asked at 64); those get two. A producing kernel's stages hold its adapter's BK×BR tile too (231,472 bytes
    in all at rank block 16, fp32 adapters, three stages: they still fit)."""
    cfg = dict(config if config is not None else KEEP_CONFIG if has_keep else DEFAULT_CONFIG)

    def shared(stages):
        src = 2 * stages * cfg["BK"] * rank_block if produce else 0
        return 2 * (stages * (cfg["BM"] + cfg["BN"]) * cfg["BK"] + cfg["BM"] * cfg["BN"]
                    + (cfg["BM"] + cfg["BN"]) * rank_block) + src
    while cfg["num_stages"] > 2 and shared(cfg["num_stages"]) > HOPPER_SHARED_BYTES:
        cfg["num_stages"] -= 1
    return cfg


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk the columns together, so their X rows and Y columns stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _lora_gemm_kernel(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr, src_desc, flags_ptr,
                      M, N, K, R, keep_stride, keep_scale, h_scale,
                      Y_KMAJOR: tl.constexpr, L_RMAJOR: tl.constexpr, HAS_LORA: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, PRODUCE_H: tl.constexpr,
                      SRC_RMAJOR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                      FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, MAX_SPLITS: tl.constexpr,
                      EARLY_H: tl.constexpr):
    _lora_gemm_tiles(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr, src_desc, flags_ptr, M, N, K, R,
                     keep_stride, keep_scale, h_scale, Y_KMAJOR, L_RMAJOR, HAS_LORA, HAS_BIAS, HAS_KEEP, PRODUCE_H,
                     SRC_RMAJOR, BM, BN, BK, BR, GROUP_M, NUM_PROGRAMS, FLATTEN, WARP_SPECIALIZE, MAX_SPLITS, EARLY_H)


@triton.jit
def _lora_gemm_ptr_kernel(x_ptr, y_ptr, h_ptr, l_ptr, out_ptr, bias_ptr, keep_ptr, src_ptr, flags_ptr,
                          M, N, K, R, keep_stride, keep_scale, h_scale,
                          Y_KMAJOR: tl.constexpr, L_RMAJOR: tl.constexpr, HAS_LORA: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, PRODUCE_H: tl.constexpr,
                          SRC_RMAJOR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                          FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, MAX_SPLITS: tl.constexpr,
                          EARLY_H: tl.constexpr):
    """The same GEMM over plain pointers, its descriptors made on the device: the form a C++ caller launches
    (compile_for_cpp), whose arguments are pointers and numbers only."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    if Y_KMAJOR:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    else:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    if PRODUCE_H:  # (the producer's adapter by TMA too: per-element addresses spilled registers in dx, ptxas sm_90a)
        if SRC_RMAJOR:
            src_desc = tl.make_tensor_descriptor(src_ptr, shape=[R, K], strides=[K, 1], block_shape=[BR, BK])
        else:
            src_desc = tl.make_tensor_descriptor(src_ptr, shape=[K, R], strides=[R, 1], block_shape=[BK, BR])
    else:
        src_desc = src_ptr
    _lora_gemm_tiles(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr, src_desc, flags_ptr, M, N, K, R,
                     keep_stride, keep_scale, h_scale, Y_KMAJOR, L_RMAJOR, HAS_LORA, HAS_BIAS, HAS_KEEP, PRODUCE_H,
                     SRC_RMAJOR, BM, BN, BK, BR, GROUP_M, NUM_PROGRAMS, FLATTEN, WARP_SPECIALIZE, MAX_SPLITS, EARLY_H)


@triton.jit
def _tile_of(tile, num_m, num_n, splits, PRODUCE_H: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile `tile`'s (row, column) block. With PRODUCE_H the first num_m·splits tiles are the producers, column blocks
    0 … splits−1 of each row block, so that every other tile's producers have lower numbers; the rest in grouped
    order."""
    if PRODUCE_H:
        if tile < num_m * splits:
            pid_m = tile // splits
            pid_n = tile % splits
        else:
            pid_m, pid_n = _tile_coords(tile - num_m * splits, num_m, num_n - splits, GROUP_M)
            pid_n += splits
    else:
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
    return pid_m, pid_n


@triton.jit
def _producer_splits(num_m, num_n, k_tiles, NUM_PROGRAMS: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """Producers a row block (producer_splits below: the host's copy, which sizes their scratch)."""
    return tl.maximum(tl.minimum(tl.minimum(NUM_PROGRAMS // num_m, MAX_SPLITS), tl.minimum(num_n, k_tiles)), 1)


def producer_splits(m: int, n: int, k: int, bm: int, bn: int, bk: int, num_programs: int,
                    max_splits: int = MAX_SPLITS) -> int:
    """_producer_splits on the host, for M×N outputs over K in BM×BN tiles and BK steps."""
    num_m, num_n, k_tiles = -(-m // bm), -(-n // bn), -(-k // bk)
    return max(min(num_programs // num_m, max_splits, num_n, k_tiles), 1)


def producer_scratch_words(m: int, bm: int, br: int, splits: int) -> tuple[int, int]:
    """A producing launch's scratch in 4-byte words: (the counters, one a row block, zeroed before the launch, padded
    to 16 bytes; all of it, the fp32 partial sums of h after them when splits > 1)."""
    num_m = -(-m // bm)
    counters = -(-num_m // 4) * 4
    return counters, counters + (num_m * splits * bm * br if splits > 1 else 0)


@triton.jit
def _k_loop(x_desc, y_desc, src_desc, acc, m0, n0, k_lo, k_hi, k_tiles, Y_KMAJOR: tl.constexpr,
            PRODUCE: tl.constexpr, WRAP: tl.constexpr, SRC_RMAJOR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
            BR: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """acc += X[m0:, ks]·Y[ks, n0:] over K steps k_lo … k_hi−1 (WRAP: taken modulo k_tiles); with PRODUCE also
    X[m0:, ks]·src[:, ks]ᵀ (BM×BR, fp32) from the same X tiles."""
    h_acc = tl.zeros((BM, BR), dtype=tl.float32)
    for kk in tl.range(k_lo, k_hi, warp_specialize=WARP_SPECIALIZE):
        if WRAP:
            k = (kk % k_tiles) * BK
        else:
            k = kk * BK
        a = x_desc.load([m0, k])
        if Y_KMAJOR:
            b = y_desc.load([n0, k]).T
        else:
            b = y_desc.load([k, n0])
        acc = tl.dot(a, b, acc)
        if PRODUCE:
            if SRC_RMAJOR:
                src = src_desc.load([0, k]).T
            else:
                src = src_desc.load([k, 0])
            h_acc = tl.dot(a, src.to(a.dtype), h_acc)
    return acc, h_acc


@triton.jit
def _part_at(flags_ptr, pid_m, num_m, splits, j, BM: tl.constexpr, BR: tl.constexpr):
    """Where producer j of row block pid_m keeps its BM×BR fp32 part of h, behind the counters
    (producer_scratch_words)."""
    parts = (flags_ptr + (num_m + 3) // 4 * 4).to(tl.pointer_type(tl.float32), bitcast=True)
    return parts + (pid_m * splits + j) * (BM * BR) + tl.arange(0, BM)[:, None] * BR + tl.arange(0, BR)[None, :]


@triton.jit
def _summed_h(flags_ptr, pid_m, num_m, splits, h_scale, dtype: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    """h of row block pid_m from its producers' partial sums (fp32, behind the counters), added in producer order,
    scaled and rounded: the same bits in every tile that asks."""
    at = _part_at(flags_ptr, pid_m, num_m, splits, 0, BM, BR)
    total = tl.zeros((BM, BR), dtype=tl.float32)
    for j in range(0, splits):
        total += tl.load(at + j * (BM * BR), cache_modifier=".cg")
    return (total * h_scale).to(dtype)


@triton.jit
def _row_block_h(h_at, h_inside, flags_ptr, pid_m, num_m, splits, h_scale, BM: tl.constexpr, BR: tl.constexpr):
    """A consumer tile's h once its row block's producers have all counted in: the one producer's stored h, or the
    sum of the producers' parts."""
    if splits == 1:
        h = tl.load(h_at, mask=h_inside, other=0.0, cache_modifier=".cg")
    else:
        h = _summed_h(flags_ptr, pid_m, num_m, splits, h_scale, h_at.dtype.element_ty, BM, BR)
    return h


@triton.jit
def _lora_gemm_tiles(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr, src_desc, flags_ptr, M, N, K, R,
                     keep_stride, keep_scale, h_scale, Y_KMAJOR: tl.constexpr, L_RMAJOR: tl.constexpr,
                     HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, PRODUCE_H: tl.constexpr,
                     SRC_RMAJOR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     BR: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
                     WARP_SPECIALIZE: tl.constexpr, MAX_SPLITS: tl.constexpr, EARLY_H: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    ranks = tl.arange(0, BR)
    splits = _producer_splits(num_m, num_n, k_tiles, NUM_PROGRAMS, MAX_SPLITS) if PRODUCE_H else 1
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, splits, PRODUCE_H, GROUP_M)
        m0 = pid_m * BM
        n0 = pid_n * BN
        rows = m0 + tl.arange(0, BM)
        cols = n0 + tl.arange(0, BN)
        h_at = h_ptr + rows[:, None] * R + ranks[None, :]
        h_inside = (rows[:, None] < M) & (ranks[None, :] < R)
        if HAS_LORA:
            # The term's operands are plain loads issued before the K loop: their latency hides under it (a TMA
            # load after the loop waited ~2 µs a tile, 4 % of the GEMM at 8192×14336 on an H100). Adapters in
            # another dtype (fp32) are rounded to the GEMM's, as autocast rounds them for cuBLAS.
            if not PRODUCE_H:
                h = tl.load(h_at, mask=h_inside, other=0.0)
            if L_RMAJOR:  # L stored R×N (dx: A as the adapter holds it)
                low = tl.load(l_ptr + ranks[:, None] * N + cols[None, :],
                              mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0)
            else:  # L stored N×R (forward: B)
                low = tl.load(l_ptr + cols[:, None] * R + ranks[None, :],
                              mask=(cols[:, None] < N) & (ranks[None, :] < R), other=0.0).T
            low = low.to(out_desc.dtype)
        if HAS_KEEP:
            # dropout on the term alone: the term first, scaled by the keep bits / (1−p), and the K loop accumulates
            # onto it, so one fp32 tile is live (a second one after the loop spilled: 1.8× the plain GEMM's time).
            # The bits come as one byte a row and 8 columns, expanded in registers (not one load per element, whose
            # 64-bit addresses filled the registers: 255 and 236 bytes spilled at 128×256, ptxas sm_90a); at 128×128
            # tiles with 8 warps the kernel fits in 175 registers with no spill, at 128×256 (KEEP_CONFIG) 96 bytes
            # spill, which measured faster all the same.
            groups = n0 // 8 + tl.arange(0, BN // 8)
            inside = (rows[:, None] < M) & (groups[None, :] < keep_stride)
            packed = tl.load(keep_ptr + rows[:, None] * keep_stride + groups[None, :], mask=inside, other=0)
            bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            keep = tl.reshape(bits, (BM, BN))
            acc = tl.dot(h, low) * (keep.to(tl.float32) * keep_scale)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        if PRODUCE_H:
            tl.static_assert(HAS_LORA and not HAS_KEEP, "a produced h needs the term after the K loop")
            if pid_n < splits:
                # a producer: h = h_scale · X·srcᵀ (or its part over this producer's slice of the K steps) from the X
                # tiles the K loop loads anyway (src: the shrink's adapter, R×K as the forward's A is stored, or K×R
                # as dx's B), one narrow MMA more a K step of the slice, then published for the row block's other
                # tiles, which wait for it only at their term step (the separate shrink kernel read all of X once
                # more: 42 µs at 8192×4096 on an H100)
                k_lo = pid_n * k_tiles // splits
                k_hi = (pid_n + 1) * k_tiles // splits
                acc, h_acc = _k_loop(x_desc, y_desc, src_desc, acc, m0, n0, k_lo, k_hi, k_tiles, Y_KMAJOR, True,
                                     False, SRC_RMAJOR, BM, BK, BR, WARP_SPECIALIZE)
                if splits == 1:
                    h = (h_acc * h_scale).to(h_ptr.dtype.element_ty)
                    tl.store(h_at, h, mask=h_inside)
                    tl.debug_barrier()  # (every thread's part of h stored before the flag says so)
                    tl.atomic_add(flags_ptr + pid_m, 1, sem="release", scope="gpu")
                else:
                    # the rest of the K steps, wrapping round; then this part counted in, and h from all parts once
                    # every producer of the row block has counted in (all of them run in the grid's first round)
                    acc, _ = _k_loop(x_desc, y_desc, src_desc, acc, m0, n0, k_hi, k_lo + k_tiles, k_tiles,
                                     Y_KMAJOR, False, True, SRC_RMAJOR, BM, BK, BR, WARP_SPECIALIZE)
                    tl.store(_part_at(flags_ptr, pid_m, num_m, splits, pid_n, BM, BR), h_acc)
                    tl.debug_barrier()
                    tl.atomic_add(flags_ptr + pid_m, 1, sem="release", scope="gpu")
                    while tl.atomic_add(flags_ptr + pid_m, 0, sem="acquire", scope="gpu") < splits:
                        pass
                    h = _summed_h(flags_ptr, pid_m, num_m, splits, h_scale, h_ptr.dtype.element_ty, BM, BR)
                    if pid_n == 0:
                        tl.store(h_at, h, mask=h_inside)
            else:
                h = tl.zeros((BM, BR), dtype=h_ptr.dtype.element_ty)  # (defined on every path, as Triton's ifs need;
                ready = False                                          # without EARLY_H the compiler drops both)
                if EARLY_H:
                    # the count asked as the tile starts: where the producers are done (every tile after the grid's
                    # first round, but for stragglers), h's loads are issued before the K loop and land under it,
                    # not in two round trips to L2 (the count, then h) between the loop and the term's MMA
                    ready = tl.atomic_add(flags_ptr + pid_m, 0, sem="acquire", scope="gpu") >= splits
                    if ready:
                        h = _row_block_h(h_at, h_inside, flags_ptr, pid_m, num_m, splits, h_scale, BM, BR)
                acc, _ = _k_loop(x_desc, y_desc, src_desc, acc, m0, n0, 0, k_tiles, k_tiles, Y_KMAJOR, False,
                                 False, SRC_RMAJOR, BM, BK, BR, WARP_SPECIALIZE)
                if not ready:
                    # the row block's producers have lower tile numbers, so they run or ran on programs already
                    # resident (the grid is at most one program a multiprocessor: all of them resident at once)
                    while tl.atomic_add(flags_ptr + pid_m, 0, sem="acquire", scope="gpu") < splits:
                        pass
                    h = _row_block_h(h_at, h_inside, flags_ptr, pid_m, num_m, splits, h_scale, BM, BR)
        else:
            acc, _ = _k_loop(x_desc, y_desc, src_desc, acc, m0, n0, 0, k_tiles, k_tiles, Y_KMAJOR, False, False,
                             SRC_RMAJOR, BM, BK, BR, WARP_SPECIALIZE)
        if HAS_LORA and not HAS_KEEP:  # one more MMA step into the same accumulator
            acc = tl.dot(h, low, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([m0, n0], acc.to(out_desc.dtype))


def lora_gemm(x: torch.Tensor, y: torch.Tensor, *, y_kmajor: bool, h: torch.Tensor | None = None,
              low: torch.Tensor | None = None, low_rmajor: bool = False, bias: torch.Tensor | None = None,
              keep: torch.Tensor | None = None, p: float = 0.0, src: torch.Tensor | None = None,
              src_rmajor: bool = False, h_scale: float = 1.0, out: torch.Tensor | None = None,
              config: dict | None = None, num_programs: int | None = None,
              max_splits: int = MAX_SPLITS) -> torch.Tensor:
    """out (M×N) = x·(y_kmajor ? yᵀ : y) + [h·(low_rmajor ? low : lowᵀ)] ⊙ [keep / (1−p)] + bias.

    x (M×K), y (N×K or K×N), h (M×R), low (N×R, or R×N with low_rmajor), keep: uint8 bits M×(N/8) (bit j of byte c
    keeps column 8c + j), bias (N). All 2-D contiguous in one dtype (bf16 / fp16; fp32 in the interpreter), rows
    16-byte aligned (widths multiples of 8), as TMA needs; low and src may be in another dtype (fp32 adapters).
    With `src` (R×K with src_rmajor, else K×R) the kernel makes h itself, h = h_scale · x·srcᵀ rounded to x's dtype,
    and writes it into `h` (lora_gemm_h also returns it), with up to `max_splits` producers a row block."""
    return lora_gemm_h(x, y, y_kmajor=y_kmajor, h=h, low=low, low_rmajor=low_rmajor, bias=bias, keep=keep, p=p,
                       src=src, src_rmajor=src_rmajor, h_scale=h_scale, out=out, config=config,
                       num_programs=num_programs, max_splits=max_splits)[0]


def lora_gemm_h(x, y, *, y_kmajor, h=None, low=None, low_rmajor=False, bias=None, keep=None, p=0.0, src=None,
                src_rmajor=False, h_scale=1.0, out=None, config=None, num_programs=None, max_splits=MAX_SPLITS):
    """lora_gemm, returning (out, h): h as given, or as the kernel made it from `src` (by at most `max_splits`
    producers a row block)."""
    if TensorDescriptor is None:
        raise RuntimeError("lora_gemm needs Triton's host TMA descriptors (triton.tools.tensor_descriptor)")
    m, k = x.shape
    n = y.shape[0] if y_kmajor else y.shape[1]
    if (y.shape[1] if y_kmajor else y.shape[0]) != k:
        raise ValueError(f"lora_gemm: x is {tuple(x.shape)}, y {tuple(y.shape)} (y_kmajor={y_kmajor})")
    produce = src is not None
    if produce:
        r = src.shape[0] if src_rmajor else src.shape[1]
        if (src.shape[1] if src_rmajor else src.shape[0]) != k or keep is not None:
            raise ValueError(f"lora_gemm: src is {tuple(src.shape)} (src_rmajor={src_rmajor}) for x {tuple(x.shape)}"
                             "; a produced h goes without keep bits")
        if h is None:
            h = torch.empty(m, r, device=x.device, dtype=x.dtype)
    has_lora = h is not None
    if has_lora != (low is not None) or (keep is not None and not has_lora):
        raise ValueError("lora_gemm: h and low come together, and keep bits only with them")
    r = h.shape[1] if has_lora else 0
    br = _block_r(r) if has_lora else 16
    cfg = _fitting_config(config, br, keep is not None, produce)
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    group_m = cfg.pop("GROUP_M")
    flatten, warp_specialize = cfg.pop("FLATTEN", False), cfg.pop("WARP_SPECIALIZE", False)
    early_h = cfg.pop("EARLY_H", False)
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    y_desc = TensorDescriptor.from_tensor(y, [bn, bk] if y_kmajor else [bk, bn])
    out_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    if has_lora:
        if (low.shape[0] if low_rmajor else low.shape[1]) != r or (low.shape[1] if low_rmajor else low.shape[0]) != n:
            raise ValueError(f"lora_gemm: h is {tuple(h.shape)}, low {tuple(low.shape)} (low_rmajor={low_rmajor}), "
                             f"out {m}×{n}")
    if num_programs is None:
        # (the interpreter runs programs one after another: a consumer tile must not come before its producer's)
        num_programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else \
            1 if produce else 4
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = max(1, min(num_programs, tiles))
    splits = producer_splits(m, n, k, bm, bn, bk, programs, max_splits) if produce else 1
    flags = torch.zeros(producer_scratch_words(m, bm, br, splits)[1] if produce else 1, device=x.device,
                        dtype=torch.int32)
    dummy = out  # (pointer arguments of branches that are compiled out)
    src_desc = TensorDescriptor.from_tensor(src, [br, bk] if src_rmajor else [bk, br]) if produce else dummy
    _lora_gemm_kernel[(programs,)](
        x_desc, y_desc, h if has_lora else dummy, low if has_lora else dummy, out_desc,
        bias if bias is not None else dummy, keep if keep is not None else dummy, src_desc, flags,
        m, n, k, r, n // 8, 1.0 / (1.0 - p) if keep is not None else 1.0, float(h_scale),
        Y_KMAJOR=y_kmajor, L_RMAJOR=low_rmajor, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        HAS_KEEP=keep is not None, PRODUCE_H=produce, SRC_RMAJOR=src_rmajor, BM=bm, BN=bn, BK=bk, BR=br,
        GROUP_M=group_m, NUM_PROGRAMS=programs, FLATTEN=flatten, WARP_SPECIALIZE=warp_specialize,
        MAX_SPLITS=max_splits, EARLY_H=early_h, **cfg)
    return out, h


def reference(x, y, *, y_kmajor, h=None, low=None, low_rmajor=False, bias=None, keep=None, p=0.0, src=None,
              src_rmajor=False, h_scale=1.0):
    """lora_gemm in fp32 torch ops (the keep bits unpacked), rounded to x's dtype once; with `src`, h made as the
    kernel makes it (the adapter rounded to x's dtype, the product scaled and rounded)."""
    if src is not None:
        h = reference_h(x, src, src_rmajor=src_rmajor, h_scale=h_scale)
    out = x.float() @ (y.float().t() if y_kmajor else y.float())
    if h is not None:
        low = low.to(x.dtype)
        term = h.float() @ (low.float() if low_rmajor else low.float().t())
        if keep is not None:
            bits = (keep.long()[:, :, None] >> torch.arange(8, device=keep.device)) & 1
            term = term * bits.reshape(keep.shape[0], -1)[:, : term.shape[1]].float() / (1.0 - p)
        out = out + term
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def reference_h(x, src, *, src_rmajor, h_scale):
    """The h that lora_gemm makes from `src`: h_scale · x·srcᵀ in fp32, src rounded to x's dtype first."""
    s = src.to(x.dtype).float()
    return (x.float() @ (s.t() if src_rmajor else s) * h_scale).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time form for a C++ launcher (csrc/triton_launch.h): one cubin a flag set, tile config and rank block

_PTX_KINDS = {".u64": "p", ".b64": "p", ".u32": "i", ".b32": "i", ".s32": "i", ".f32": "f"}
USER_PARAMS = 16  # _lora_gemm_ptr_kernel's runtime arguments, before Triton's hidden scratch pointers


def _param_kinds(ptx: str, name: str) -> str:
    """The entry's parameters as 'p' (64-bit pointer), 'i' (32-bit int), 'f' (fp32), read from its PTX."""
    start = ptx.index(f".entry {name}(")
    body = ptx[start: ptx.index(")", start)]
    kinds = []
    for line in body.splitlines()[1:]:
        parts = line.split()
        if not parts or parts[0] != ".param":
            continue
        if parts[1] not in _PTX_KINDS:
            raise ValueError(f"{name}: parameter type {parts[1]} has no C++ launcher kind")
        kinds.append(_PTX_KINDS[parts[1]])
    return "".join(kinds)


def compile_for_cpp(*, dtype: torch.dtype, capability: int, y_kmajor: bool, low_rmajor: bool, has_lora: bool,
                    has_bias: bool, has_keep: bool, rank_block: int, num_programs: int, produce_h: bool = False,
                    adapter_dtype: torch.dtype | None = None, config: dict | None = None,
                    max_splits: int = MAX_SPLITS, shared_limit: int = HOPPER_SHARED_BYTES) -> dict:
    """_lora_gemm_ptr_kernel compiled for one GPU architecture (capability 90 for sm_90) and one set of flags: the
    cubin and what a launcher needs (entry name, tile BM×BN, dynamic shared memory, threads, Triton's scratch bytes a
    program and their alignment, parameter kinds). Arguments, in order: x, y, h, low, out, bias, keep, src, flags
    pointers (16-byte aligned; any valid pointer where a flag leaves one out), M, N, K, R, keep_stride (int32),
    keep_scale, h_scale (fp32). produce_h: the kernel makes h from src (SRC_RMAJOR with low_rmajor's opposite: the
    forward's src is A, R×K, dx's is B, K×R) and needs scratch behind the flags pointer (producer_scratch_words for
    producer_splits(…, max_splits) producers a row block: its counters zeroed); low and src are read in adapter_dtype
    (None: dtype). The compiled kernel's shared memory must fit `shared_limit` bytes (the GPU's opt-in limit a block):
    _fitting_config's estimate can fall short (128×128 tiles at 4 stages, rank block 64, producing from fp32
    adapters: 237,624 bytes compiled against 229,376 estimated), so the pipeline loses stages until the compiled kernel
    fits, else a RuntimeError says so (a launch would fail, and the node's first call with it)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _fitting_config(config, rank_block, has_keep, produce_h)
    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
    element, adapter = types[dtype], types[adapter_dtype or dtype]
    signature = {name: element for name in ("x_ptr", "y_ptr", "h_ptr", "l_ptr", "out_ptr", "bias_ptr")}
    signature.update({"l_ptr": adapter, "keep_ptr": "*u8", "src_ptr": adapter, "flags_ptr": "*i32", "M": "i32",
                      "N": "i32", "K": "i32", "R": "i32", "keep_stride": "i32", "keep_scale": "fp32",
                      "h_scale": "fp32"})
    constexprs = {"Y_KMAJOR": y_kmajor, "L_RMAJOR": low_rmajor, "HAS_LORA": has_lora, "HAS_BIAS": has_bias,
                  "HAS_KEEP": has_keep, "PRODUCE_H": produce_h, "SRC_RMAJOR": not low_rmajor, "BM": cfg["BM"],
                  "BN": cfg["BN"], "BK": cfg["BK"], "BR": rank_block,
                  "GROUP_M": cfg["GROUP_M"], "NUM_PROGRAMS": num_programs, "FLATTEN": cfg.get("FLATTEN", False),
                  "WARP_SPECIALIZE": cfg.get("WARP_SPECIALIZE", False), "MAX_SPLITS": max_splits,
                  "EARLY_H": cfg.get("EARLY_H", False)}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}  # the pointers: 16-byte aligned, as TMA needs

    def compile_at(stages: int):
        options = {"num_warps": cfg["num_warps"], "num_stages": stages}
        try:
            return triton.compile(ASTSource(fn=_lora_gemm_ptr_kernel, signature=signature, constexprs=constexprs,
                                            attrs=attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
        except Exception:  # noqa: BLE001 - e.g. another Triton's ASTSource form: the JIT's own path, if there is a GPU
            # Small tensors of the same dtypes stand for the arguments; the integers are 17 so that the JIT assumes
            # nothing of them (1 would become a constant, multiples of 16 an alignment) for the sizes it will see.
            if not torch.cuda.is_available():
                raise
            t = torch.empty(64, device="cuda", dtype=dtype)
            ad = torch.empty(64, device="cuda", dtype=adapter_dtype or dtype)
            u8 = torch.empty(64, device="cuda", dtype=torch.uint8)
            i32 = torch.empty(64, device="cuda", dtype=torch.int32)
            return _lora_gemm_ptr_kernel.warmup(t, t, t, ad, t, t, u8, ad, i32, 17, 17, 17, 17, 17, 1.0, 1.0,
                                                grid=(1,), **constexprs, **options)

    compiled = compile_at(cfg["num_stages"])
    while compiled.metadata.shared > shared_limit and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
        compiled = compile_at(cfg["num_stages"])
    meta = compiled.metadata
    if meta.shared > shared_limit:
        raise RuntimeError(f"lora_gemm_tma: a {cfg['BM']}×{cfg['BN']}×{cfg['BK']} tile at rank block {rank_block} "
                           f"needs {meta.shared} bytes of shared memory even at {cfg['num_stages']} stages; this GPU "
                           f"allows {shared_limit} a block")
    kinds = _param_kinds(compiled.asm["ptx"], meta.name)
    if kinds[:USER_PARAMS] != "p" * 9 + "i" * 5 + "ff" or set(kinds[USER_PARAMS:]) - {"p"}:
        raise RuntimeError(f"{meta.name}: unexpected parameter layout {kinds!r} for this Triton build")
    return {"cubin": compiled.asm["cubin"], "name": meta.name, "BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"],
            "max_splits": max_splits, "num_stages": cfg["num_stages"], "shared": meta.shared,
            "num_warps": meta.num_warps,
            "scratch_bytes": getattr(meta, "global_scratch_size", 0),
            "scratch_align": getattr(meta, "global_scratch_align", 1), "kinds": kinds,
            "ptx": compiled.asm["ptx"]}  # (the tests ask ptxas about its registers)


def load_for_cpp(ext, built: dict) -> int:
    """Load a compile_for_cpp result into peft_fast._C's registry of Triton kernels (csrc/triton_launch.h); its id
    for ext.triton_kernel_launch and lora_kernels_register_tma."""
    return ext.triton_kernel_register(built["cubin"], built["name"], built["shared"], built["num_warps"],
                                      built["scratch_bytes"], built["scratch_align"], built["kinds"], USER_PARAMS)


class CppLoraGemm:
    """lora_gemm launched by peft_fast._C (csrc/triton_launch.h) instead of Triton's Python launcher: compiled once
    for this GPU and these flags, then each call is one C++ launch. For tests and probes of the node's kernels."""

    def __init__(self, ext, device: torch.device, dtype: torch.dtype, *, y_kmajor: bool, low_rmajor: bool = False,
                 has_lora: bool = False, has_bias: bool = False, has_keep: bool = False, produce_h: bool = False,
                 adapter_dtype: torch.dtype | None = None, rank: int = 16, config: dict | None = None,
                 max_splits: int = MAX_SPLITS):
        major, minor = torch.cuda.get_device_capability(device)
        self.num_programs = torch.cuda.get_device_properties(device).multi_processor_count
        self.flags = dict(y_kmajor=y_kmajor, low_rmajor=low_rmajor, has_lora=has_lora, has_bias=has_bias,
                          has_keep=has_keep, produce_h=produce_h)
        built = compile_for_cpp(dtype=dtype, capability=10 * major + minor, rank_block=_block_r(rank),
                                num_programs=self.num_programs, adapter_dtype=adapter_dtype, config=config,
                                max_splits=max_splits, shared_limit=device_shared_limit(device), **self.flags)
        self.tile = built["BM"], built["BN"], built["BK"]
        self.max_splits, self.rank_block = max_splits, _block_r(rank)
        self.ext = ext
        self.id = load_for_cpp(ext, built)

    def __call__(self, x, y, out, h=None, low=None, bias=None, keep=None, p: float = 0.0, src=None,
                 h_scale: float = 1.0):
        """out as lora_gemm computes it; with the produce_h kernel, h is the M×R output and src its adapter."""
        m, k = x.shape
        n = out.shape[1]
        r = h.shape[1] if h is not None else 0
        bm, bn, bk = self.tile
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        splits = producer_splits(m, n, k, bm, bn, bk, self.num_programs, self.max_splits)
        flags = torch.zeros(producer_scratch_words(m, bm, self.rank_block, splits)[1], device=x.device,
                            dtype=torch.int32)
        args = [x, y, h if h is not None else x, low if low is not None else x, out,
                bias if bias is not None else out, keep if keep is not None else out, src if src is not None else x,
                flags, m, n, k, r, n // 8, 1.0 / (1.0 - p) if keep is not None else 1.0, float(h_scale)]
        self.ext.triton_kernel_launch(self.id, min(self.num_programs, tiles), args)
        return out


def register_for_node(ext, device: torch.device, dtype: torch.dtype = torch.bfloat16, ranks=(16,), kn=(False,),
                      config: dict | None = None, dx_dropout: bool = True, plain: bool = True,
                      produce_adapters=(), max_splits: int = MAX_SPLITS) -> dict:
    """Compile the node's one-GEMM route kernels for this GPU and register them with peft_fast._C
    (lora_kernels_register_tma): per rank block and weight layout (kn: Conv1D's K×N weight), with `plain` the
    forward with and without bias and dx with and without dropout bits, which read h (dx_dropout=False: no dx with
    bits, and a dx with dropout takes the default route, its kernel unregistered); for each adapter dtype of
    `produce_adapters` (fp32, or `dtype` itself) the producing forward, with and without bias, and dx, which make h
    themselves (the node takes them without dropout). The route itself stays off until
    `ext.lora_kernels_set_tma_rows(rows)`. Returns the kernel ids registered, by (rank block, kn, dx, bias or keep
    bits, producing adapter dtype or None). `config`: one tile config for all (None: each kernel's default,
    KEEP_CONFIG for dx with keep bits); `max_splits`: the most producers a row block of the producing kernels."""
    major, minor = torch.cuda.get_device_capability(device)
    programs = torch.cuda.get_device_properties(device).multi_processor_count
    shared_limit = device_shared_limit(device)
    bf16 = dtype == torch.bfloat16
    kinds = [(dx, flag, None) for dx, flag in ((False, False), (False, True), (True, False), (True, True)) if plain]
    kinds += [(dx, flag, adapter) for adapter in produce_adapters for dx, flag in ((False, False), (False, True),
                                                                                   (True, False))]
    registered = {}
    for rank in ranks:
        block = _block_r(rank)
        for layout in kn:
            for dx, flag, adapter in kinds:
                if dx and flag and not dx_dropout:
                    ext.lora_kernels_register_tma(True, bf16, layout, False, True, block, -1, 0, 0, 0)
                    continue
                # (forward reads W as stored, N×K: k-major; dx reads it as K×N rows; Conv1D's K×N the other way)
                y_kmajor = layout if dx else not layout
                built = compile_for_cpp(dtype=dtype, capability=10 * major + minor, y_kmajor=y_kmajor, low_rmajor=dx,
                                        has_lora=True, has_bias=flag and not dx, has_keep=flag and dx,
                                        rank_block=block, num_programs=programs, produce_h=adapter is not None,
                                        adapter_dtype=adapter, config=config, max_splits=max_splits,
                                        shared_limit=shared_limit)
                kernel = load_for_cpp(ext, built)
                ext.lora_kernels_register_tma(dx, bf16, layout, flag and not dx, flag and dx, block, kernel, programs,
                                              built["BM"], built["BN"], major, adapter is not None,
                                              adapter == torch.float32, built["BK"], built["max_splits"])
                registered[block, layout, dx, flag, adapter] = kernel
    return registered
