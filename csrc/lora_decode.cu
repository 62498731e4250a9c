// Decode (M ≤ 16 rows) LoRA linear in one launch, for Hopper: y = x·Wᵀ (+ bias) + hs·Bᵀ with hs = s·x·Aᵀ rounded to
// the compute dtype T, as the rows kernel rounds it; the adapters (T or fp32) rounded to T as they are read. Without
// it, decode runs cuBLAS's GEMM (with its split-K reduction) and then the rows kernel adding the term: three launches,
// and a rows kernel whose every block walked all of A's K (H100, M16 K=N=4096: 6.8 + 1.9 + 9.5 µs GPU). W is T, or a
// bitsandbytes 4-bit weight dequantized in registers as qgemv.cu does it (QLoRA decode: there qgemv's every column
// block read all of x, 4× the packed weight's bytes at K=N=4096, then the rows kernel added the term).
//
// A cluster of kCluster blocks owns kClusterCols output columns and splits K among its blocks: block `rank` reads
// only its K slice of x, of those columns' rows of W and of A, so x and A are read once a cluster, not once a
// column block. Each warp multiplies x (16 rows; rows ≥ M are zeros) by two 8-column tiles of W and, for the first
// ⌈r/8⌉ warps, one 8-row tile of A, with mma.sync m16n8k16 over the slice (the k renaming of qgemv.cu: thread q of a
// quad takes 32 consecutive k of chunk 4·step + q, so every operand is a 16-byte load of a row). The partial sums
// go to shared memory; after a cluster barrier block `rank` finishes columns rank·16 … rank·16+15 of the cluster's
// by summing every block's partials through distributed shared memory in rank order (deterministic), then hs in the
// same order, then adds bias and hs·Bᵀ and stores y once.
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

constexpr int kCluster = 8;                   // blocks a cluster (the portable size): K split in 8
constexpr int kTilesW = 2;                    // 8-column tiles of W a warp
constexpr int kClusterCols = 8 * kTilesW * kWarps;  // 128 columns a cluster
constexpr int kBlockCols = kClusterCols / kCluster;  // of which each block finishes 16
constexpr int kMaxRank = 8 * kWarps;          // one 8-row tile of A a warp at most: 64
static_assert(kBlockCols * 16 == kThreads, "one output a thread in the epilogue");

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

// The spread layout of a thread's 32 elements of a row (from `row`, 16-byte aligned) for the 128-wide step starting at
// chunk c0, as 16 pairs of T: its v-th 8 elements are k = 32·(c0 + v) + 8q … + 7, so a quad's load reads 64 contiguous
// bytes. (The default, load_pairs of chunk c0 + q whole, puts each 16-byte load 64 bytes from its neighbours': a load
// instruction uses half of every 32-byte sector it touches; ncu: 52 % excessive sectors, L1 72 % busy.) x, W and A are
// read alike, so the mma's k renaming holds. Elements of chunks ≥ c_end, or of an invalid row, are zeros.
template <typename T, typename E>
__device__ __forceinline__ void load_spread_pairs(uint32_t (&r)[16], const E* row, int c0, int c_end, int q,
                                                  bool valid) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        const bool ok = valid && c0 + v < c_end;
        const E* p = row + 32 * (c0 + v) + 8 * q;
        uint4 u;
        if constexpr (std::is_same_v<E, float>) {
            const float4 f0 = ok ? __ldg(reinterpret_cast<const float4*>(p)) : make_float4(0.f, 0.f, 0.f, 0.f);
            const float4 f1 = ok ? __ldg(reinterpret_cast<const float4*>(p) + 1) : make_float4(0.f, 0.f, 0.f, 0.f);
            const float f[8] = {f0.x, f0.y, f0.z, f0.w, f1.x, f1.y, f1.z, f1.w};
            u = lora_kernels::pack8<T>(f);
        } else {
            u = ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
        }
        r[4 * v] = u.x, r[4 * v + 1] = u.y, r[4 * v + 2] = u.z, r[4 * v + 3] = u.w;
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

// kUpper: M > 8, x rows g + 8 exist; kQuant: W is a 4-bit weight (LoraDecodeArgs::packed); kSpread: load_spread_pairs's
// layout (nn.Linear weights only: a 4-bit row's 32 elements are one 16-byte load)
template <typename T, typename TA, bool kUpper, bool kQuant, bool kSpread = false>
__global__ void __launch_bounds__(kThreads, 2) lora_decode_kernel(const LoraDecodeArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ float y_part[16][kClusterCols];  // this block's partial sums over its K slice
    __shared__ float h_part[16][kMaxRank];
    __shared__ float h_s[16][kMaxRank];         // hs of every row: summed, scaled, rounded to T
    __shared__ float code[16];
    if (kQuant && threadIdx.x < 16) code[threadIdx.x] = args.code[threadIdx.x];
    const float offset = kQuant && args.absmax == nullptr ? __ldg(args.offset) : 0.f;
    if (kQuant) __syncthreads();
    auto cluster = cooperative_groups::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank());
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const int M = args.m, N = args.n, K = args.k, r = args.r;
    const int n0 = (blockIdx.x / kCluster) * kClusterCols;
    const T* x = static_cast<const T*>(args.x);
    const T* w = static_cast<const T*>(args.w);
    const TA* a = static_cast<const TA*>(args.a);

    const int chunks = K / 32, per_rank = (chunks + kCluster - 1) / kCluster;
    const int c_begin = min(chunks, rank * per_rank), c_end = min(chunks, c_begin + per_rank);
    const bool has_a = 8 * warp < r;
    float acc[kTilesW][4] = {}, acc_a[4] = {};
    for (int c0 = c_begin; c0 < c_end; c0 += 4) {
        const int c = c0 + q;  // this thread's chunk: k = 32c … 32c + 31 (unless kSpread)
        const bool in_k = c < c_end;
        uint32_t xlo[16], xhi[16] = {};
        if constexpr (kSpread) {
            load_spread_pairs<T>(xlo, x + static_cast<int64_t>(g) * K, c0, c_end, q, g < M);
            if constexpr (kUpper)
                load_spread_pairs<T>(xhi, x + static_cast<int64_t>(g + 8) * K, c0, c_end, q, g + 8 < M);
        } else {
            load_pairs<T>(xlo, x + static_cast<int64_t>(g) * K + 32 * c, in_k && g < M);
            if constexpr (kUpper) load_pairs<T>(xhi, x + static_cast<int64_t>(g + 8) * K + 32 * c, in_k && g + 8 < M);
        }
        uint32_t wt[kTilesW][16];
        uint4 packed[kTilesW];  // (4-bit: dequantized a tile at a time, just before its mmas, so fewer are live)
        float scale[kTilesW];
        if constexpr (kQuant) {
#pragma unroll
            for (int t = 0; t < kTilesW; ++t) {
                const int n = n0 + 16 * warp + 8 * t + g;
                const int64_t flat = static_cast<int64_t>(n) * K + 32 * c;
                packed[t] = make_uint4(0, 0, 0, 0);
                scale[t] = 0.f;  // (a missing row or chunk: code · 0)
                if (in_k && n < N) {
                    packed[t] = __ldg(reinterpret_cast<const uint4*>(args.packed + flat / 2));
                    scale[t] = quant4_block_absmax(args, flat / args.blocksize, offset);
                }
            }
        } else {
#pragma unroll
            for (int t = 0; t < kTilesW; ++t) {
                const int n = n0 + 16 * warp + 8 * t + g;
                if constexpr (kSpread)
                    load_spread_pairs<T>(wt[t], w + static_cast<int64_t>(n) * K, c0, c_end, q, n < N);
                else
                    load_pairs<T>(wt[t], w + static_cast<int64_t>(n) * K + 32 * c, in_k && n < N);
            }
        }
        uint32_t at[16];
        if (has_a && kSpread)
            load_spread_pairs<T>(at, a + static_cast<int64_t>(8 * warp + g) * K, c0, c_end, q, 8 * warp + g < r);
        else if (has_a)
            load_pairs<T>(at, a + static_cast<int64_t>(8 * warp + g) * K + 32 * c, in_k && 8 * warp + g < r);
#pragma unroll
        for (int t = 0; t < kTilesW; ++t) {
            if constexpr (kQuant) dequant_pairs<T>(wt[t], packed[t], scale[t], code);
            mma_step<T>(acc[t], xlo, xhi, wt[t]);
        }
        if (has_a) mma_step<T>(acc_a, xlo, xhi, at);
    }
    // accumulator i of an m16n8 tile: row g (+8 for i ≥ 2), column 2q (+1 for odd i)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
#pragma unroll
        for (int t = 0; t < kTilesW; ++t) y_part[row][16 * warp + 8 * t + col] = acc[t][i];
        h_part[row][8 * warp + col] = has_a ? acc_a[i] : 0.f;
    }
    cluster.sync();  // every block's partials written

    for (int e = threadIdx.x; e < 16 * kMaxRank; e += kThreads) {
        const int m = e / kMaxRank, j = e % kMaxRank;
        if (j >= r) continue;
        float h = 0.f;
        for (int p = 0; p < kCluster; ++p) h += cluster.map_shared_rank(&h_part[0][0], p)[m * kMaxRank + j];
        h_s[m][j] = to_float(from_float<T>(h * args.scale));
    }
    const int m = threadIdx.x / kBlockCols, col = rank * kBlockCols + threadIdx.x % kBlockCols, n = n0 + col;
    float v = 0.f;
    for (int p = 0; p < kCluster; ++p) v += cluster.map_shared_rank(&y_part[0][0], p)[m * kClusterCols + col];
    __syncthreads();  // h_s complete
    if (m < M && n < N) {
        const T* bias = static_cast<const T*>(args.bias);
        const TA* b = static_cast<const TA*>(args.b);
        if (bias != nullptr) v += to_float(bias[n]);
        for (int j = 0; j < r; ++j)  // (B rounded to T, as the rows kernel reads it)
            v += h_s[m][j] * to_float(from_float<T>(to_float(b[static_cast<int64_t>(n) * r + j])));
        static_cast<T*>(args.y)[static_cast<int64_t>(m) * N + n] = from_float<T>(v);
    }
    cluster.sync();  // every block done reading the others' partials before any of them exits
#else
    __trap();  // never launched there: lora_decode_supported refuses GPUs below sm_90 (clusters)
#endif
}

template <typename T, typename TA, bool kQuant, bool kSpread = false>
cudaError_t launch_for(const LoraDecodeArgs& args, cudaStream_t stream) {
    const dim3 grid((args.n + kClusterCols - 1) / kClusterCols * kCluster), cluster(kCluster);
    using lora_kernels::launch_in_clusters;
    if (args.m > 8)
        return launch_in_clusters(lora_decode_kernel<T, TA, true, kQuant, kSpread>, grid, cluster, 0, stream, args);
    return launch_in_clusters(lora_decode_kernel<T, TA, false, kQuant, kSpread>, grid, cluster, 0, stream, args);
}

template <typename T, typename TA>
cudaError_t launch_weight(const LoraDecodeArgs& args, cudaStream_t stream) {
    if (args.packed != nullptr) return launch_for<T, TA, true>(args, stream);
    return args.spread_loads ? launch_for<T, TA, false, true>(args, stream) : launch_for<T, TA, false>(args, stream);
}

}  // namespace

bool lora_decode_supported(int64_t m, int64_t k, int64_t n, int64_t r) {
    return m >= 1 && m <= kLoraDecodeMaxRows && k >= 32 && k % 32 == 0 && k <= INT32_MAX && n >= 1 &&
           n <= INT32_MAX && r >= 1 && r <= kMaxRank && lora_device_major() >= 9;
}

cudaError_t launch_lora_decode(const LoraDecodeArgs& args, cudaStream_t stream) {
    const bool quant = args.packed != nullptr;
    if (!lora_decode_supported(args.m, args.k, args.n, args.r) ||
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
