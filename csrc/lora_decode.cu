// Decode (M ≤ 16 rows) LoRA linear in one launch, for Hopper: y = x·Wᵀ (+ bias) + hs·Bᵀ with hs = s·x·Aᵀ rounded to
// the compute dtype T, as the rows kernel rounds it; the adapters (T or fp32) rounded to T as they are read. Without
// it, decode runs cuBLAS's GEMM (with its split-K reduction) and then the rows kernel adding the term: three launches,
// and a rows kernel whose every block walked all of A's K (H100, M16 K=N=4096: 6.8 + 1.9 + 9.5 µs GPU). W is T, or a
// bitsandbytes 4-bit weight dequantized in registers as qgemv.cu does it (QLoRA decode: there qgemv's every column
// block read all of x, 4× the packed weight's bytes at K=N=4096, then the rows kernel added the term).
//
// A cluster of 1, 2, 4 or 8 blocks (the launcher picks the most whose clusters all run at once: one wave; one block a
// multiprocessor) owns kClusterCols output columns and splits K among its blocks: block `rank` reads only its K slice
// of x, of those columns' rows of W and of A, so x and A are read once a cluster, not once a column block. Each warp
// multiplies x (16 rows; rows ≥ M are zeros) by two 8-column tiles of W and, for the first ⌈r/8⌉ warps, one 8-row
// tile of A, with mma.sync m16n8k16 over the slice (the k renaming of qgemv.cu: thread q of a quad takes 32
// consecutive k of chunk 4·step + q, so every operand is a 16-byte load of a row). Its registers hold two such steps:
// the next one's loads fly while this one's mmas wait (one step at a time, 2 blocks a multiprocessor and a second
// wave of clusters made it 28 µs at M16 K=N=4096 on an H100, where cuBLAS + the rows kernel took 15.6). The partial
// sums go to shared memory; after a cluster barrier block `rank` finishes its share of the cluster's columns by
// summing every block's partials through distributed shared memory in rank order (deterministic), then hs in the
// same order, then adds bias and hs·Bᵀ (B's rows and bias staged in shared memory while the first loads flew) and
// stores y once.
//
// Requirements (lora_decode_supported; the caller checks devices, layout and alignment): sm_90+, 1 ≤ M ≤ 16,
// K % 32 == 0, r ≤ 64; x, W, A 16-byte aligned and contiguous (W as nn.Linear holds it, N×K).

#include <cooperative_groups.h>

#include "lora_kernels.cuh"
#include "qgemv.h"

namespace {

using lora_kernels::from_float;
using lora_kernels::kThreads;
using lora_kernels::kWarps;
using lora_kernels::to_float;

constexpr int kTilesW = 2;                    // 8-column tiles of W a warp
constexpr int kClusterCols = 8 * kTilesW * kWarps;  // 128 columns a cluster
constexpr int kMaxRank = 8 * kWarps;          // one 8-row tile of A a warp at most: 64
static_assert(kThreads == 256, "code2's 256 entries: one a thread");

// 32 consecutive elements of a row of E from p (16-byte aligned) as 16 pairs of T, the lower k in the low half; zeros
// when !valid
template <typename T, typename E>
__device__ __forceinline__ void load_pairs(uint32_t (&r)[16], const E* p, bool valid) {
    if constexpr (std::is_same_v<E, float>) {
#pragma unroll
        for (int v = 0; v < 8; ++v) {
            const float4 f = valid ? __ldg(reinterpret_cast<const float4*>(p) + v) : make_float4(0.f, 0.f, 0.f, 0.f);
            float lo[8] = {f.x, f.y, f.z, f.w};
            const uint4 u = lora_kernels::pack8<T>(lo);  // (only the first four are used)
            r[2 * v] = u.x, r[2 * v + 1] = u.y;
        }
    } else {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const uint4 u = valid ? __ldg(reinterpret_cast<const uint4*>(p) + v) : make_uint4(0u, 0u, 0u, 0u);
            r[4 * v] = u.x, r[4 * v + 1] = u.y, r[4 * v + 2] = u.z, r[4 * v + 3] = u.w;
        }
    }
}

// 32 consecutive weights of a bitsandbytes 4-bit row (16 packed bytes; element 2i in the high nibble of byte i) as 16
// pairs of T, value = code · scale rounded once to T, as dequantize_4bit makes it
template <typename T>
__device__ __forceinline__ void dequant_pairs(uint32_t (&r)[16], const uint4 packed, float scale, const float* code) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        const uint32_t word = (&packed.x)[v];
        float f[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const uint32_t byte = word >> (8 * b) & 0xffu;
            f[2 * b] = __fmul_rn(code[byte >> 4], scale), f[2 * b + 1] = __fmul_rn(code[byte & 15u], scale);
        }
        const uint4 u = lora_kernels::pack8<T>(f);
        r[4 * v] = u.x, r[4 * v + 1] = u.y, r[4 * v + 2] = u.z, r[4 * v + 3] = u.w;
    }
}

// acc += x (rows g, g+8 in xlo / xhi) · one 8-row tile (this thread's row in w): the 8 mmas of a 128-wide step
template <typename T>
__device__ __forceinline__ void mma_step(float (&acc)[4], const uint32_t (&xlo)[16], const uint32_t (&xhi)[16],
                                         const uint32_t (&w)[16]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const uint32_t a[4] = {xlo[2 * j], xhi[2 * j], xlo[2 * j + 1], xhi[2 * j + 1]};
        lora_kernels::mma16816<T>(acc, a, w[2 * j], w[2 * j + 1]);
    }
}

// One 128-wide step of a warp's K slice in registers: the operands of its mmas (x rows g and g + 8, kTilesW tiles of
// W or their packed 4-bit bytes and the raw loads of their scales, a tile of A). Two of them alternate, so the next
// step's loads are in flight while this one's mmas wait on theirs.
template <bool kQuant>
struct Step {
    uint32_t xlo[16], xhi[16], w[kTilesW][16], a[16];
    uint4 packed[kTilesW];
    float absmax[kTilesW];     // the block's absmax, or (double-quantized) absmax2 of its group
    uint32_t qabsmax[kTilesW];  // double-quantized: the block's 8-bit code, looked up in code2 when the step is used
};

// What a thread walks: its pointers and coordinates
template <typename T, typename TA>
struct Walk {
    const T* x;
    const T* w;
    const TA* a;
    int m, n, k, r, n0, warp, g, q;
    bool has_a;
};

// Issue the loads of the step starting at chunk c0 (this thread's chunk c0 + q, if below c_end); nothing waits here
template <typename T, typename TA, bool kUpper, bool kQuant>
__device__ __forceinline__ void load_step(Step<kQuant>& s, const Walk<T, TA>& t, const LoraDecodeArgs& args, int c0,
                                          int c_end) {
    const int c = c0 + t.q;  // this thread's chunk: k = 32c … 32c + 31
    const bool in_k = c < c_end;
    load_pairs<T>(s.xlo, t.x + static_cast<int64_t>(t.g) * t.k + 32 * c, in_k && t.g < t.m);
    if constexpr (kUpper)
        load_pairs<T>(s.xhi, t.x + static_cast<int64_t>(t.g + 8) * t.k + 32 * c, in_k && t.g + 8 < t.m);
    else
        for (uint32_t& v : s.xhi) v = 0u;  // (rows 8 … 15 absent)
#pragma unroll
    for (int i = 0; i < kTilesW; ++i) {
        const int n = t.n0 + 16 * t.warp + 8 * i + t.g;
        if constexpr (kQuant) {
            const int64_t flat = static_cast<int64_t>(n) * t.k + 32 * c, block = flat / args.blocksize;
            const bool valid = in_k && n < t.n;  // (a missing row or chunk: code · 0)
            const uint4* packed = reinterpret_cast<const uint4*>(args.packed + flat / 2);
            s.packed[i] = valid ? __ldg(packed) : make_uint4(0, 0, 0, 0);
            if (args.absmax != nullptr) {
                s.absmax[i] = valid ? __ldg(args.absmax + block) : 0.f;
            } else {
                s.qabsmax[i] = valid ? __ldg(args.qabsmax + block) : 0u;
                s.absmax[i] = valid ? __ldg(args.absmax2 + block / args.blocksize2) : 0.f;
            }
        } else {
            load_pairs<T>(s.w[i], t.w + static_cast<int64_t>(n) * t.k + 32 * c, in_k && n < t.n);
        }
    }
    const int row_a = 8 * t.warp + t.g;
    if (t.has_a) load_pairs<T>(s.a, t.a + static_cast<int64_t>(row_a) * t.k + 32 * c, in_k && row_a < t.r);
}

// The step's mmas (4-bit tiles dequantized one at a time, just before theirs, so fewer registers are live)
template <typename T, bool kQuant>
__device__ __forceinline__ void mma_steps(float (&acc)[kTilesW][4], float (&acc_a)[4], Step<kQuant>& s, bool has_a,
                                          bool double_quant, float offset, const float* code, const float* code2) {
#pragma unroll
    for (int i = 0; i < kTilesW; ++i) {
        if constexpr (kQuant) {
            const float scale =
                double_quant ? __fadd_rn(__fmul_rn(code2[s.qabsmax[i]], s.absmax[i]), offset) : s.absmax[i];
            dequant_pairs<T>(s.w[i], s.packed[i], scale, code);
        }
        mma_step<T>(acc[i], s.xlo, s.xhi, s.w[i]);
    }
    if (has_a) mma_step<T>(acc_a, s.xlo, s.xhi, s.a);
}

// kUpper: M > 8, x rows g + 8 exist; kQuant: W is a 4-bit weight (LoraDecodeArgs::packed). One block a multiprocessor
// (the launcher sizes the grid to one wave): its registers hold two steps in flight.
template <typename T, typename TA, bool kUpper, bool kQuant>
__global__ void __launch_bounds__(kThreads, 1) lora_decode_kernel(const LoraDecodeArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ float y_part[16][kClusterCols];  // this block's partial sums over its K slice
    __shared__ float h_part[16][kMaxRank];
    __shared__ float h_s[16][kMaxRank];         // hs of every row: summed, scaled, rounded to T
    __shared__ T b_s[kMaxRank][kClusterCols];   // B's rows of this block's columns, rounded to T (j-major: no
                                                // bank conflicts in the epilogue)
    __shared__ float bias_s[kClusterCols];
    __shared__ float code[16];
    __shared__ float code2[kQuant ? 256 : 1];
    auto cluster = cooperative_groups::this_cluster();
    const int blocks = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
    const bool double_quant = kQuant && args.absmax == nullptr;
    if constexpr (kQuant) {
        if (threadIdx.x < 16) code[threadIdx.x] = args.code[threadIdx.x];
        if (double_quant) code2[threadIdx.x] = args.code2[threadIdx.x];  // (kThreads == 256 entries)
    }
    const float offset = double_quant ? __ldg(args.offset) : 0.f;
    Walk<T, TA> t;
    t.x = static_cast<const T*>(args.x), t.w = static_cast<const T*>(args.w), t.a = static_cast<const TA*>(args.a);
    t.m = args.m, t.n = args.n, t.k = args.k, t.r = args.r;
    t.n0 = (blockIdx.x / blocks) * kClusterCols;
    t.warp = threadIdx.x / 32, t.g = threadIdx.x % 32 / 4, t.q = threadIdx.x % 4;
    t.has_a = 8 * t.warp < t.r;

    const int chunks = t.k / 32, per_rank = (chunks + blocks - 1) / blocks;
    const int c_begin = min(chunks, rank * per_rank), c_end = min(chunks, c_begin + per_rank);
    Step<kQuant> s0, s1;
    if (c_begin < c_end) load_step<T, TA, kUpper, kQuant>(s0, t, args, c_begin, c_end);

    // while the first step's loads fly: this block's rows of B (rounded to T, as the rows kernel reads them) and bias
    const int cols = kClusterCols / blocks, col0 = t.n0 + rank * cols;  // the columns this block finishes
    {
        const TA* b = static_cast<const TA*>(args.b);
        const int rows = max(0, min(cols, t.n - col0)), r = t.r;
#pragma unroll 4
        for (int e = threadIdx.x; e < rows * r; e += kThreads)
            b_s[e % r][e / r] = from_float<T>(to_float(b[static_cast<int64_t>(col0) * r + e]));
        const T* bias = static_cast<const T*>(args.bias);
        if (threadIdx.x < rows) bias_s[threadIdx.x] = bias != nullptr ? to_float(bias[col0 + threadIdx.x]) : 0.f;
    }
    __syncthreads();  // code, code2

    float acc[kTilesW][4] = {}, acc_a[4] = {};
    for (int c0 = c_begin; c0 < c_end; c0 += 8) {  // two steps of 4 chunks (one a thread of each quad) a pass
        if (c0 + 4 < c_end) load_step<T, TA, kUpper, kQuant>(s1, t, args, c0 + 4, c_end);
        mma_steps<T, kQuant>(acc, acc_a, s0, t.has_a, double_quant, offset, code, code2);
        if (c0 + 4 >= c_end) break;
        if (c0 + 8 < c_end) load_step<T, TA, kUpper, kQuant>(s0, t, args, c0 + 8, c_end);
        mma_steps<T, kQuant>(acc, acc_a, s1, t.has_a, double_quant, offset, code, code2);
    }
    // accumulator i of an m16n8 tile: row g (+8 for i ≥ 2), column 2q (+1 for odd i)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = t.g + (i >= 2 ? 8 : 0), col = 2 * t.q + (i & 1);
#pragma unroll
        for (int j = 0; j < kTilesW; ++j) y_part[row][16 * t.warp + 8 * j + col] = acc[j][i];
        h_part[row][8 * t.warp + col] = t.has_a ? acc_a[i] : 0.f;
    }
    cluster.sync();  // every block's partials written (and this block's B rows)

    for (int e = threadIdx.x; e < t.m * kMaxRank; e += kThreads) {
        const int m = e / kMaxRank, j = e % kMaxRank;
        if (j >= t.r) continue;
        float h = 0.f;
        for (int p = 0; p < blocks; ++p) h += cluster.map_shared_rank(&h_part[0][0], p)[m * kMaxRank + j];
        h_s[m][j] = to_float(from_float<T>(h * args.scale));
    }
    __syncthreads();  // h_s complete
    for (int e = threadIdx.x; e < t.m * cols; e += kThreads) {
        const int m = e / cols, c = e % cols, n = col0 + c;
        if (n >= t.n) continue;
        float v = bias_s[c];
        for (int p = 0; p < blocks; ++p)
            v += cluster.map_shared_rank(&y_part[0][0], p)[m * kClusterCols + rank * cols + c];
        for (int j = 0; j < t.r; ++j) v += h_s[m][j] * to_float(b_s[j][c]);
        static_cast<T*>(args.y)[static_cast<int64_t>(m) * t.n + n] = from_float<T>(v);
    }
    cluster.sync();  // every block done reading the others' partials before any of them exits
#else
    __trap();  // never launched there: lora_decode_supported refuses GPUs below sm_90 (clusters)
#endif
}

// How many clusters of `blocks` blocks the GPU holds at once (its GPCs, one block's registers and shared memory),
// asked once per device; the bf16 instance stands for all (their resources differ by a few registers)
int max_active_clusters(int blocks) {
    static int per_device[4][64] = {};
    const int slot = blocks == 8 ? 3 : blocks == 4 ? 2 : blocks == 2 ? 1 : 0;
    return lora_kernels::once_per_device(per_device[slot], 1, [blocks](int) {
        cudaLaunchAttribute attr{};
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = blocks, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
        cudaLaunchConfig_t config{};
        config.gridDim = dim3(blocks), config.blockDim = dim3(kThreads), config.attrs = &attr, config.numAttrs = 1;
        int clusters = 0;
        if (cudaOccupancyMaxActiveClusters(&clusters, lora_decode_kernel<__nv_bfloat16, float, true, false>,
                                           &config) != cudaSuccess) {
            (void)cudaGetLastError();  // (a launch would report a real failure; this only sizes the grid)
            clusters = 1;
        }
        return clusters;
    });
}

// Blocks a cluster (splitting K) for `groups` column groups: LoraDecodeArgs::cluster where given, else the most of
// 8, 4, 2 whose clusters all run at once (one wave: a second wave of a few clusters would double the time), else 1.
// H100, M16 K=N=4096: 32 groups; 8-block clusters at 2 blocks a multiprocessor fit 30 at once (ncu, 2026-12-07).
int cluster_blocks(const LoraDecodeArgs& args, int groups) {
    if (args.cluster > 0) return args.cluster;
    for (int blocks : {8, 4, 2})
        if (groups <= max_active_clusters(blocks)) return blocks;
    return 1;
}

template <typename T, typename TA, bool kQuant>
cudaError_t launch_for(const LoraDecodeArgs& args, cudaStream_t stream) {
    const int groups = (args.n + kClusterCols - 1) / kClusterCols, blocks = cluster_blocks(args, groups);
    const dim3 grid(groups * blocks), cluster(blocks);
    using lora_kernels::launch_in_clusters;
    if (args.m > 8)
        return launch_in_clusters(lora_decode_kernel<T, TA, true, kQuant>, grid, cluster, 0, stream, args);
    return launch_in_clusters(lora_decode_kernel<T, TA, false, kQuant>, grid, cluster, 0, stream, args);
}

template <typename T, typename TA>
cudaError_t launch_weight(const LoraDecodeArgs& args, cudaStream_t stream) {
    return args.packed != nullptr ? launch_for<T, TA, true>(args, stream) : launch_for<T, TA, false>(args, stream);
}

}  // namespace

bool lora_decode_supported(int64_t m, int64_t k, int64_t n, int64_t r) {
    return m >= 1 && m <= kLoraDecodeMaxRows && k >= 32 && k % 32 == 0 && k <= INT32_MAX && n >= 1 &&
           n <= INT32_MAX && r >= 1 && r <= kMaxRank && lora_device_major() >= 9;
}

cudaError_t launch_lora_decode(const LoraDecodeArgs& args, cudaStream_t stream) {
    const bool quant = args.packed != nullptr;
    if (!lora_decode_supported(args.m, args.k, args.n, args.r) ||
        (args.cluster != 0 && args.cluster != 1 && args.cluster != 2 && args.cluster != 4 && args.cluster != 8) ||
        (args.adapter_dtype != args.dtype && args.adapter_dtype != LoraDtype::kFloat32) ||
        (quant && (args.code == nullptr || !quant4_scales_given(args) ||  // (qgemv.cu's blocksizes: the same reads)
                   !qgemv_supports(args.m, args.k, args.blocksize, args.absmax == nullptr, args.blocksize2))))
        return cudaErrorInvalidValue;
    for (const void* p : {args.x, quant ? static_cast<const void*>(args.packed) : args.w, args.a})
        if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 != 0) return cudaErrorMisalignedAddress;
    const bool fp32 = args.adapter_dtype == LoraDtype::kFloat32;
    if (args.dtype == LoraDtype::kBFloat16)
        return fp32 ? launch_weight<__nv_bfloat16, float>(args, stream)
                    : launch_weight<__nv_bfloat16, __nv_bfloat16>(args, stream);
    if (args.dtype == LoraDtype::kFloat16)
        return fp32 ? launch_weight<__half, float>(args, stream) : launch_weight<__half, __half>(args, stream);
    return cudaErrorInvalidValue;
}
