// Launchers of the fused LoRA kernels (lora_rows_*.cu, lora_reduce.cu): the low-rank half of a LoRA linear's forward
// and backward in three kernels, cuBLAS keeping the big GEMMs. Plain pointers, no torch headers, so a bare
// `nvcc -c` compiles them (CI does, without a GPU); csrc/lora_autograd.cpp calls them from the C++ autograd node.
//
// With x (M×K), W (N×K, cuBLAS), A (r×K), B (N×r), scale s, dropout p and drop(z) = z ⊙ keep / (1−p):
//   forward   rows kernel   hs = s · drop(x) Aᵀ   (M×r, saved)     y = hs Bᵀ (+ bias) (+ addend)
//             cuBLAS        y += x Wᵀ                                (beta = 1)
//   backward  rows kernel   gs = s · dy B         (M×r)             dx = drop(gs A)
//             cuBLAS        dx += dy W                               (beta = 1)
//             reduce kernel dA = gsᵀ drop(x)       dB = dyᵀ hs       (sums over M in a fixed order: deterministic)
// The dropout mask is drawn once, in forward, from torch's Philox generator state, and kept bit-packed (1 bit per
// element of x: M × K/8 bytes, 1/16 of x in bf16); backward reads those bits, it never regenerates them. fp32 adapters
// (PEFT's default) are rounded to the compute dtype as they are read; the forward writes those rounded copies on the
// way, and backward reads them: half the bytes, which every row block reads again.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

constexpr int kLoraKernelMaxRank = 128;
constexpr int kLoraRowsMaxCluster = 8;  // (the portable cluster size)

// The rank as the kernels pad it: 16, 32, 64 or 128
inline int lora_rank_block(int64_t r) { return r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : 128; }

enum class LoraDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// torch's at::PhiloxCudaState of one call, field by field (this header includes no torch): eager calls carry the
// values, calls captured in a CUDA graph carry pointers that the kernel reads at replay.
struct LoraPhilox {
    uint64_t seed = 0, offset = 0;
    const int64_t* seed_ptr = nullptr;
    const int64_t* offset_ptr = nullptr;
    uint64_t offset_intragraph = 0;
    bool captured = false;
};

// One pass over blocks of rows. Forward: `in` = x, w1 = A, w2 = B, small = hs (written), out = y. Backward: `in` =
// dy, w1 = B, w2 = A, small = gs (written), out = dx (null: only gs is wanted).
struct LoraRowsArgs {
    const void* in;       // M×K1, compute dtype, contiguous rows, 16-byte aligned
    const void* w1;       // forward A (r×K1), backward B (K1×r); adapter dtype, contiguous, 16-byte aligned
    const void* w2;       // forward B (N2×r), backward A (r×N2); adapter dtype, contiguous, 16-byte aligned
    const void* bias;     // N2, compute dtype, or null (forward only)
    const void* addend;   // M×N2, compute dtype, or null (forward only)
    void* out;            // M×N2, compute dtype, or null (backward: skip dx)
    void* small;          // M×r, compute dtype, or null (forward inference)
    uint8_t* mask;        // M×(K/8) keep bits (K = x's width): written forward when p > 0 (if not null), read backward
    int m, k1, n2, r;
    float scale, p;
    LoraPhilox philox;    // forward with p > 0 only
    LoraDtype dtype, adapter_dtype;
    bool backward;
    // forward with fp32 adapters: A (r×K1) and B (N2×r) rounded to the compute dtype, written on the way (each tile by
    // one block) for the backward kernels, which then read half the bytes (null: not wanted)
    void* w1_copy = nullptr;
    void* w2_copy = nullptr;
    int* zero = nullptr;  // zero_count ints the kernel sets to 0 before anything else (the reduce kernel's counters,
    int zero_count = 0;   // which runs next on the stream: no memset launch of their own)
    int block_rows = 0;     // rows per block (16, 32 or 64) and phase-2 column splits; 0: the launcher's rule
    int column_splits = 0;  // (tests and scripts/probe_lora_kernels.py force others)
    // Two launches instead of one (needs small and out): phase 1 alone writes small, in block_rows-row blocks; then
    // phase 2 alone reads it back, in pass2_rows-row blocks (0: the launcher's rule) with its columns split over
    // column_splits blocks (0: the launcher's rule). Each phase then gets the block shape that suits it: the one-pass
    // kernel's row blocks read the whole of both adapters, and few rows a block means much adapter traffic per row.
    bool two_pass = false;
    int pass2_rows = 0;
    bool small_ready = false;  // (set by launch_lora_rows: this launch is phase 2 alone, small written before it)
    // Up to this many blocks (at most kLoraRowsMaxCluster) form a cluster that splits phase 1's K, where the launcher
    // splits 16-row blocks' columns (decode) on a GPU with clusters (sm_90+); 1: never. The kernel reads the size
    // the launch has.
    int cluster_k = 1;
};

// dA = gsᵀ drop(x) (r×K) and dB = dyᵀ hs (N×r), in the adapters' dtype; grad_a / grad_b null skips that one.
struct LoraReduceArgs {
    const void* x;
    const void* gs;
    const uint8_t* mask;  // null without dropout
    void* grad_a;
    const void* dy;
    const void* hs;
    void* grad_b;
    float* workspace;     // lora_reduce_plan(...).workspace_floats floats (none needed when splits == 1)
    int* counters;        // lora_reduce_plan(...).counters ints, zero at launch (the launcher clears them unless
    int m, k, n, r;       // counters_zeroed says a kernel earlier on the stream did)
    float p;
    LoraDtype dtype, grad_dtype;
    bool counters_zeroed = false;
};

struct LoraReducePlan {
    int tiles_a, tiles_b, splits, rows_per_split;
    int cols;      // a tile's columns of x or dy, 64 or 128 (lora_reduce_cols_supported)
    bool compact;  // rank 16 at 64 columns in the compact layout (lora_kernels.cuh ReduceConfig)
    int64_t workspace_floats;
    int counters;
};

// Decode (1 ≤ M ≤ kLoraDecodeMaxRows) in one launch on Hopper (lora_decode.cu): y = x·Wᵀ (+ bias) + hs·Bᵀ with
// hs = s·x·Aᵀ rounded to the compute dtype; W N×K (nn.Linear's layout), adapters in the compute dtype or fp32.
constexpr int kLoraDecodeMaxRows = 16;
struct LoraDecodeArgs {
    const void* x;     // M×K, compute dtype, contiguous, 16-byte aligned
    const void* w;     // N×K, compute dtype, contiguous, 16-byte aligned; or null and the 4-bit weight below
    const void* bias;  // N, compute dtype, or null
    const void* a;     // r×K, adapter dtype, contiguous, 16-byte aligned
    const void* b;     // N×r, adapter dtype, contiguous
    void* y;           // M×N, compute dtype
    int m, n, k, r;
    float scale;
    LoraDtype dtype, adapter_dtype;
    // a bitsandbytes 4-bit weight instead of w (qgemv.h's layout and scales): packed N·K/2 bytes (16-byte aligned),
    // 16 code values, an fp32 absmax per block of blocksize (a multiple of 32) flat weights or, double-quantized,
    // absmax[b] = code2[qabsmax[b]] · absmax2[b / blocksize2] + *offset
    const uint8_t* packed = nullptr;
    const float* code = nullptr;
    const float* absmax = nullptr;
    const uint8_t* qabsmax = nullptr;
    const float* absmax2 = nullptr;
    const float* code2 = nullptr;
    const float* offset = nullptr;
    int blocksize = 0, blocksize2 = 0;
    // nn.Linear weights: each quad's loads read 64 contiguous bytes (lora_decode.cu load_spread_pairs; not yet timed)
    bool spread_loads = false;
};

// Whether the current GPU has what the kernels (and qgemv.cu) are written for: sm_80+, bf16 tensor cores; asked once
// per device. Older GPUs (T4, V100) keep the ATen route of the autograd node.
bool lora_device_supported();
// The current GPU's compute capability major (0 where it cannot be asked), asked once per device
int lora_device_major();
// Whether the kernels take this call (dtype pair, rank and widths); the caller checks devices, layout and alignment.
bool lora_kernels_support(LoraDtype dtype, LoraDtype adapter_dtype, int r, int64_t k, int64_t n);
// The reduce kernel's column tile widths: 64 (the default) or 128 (twice the bytes of each row read at once, half
// the rows a step; measured no faster, H100 2026-12-07: lora_autograd.cpp's reduce_columns has the numbers)
bool lora_reduce_cols_supported(int cols);
// compact: rank ≤ 16 at 64 columns in the layout that fits three blocks on a Hopper multiprocessor, the splits then
// filling as many blocks a multiprocessor as the GPU holds (not yet run on a GPU: off by default); ignored elsewhere
LoraReducePlan lora_reduce_plan(int m, int k, int n, int r, bool grad_a, bool grad_b, int sm_count, int cols = 64,
                                bool compact = false);
cudaError_t launch_lora_rows(const LoraRowsArgs& args, int sm_count, cudaStream_t stream);
// Whether the decode kernel takes these sizes on the current GPU (sm_90+: clusters), pointers aside
bool lora_decode_supported(int64_t m, int64_t k, int64_t n, int64_t r);
cudaError_t launch_lora_decode(const LoraDecodeArgs& args, cudaStream_t stream);
cudaError_t launch_lora_reduce(const LoraReduceArgs& args, const LoraReducePlan& plan, cudaStream_t stream);
// fp32 adapters rounded to the compute dtype (bf16 / fp16) in one launch: dst = A's na elements, then B's nb
cudaError_t launch_lora_round_adapters(const float* a, int64_t na, const float* b, int64_t nb, void* dst,
                                       LoraDtype dtype, cudaStream_t stream);
