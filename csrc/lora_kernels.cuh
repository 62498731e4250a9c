// Kernel templates of lora_kernels.h, shared by lora_rows_fwd.cu, lora_rows_bwd.cu and lora_reduce.cu (one
// translation unit each, so that ninja builds them in parallel).
//
// Tensor-core work goes through WMMA (16×16×16 bf16/fp16 tiles, fp32 accumulation), except the rows kernel's phase 2,
// on mma.sync with its accumulators written from registers. Every operand goes through multi-stage cp.async
// pipelines, several tiles in flight per block and one __syncthreads per tile. Adapter weights are read in their own
// dtype (fp32 under PEFT's default autocast_adapter_dtype) and rounded to the compute dtype in shared memory, as
// autocast rounds them for cuBLAS; the rank is zero-padded to R (a multiple of 16) there.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "lora_kernels.h"

namespace lora_kernels {

using namespace nvcuda;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <int A, int B>
constexpr int cmax() { return A > B ? A : B; }

// ---------------------------------------------------------------------------------------------------------------
// Element conversions: 8 consecutive elements as one 16-byte vector of the compute dtype T

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float f[8]) {
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float f[8]) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_float<T>(f[i]);
    return u;
}

// ---------------------------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10 keyed by torch's seed; one call gives 128 bits = 8 uniform 16-bit numbers, the keep
// decisions of the 8 elements x[row][8·c8 … 8·c8+7]. keep ⇔ u16 ≥ round(p·65536): P(keep) = 1 − p to 2⁻¹⁷.

__device__ __forceinline__ uint4 philox10(uint4 c, uint2 k) {
#pragma unroll
    for (int i = 0; i < 10; ++i) {
        const uint32_t lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        const uint32_t lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

// (the key's high word is tagged, so that these streams never coincide with curand's Philox streams that torch's
// own kernels draw from the same seed)
constexpr uint32_t kKeyTag = 0x4C6F5241u;  // "LoRA"

__device__ __forceinline__ uint32_t keep_bits(uint64_t seed, uint64_t offset, uint32_t row, uint32_t c8,
                                              uint32_t threshold) {
    const uint4 u = philox10(make_uint4(c8, row, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)),
                             make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32) ^ kKeyTag));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
    uint32_t bits = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        bits |= static_cast<uint32_t>((w[i] & 0xFFFFu) >= threshold) << (2 * i);
        bits |= static_cast<uint32_t>((w[i] >> 16) >= threshold) << (2 * i + 1);
    }
    return bits;
}

__device__ __forceinline__ uint32_t keep_threshold(float p) {
    return static_cast<uint32_t>(fminf(fmaxf(rintf(p * 65536.f), 0.f), 65536.f));
}

// ---------------------------------------------------------------------------------------------------------------
// Multi-stage copies (cp.async, sm_80+): global → shared without registers, several tiles in flight per block, so
// that a block's walk over K or over rows is not one memory latency a tile (with one register-staged tile per block
// the rows kernel ran at ~40% of DRAM bandwidth at M8192; it still does, now bound by L2 traffic: see the rows
// kernel). Each thread copies whole 8-element chunks and afterwards transforms only its own chunks in place
// (dropout, fp32 → T), which its own wait makes visible to it; one barrier then publishes the stage.

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0) : "memory");
#endif
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(src) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// until at most N of this thread's committed groups are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// 8 elements of E (16 or 32 bytes) from src to dst (both 16-byte aligned); zeros without reading when !valid
template <typename E>
__device__ __forceinline__ void copy8_async(E* dst, const E* src, bool valid) {
    constexpr int kPer = 16 / int(sizeof(E));  // elements a 16-byte piece
#pragma unroll
    for (int v = 0; v < 8 / kPer; ++v) cp_async16(dst + v * kPer, valid ? src + v * kPer : src, valid);
}

// chunk q's 8 elements at s as floats / written back as T (E: the stage's element type)
template <typename E>
__device__ __forceinline__ void read8(const E* s, float f[8]) {
    if constexpr (std::is_same_v<E, float>) {
        const float4 lo = reinterpret_cast<const float4*>(s)[0], hi = reinterpret_cast<const float4*>(s)[1];
        f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w, f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
    } else {
        unpack8<E>(*reinterpret_cast<const uint4*>(s), f);
    }
}

// the 8 elements of one chunk under its keep bits (bit e keeps element e, scaled by 1/(1−p))
__device__ __forceinline__ void apply_keep(float f[8], uint32_t bits, float inv_keep) {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = (bits >> e) & 1u ? f[e] * inv_keep : 0.f;
}

// this thread's chunks of a stage (elements E, laid out by Src::at) rounded into d (T, laid out by Dst::at: the same
// chunks, another padding)
template <typename Src, typename Dst, typename E, typename T>
__device__ __forceinline__ void convert_own_chunks(const E* s, T* d) {
    static_assert(Src::kChunks == Dst::kChunks, "one chunk order");
#pragma unroll
    for (int i = 0; i < Src::kPerThread; ++i) {
        const int q = threadIdx.x + i * kThreads;
        if (q >= Src::kChunks) continue;
        float f[8];
        read8(s + Src::at(q), f);
        *reinterpret_cast<uint4*>(d + Dst::at(q)) = pack8<T>(f);
    }
}

// ROWS × COLS (COLS % 8 == 0) of a row-major rows×cols matrix of E (cols % 8 == 0, rows 16-byte aligned), rows
// [row0…) × columns [col0…), into s[ROWS][LD]; zeros outside the matrix
template <typename E, int ROWS, int COLS, int LD>
struct RowStage {
    static constexpr int kChunks = ROWS * COLS / 8;
    static constexpr int kPerThread = (kChunks + kThreads - 1) / kThreads;

    __device__ static __forceinline__ int at(int q) { return (q / (COLS / 8)) * LD + 8 * (q % (COLS / 8)); }

    __device__ static __forceinline__ void issue(E* s, const E* src, int rows, int cols, int row0, int col0) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            if (q >= kChunks) continue;
            const int row = row0 + q / (COLS / 8), col = col0 + 8 * (q % (COLS / 8));
            const bool valid = row < rows && col < cols;
            copy8_async(s + at(q), valid ? src + static_cast<int64_t>(row) * cols + col : src, valid);
        }
    }

    // this thread's chunks of s (E) rounded into d (T), same layout
    template <typename T>
    __device__ static __forceinline__ void convert(const E* s, T* d) {
        convert_own_chunks<RowStage, RowStage, E, T>(s, d);
    }

    // this thread's chunks of s written to dst (rows×cols, row-major) at rows [row0…) / columns [col0…), where inside
    __device__ static __forceinline__ void store_own(const E* s, E* dst, int rows, int cols, int row0, int col0) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            const int row = row0 + q / (COLS / 8), col = col0 + 8 * (q % (COLS / 8));
            if (q < kChunks && row < rows && col < cols)
                *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(row) * cols + col) =
                    *reinterpret_cast<const uint4*>(s + at(q));
        }
    }

    // dropout on this thread's chunks of s, in place: keep bits drawn for rows [row0…) / columns [col0…) of x and
    // written to mask (when not null) as one byte per 8 elements
    __device__ static __forceinline__ void drop(E* s, int rows, int cols, int row0, int col0, uint64_t seed,
                                                uint64_t offset, uint32_t threshold, float inv_keep, uint8_t* mask) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            const int row = row0 + q / (COLS / 8), col = col0 + 8 * (q % (COLS / 8));
            if (q >= kChunks || row >= rows || col >= cols) continue;
            const uint32_t bits = keep_bits(seed, offset, row, col / 8, threshold);
            if (mask != nullptr) mask[static_cast<int64_t>(row) * (cols / 8) + col / 8] = static_cast<uint8_t>(bits);
            float f[8];
            read8(s + at(q), f);
            apply_keep(f, bits, inv_keep);
            *reinterpret_cast<uint4*>(s + at(q)) = pack8<E>(f);
        }
    }

    // a saved mask on s's chunks, in place, zeroing the dropped 16-bit elements with integer ANDs (no float round
    // trip; the 1/(1−p) of the kept ones is left to the caller, applied once to the fp32 sums): keep[ROWS][COLS / 8]
    // bytes in shared memory (any thread's copies: call after a barrier)
    __device__ static __forceinline__ void zero_dropped(E* s, const uint8_t* keep) {
        static_assert(sizeof(E) == 2, "16-bit elements: two a word");
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            if (q >= kChunks) continue;
            const uint32_t bits = keep[q];  // (row q / (COLS/8), byte q % (COLS/8): the same order)
            uint4 v = *reinterpret_cast<const uint4*>(s + at(q));
            uint32_t* w = &v.x;
#pragma unroll
            for (int h = 0; h < 4; ++h) {  // word h holds elements 2h (low half) and 2h + 1 (high half)
                const uint32_t two = bits >> (2 * h);
                w[h] &= ((two & 1u) ? 0x0000FFFFu : 0u) | ((two & 2u) ? 0xFFFF0000u : 0u);
            }
            *reinterpret_cast<uint4*>(s + at(q)) = v;
        }
    }
};

// ROWS × R of a rows×r matrix of E (r ≤ R; zeros past r), rows [row0…), into s[ROWS][LD]. Rows are r elements long:
// copies only when r % 8 == 0 (every chunk then lies in one row, 16-byte aligned); otherwise plain loads and stores
// (odd ranks pay the latency)
template <typename E, int ROWS, int R, int LD>
struct RankStage {
    static constexpr int kChunks = ROWS * R / 8;
    static constexpr int kPerThread = (kChunks + kThreads - 1) / kThreads;

    __device__ static __forceinline__ int at(int q) { return (q / (R / 8)) * LD + 8 * (q % (R / 8)); }

    __device__ static __forceinline__ void issue(E* s, const E* src, int rows, int r, int row0) {
        const bool vec = (r & 7) == 0;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            if (q >= kChunks) continue;
            const int row = row0 + q / (R / 8), j0 = 8 * (q % (R / 8));
            const bool valid = row < rows && j0 < r;
            const E* p = src + static_cast<int64_t>(row) * r + j0;
            if (vec || !valid) {
                copy8_async(s + at(q), valid ? p : src, valid);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) s[at(q) + e] = j0 + e < r ? p[e] : from_float<E>(0.f);
            }
        }
    }

    template <typename T>
    __device__ static __forceinline__ void convert(const E* s, T* d) {
        convert_own_chunks<RankStage, RankStage, E, T>(s, d);
    }

    // this thread's chunks of s written to dst (rows×r, row-major) at rows [row0…), where inside
    __device__ static __forceinline__ void store_own(const E* s, E* dst, int rows, int r, int row0) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            const int row = row0 + q / (R / 8), j0 = 8 * (q % (R / 8));
            if (q >= kChunks || row >= rows || j0 >= r) continue;
            E* p = dst + static_cast<int64_t>(row) * r + j0;
            if ((r & 7) == 0) {
                *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(s + at(q));
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    if (j0 + e < r) p[e] = s[at(q) + e];
            }
        }
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Warp-level MMA (sm_80+): mma.sync m16n8k16 with fp32 accumulators, fragments loaded by ldmatrix, whose register
// layouts are documented (PTX ISA, "Matrix fragments for mma.m16n8k16"), unlike WMMA's: an accumulator stays in
// registers up to the global store. Lane l = 4g + q holds d0, d1 at (row g, columns 2q, 2q + 1), d2, d3 at row g + 8.

// four 8×8 16-bit matrices; lanes 8i … 8i+7 give the row addresses of matrix i (16-byte aligned), register i gets
// matrix i: lane 4g + q its row g, elements 2q, 2q+1 (.trans: its column g, elements 2q, 2q+1)
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
#endif
}

// d += a · b: a 16×16 (row-major fragment, 4 registers), b 16×8 (column fragment, 2 registers), d 16×8 fp32
template <typename T>
__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The 4 lanes of a quad (lane = 4g + q) each hold 4 pairs w[0…3]; afterwards lane q holds, in w[p], the pair w[q] that
// lane p held (a 4×4 transpose over the quad: two exchange rounds, 8 shuffles)
__device__ __forceinline__ void quad_transpose(float2 w[4]) {
    const int q = threadIdx.x & 3;
    auto swap = [](float2 v, int mask) {
        return make_float2(__shfl_xor_sync(0xFFFFFFFFu, v.x, mask), __shfl_xor_sync(0xFFFFFFFFu, v.y, mask));
    };
    {  // lanes q, q ^ 2 trade the 2×2 blocks off the diagonal: pairs 2, 3 of the lower lane for 0, 1 of the upper
        const bool up = q & 2;
        const float2 a = swap(up ? w[0] : w[2], 2), b = swap(up ? w[1] : w[3], 2);
        if (up) w[0] = a, w[1] = b;
        else w[2] = a, w[3] = b;
    }
    {  // lanes q, q ^ 1 trade within the blocks: pairs 1, 3 of the lower lane for 0, 2 of the upper
        const bool up = q & 1;
        const float2 a = swap(up ? w[0] : w[1], 1), b = swap(up ? w[2] : w[3], 1);
        if (up) w[0] = a, w[2] = b;
        else w[1] = a, w[3] = b;
    }
}

// Stages that fit a budget: consumer GPUs (sm_86 / sm_89) give a block at most 99 KiB of shared memory
constexpr int kSmemBudget = 96 * 1024;

constexpr int stages_for(int stage_bytes, int fixed_bytes, int most) {
    const int fit = (kSmemBudget - fixed_bytes) / stage_bytes;
    return fit < 2 ? 2 : fit > most ? most : fit;
}

// Lets `kernel` (one instantiation) launch with BYTES of dynamic shared memory, once per device (the attribute
// belongs to the device's context). Always, not only above 48 KiB: a kernel's static shared memory counts against
// the same default limit (the reduce kernel's 1-byte flag beside exactly 48 KiB failed its launch, H100).
// (keyed by the kernel itself: all rows kernels share one function-pointer type)
template <auto Kernel, int BYTES>
cudaError_t allow_dynamic_smem() {
    static bool done[64] = {};
    int device = 0;
    if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
    if (device < 64 && done[device]) return cudaSuccess;
    const cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, BYTES);
    if (err == cudaSuccess && device < 64) done[device] = true;
    return err;
}

// kernel<<<grid, kThreads, smem, stream>>>(args) in clusters of `cluster` blocks (sm_90+: the caller checks)
template <typename Kernel, typename Args>
cudaError_t launch_in_clusters(Kernel kernel, dim3 grid, dim3 cluster, int smem, cudaStream_t stream,
                               const Args& args) {
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster.x, attr.val.clusterDim.y = cluster.y, attr.val.clusterDim.z = cluster.z;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &attr;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, args);
}

// ---------------------------------------------------------------------------------------------------------------
// The rows kernel. A block owns BM rows of `in`: phase 1 reduces them over K1 against w1 (small = s · in · w1ᵀ or
// s · in · w1, M×R in registers, then shared memory), phase 2 expands small against w2 into out, BN columns at a
// time. gridDim.y > 1 splits phase 2's columns over blocks (each recomputes phase 1: for few rows, as in decode). On
// Hopper those blocks can instead form clusters along y (LoraRowsArgs::cluster_k) that split phase 1's K among them
// and sum their partials through distributed shared memory, in rank order: a decode block walks 1/8 of K, not all.
// Where the time goes at training sizes (ncu, H100, M8192 K=N=4096 r16, fp32 adapters, 32-row blocks, p 0; 2026-12-06):
// forward 85 µs, backward 96 µs, DRAM at 40% / 36% of its bandwidth but L2 at 64% / 65% and L1 at 70% / 67%, 2 blocks
// a multiprocessor (shared memory). Every row block reads the whole of both adapters (A in phase 1, B in phase 2:
// 2 × 256 KiB in fp32), 128 MiB from L2 beside x's and y's 128 MiB from DRAM; phase 2 then staged one w2 tile at a time
// through registers and round-tripped each WMMA fragment through a shared-memory patch to store it (now: a cp.async
// pipeline and mma.sync fragments stored from registers; the backward reads the forward's bf16 copies of fp32
// adapters).

template <typename T, typename TA, int R, int BM, bool BWD>
struct RowsConfig {
    static constexpr bool kSame = std::is_same_v<T, TA>;                // adapters in the compute dtype
    static constexpr int BK = R <= 32 ? 128 : (R == 64 ? 64 : 32);    // phase-1 columns per stage
    // phase-2 columns per tile: a w2 tile of 8192 elements at most (fp32 adapters: 4096, for the same 16 KiB)
    static constexpr int BN = std::min(256, (kSame ? 8192 : 4096) / R);
    static constexpr int LDX = BK + 8;
    // w1 tile: forward A[j][k] (rank-major: R rows of BK), backward B[n][j] (BK rows of R)
    static constexpr int W1_ROWS = BWD ? BK : R, LD1 = BWD ? R + 8 : BK + 8;
    // w2 tile: forward B[n][j] (BN rows of R), backward A[j][k] (R rows of BN); in T, padded for ldmatrix
    static constexpr int W2_ROWS = BWD ? R : BN, LD2 = BWD ? BN + 8 : R + 8;
    static constexpr int LDH = R + 8;
    static constexpr int LDR = R + 4;
    static constexpr int FR1 = (BM / 16) * (R / 16);                // phase-1 output fragments
    static constexpr int KS1 = FR1 >= kWarps ? 1 : kWarps / FR1;    // warps splitting each tile's k-steps
    static constexpr int FPW1 = FR1 >= kWarps ? FR1 / kWarps : 1;
    static constexpr int FR2 = (BM / 16) * (BN / 16);               // phase-2 16×16 output units
    static constexpr int FPW2 = FR2 >= kWarps ? FR2 / kWarps : 1;   // (FR2 < kWarps: warps ≥ FR2 idle in MMA)
    // phase 1's stages: x (T) and w1 as stored (TA); fp32 adapters are rounded into one of two T buffers
    static constexpr int X_ELEMS = BM * LDX, W1_ELEMS = W1_ROWS * LD1, W2_ELEMS = W2_ROWS * LD2;
    static constexpr int STAGE_BYTES = X_ELEMS * int(sizeof(T)) + W1_ELEMS * int(sizeof(TA));
    static constexpr int W1T_BYTES = kSame ? 0 : 2 * W1_ELEMS * int(sizeof(T));
    // more stages for fewer rows a block: decode's few blocks walk K alone (latency), training's keep 2–3 a multiprocessor
    static constexpr int STAGES = stages_for(STAGE_BYTES, W1T_BYTES, BM == 16 ? 6 : BM == 32 ? 4 : 3);
    static constexpr int P1_BYTES = STAGES * STAGE_BYTES + W1T_BYTES;
    // phase 2, in the same bytes: Hs; S2 stages of w2 tiles as stored (fp32 ones unpadded: only the thread that
    // copied a chunk reads it, to round it into T); the tail: (fp32 adapters) two w2 tiles in T, where phase 1's
    // k-split sums lay before they became Hs. S2: what phase 1's bytes leave room for, 2 to 4.
    static constexpr int W2R_LD = kSame ? LD2 : (BWD ? BN : R);
    static constexpr int W2R_BYTES = W2_ROWS * W2R_LD * int(sizeof(TA));
    static constexpr int HS_BYTES = (BM * LDH * int(sizeof(T)) + 127) / 128 * 128;
    static constexpr int TAIL_BYTES = cmax<kSame ? 0 : 2 * W2_ELEMS * int(sizeof(T)), KS1 * BM * LDR * 4>();
    static constexpr int S2 = std::clamp((P1_BYTES - HS_BYTES - TAIL_BYTES) / W2R_BYTES, 2, 4);
    static constexpr int RAW_OFF = HS_BYTES, TAIL_OFF = HS_BYTES + S2 * W2R_BYTES;
    static constexpr int SMEM = cmax<P1_BYTES, TAIL_OFF + TAIL_BYTES>();
    static_assert(BK % (16 * KS1) == 0, "each k-split warp needs whole 16-wide steps");
    static_assert(FPW2 <= BN / 16, "a warp's phase-2 units share one 16-row block of Hs");
    static_assert(SMEM <= kSmemBudget, "a rows kernel configuration must fit consumer GPUs' shared memory");
    static_assert(STAGE_BYTES % 32 == 0 && X_ELEMS * sizeof(T) % 32 == 0 && W2R_BYTES % 32 == 0 &&
                      TAIL_OFF % 32 == 0 && W2_ELEMS * sizeof(T) % 32 == 0,
                  "WMMA tiles start 32-byte aligned, ldmatrix rows and cp.async chunks 16-byte aligned");
};

template <typename T, typename TA, int R, int BM, bool BWD>
__global__ void __launch_bounds__(kThreads) lora_rows_kernel(LoraRowsArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // never launched there: lora_kernels_support refuses GPUs below sm_80 (bf16 WMMA)
#else
    using Cfg = RowsConfig<T, TA, R, BM, BWD>;
    constexpr int BK = Cfg::BK, BN = Cfg::BN, S = Cfg::STAGES;
    extern __shared__ __align__(128) unsigned char smem[];
    // phase 1: S stages of (x tile, w1 tile as stored), then (fp32 adapters) two w1 tiles in T; phase 2 reuses the
    // same bytes (RowsConfig: Hs, the w2 stages, the tail)
    auto x_stage = [&](int st) { return reinterpret_cast<T*>(smem + st * Cfg::STAGE_BYTES); };
    auto w1_stage = [&](int st) {
        return reinterpret_cast<TA*>(smem + st * Cfg::STAGE_BYTES + Cfg::X_ELEMS * int(sizeof(T)));
    };
    T* w1t = reinterpret_cast<T*>(smem + S * Cfg::STAGE_BYTES);
    T* hs = reinterpret_cast<T*>(smem);
    float* fs = reinterpret_cast<float*>(smem + Cfg::TAIL_OFF);

    const int warp = threadIdx.x / 32;
    const int m0 = blockIdx.x * BM;
    const int M = args.m, K1 = args.k1, N2 = args.n2, r = args.r;
    const T* in = static_cast<const T*>(args.in);
    const TA* w1 = static_cast<const TA*>(args.w1);
    const TA* w2 = static_cast<const TA*>(args.w2);
    const bool first_y = blockIdx.y == 0;
    // phase 1's K split over the cluster's blocks along y (1: each block walks all of K). Code built for GPUs without
    // clusters walks all of K in every block whatever the launch: the same sums, none of the gain.
#if __CUDA_ARCH__ >= 900
    const int ksplit = max(1, args.cluster_k);
#else
    const int ksplit = 1;
#endif
    const int krank = blockIdx.y % ksplit;
    // the blocks whose phase 1 is the first to cover its K tiles (they write the mask and A's rounded copy)
    const bool first_cover = blockIdx.y < ksplit;
    if (blockIdx.x == 0 && first_y)
        for (int i = threadIdx.x; i < args.zero_count; i += kThreads) args.zero[i] = 0;
    const bool phase2_only = args.small_ready;  // (small holds phase 1's result: LoraRowsArgs::two_pass)

    const bool dropout = !BWD && args.p > 0.f && !phase2_only;
    uint64_t seed = 0, offset = 0;
    if (dropout) {
        const LoraPhilox& ph = args.philox;
        seed = ph.captured ? static_cast<uint64_t>(*ph.seed_ptr) : ph.seed;
        offset = ph.captured ? static_cast<uint64_t>(*ph.offset_ptr) + ph.offset_intragraph : ph.offset;
    }
    const uint32_t threshold = keep_threshold(args.p);
    const float inv_keep = args.p > 0.f ? 1.f / (1.f - args.p) : 1.f;
    uint8_t* mask_out = dropout && first_cover ? args.mask : nullptr;

    // ---- phase 1: small = scale · in[m0:m0+BM] · w1 over K1, S − 1 tiles in flight
    using XStage = RowStage<T, BM, BK, Cfg::LDX>;
    using W1Stage = std::conditional_t<BWD, RankStage<TA, BK, R, Cfg::LD1>, RowStage<TA, R, BK, Cfg::LD1>>;
    using B1Layout = std::conditional_t<BWD, wmma::row_major, wmma::col_major>;
    const int k_tiles = phase2_only ? 0 : (K1 + BK - 1) / BK, per_rank = (k_tiles + ksplit - 1) / ksplit;
    const int t1_begin = min(k_tiles, krank * per_rank), tiles1 = min(k_tiles, t1_begin + per_rank) - t1_begin;
    auto issue = [&](int i) {  // this block's tile i into stage i % S; one commit group per call, empty past the end
        if (i < tiles1) {
            const int st = i % S, k0 = (t1_begin + i) * BK;
            XStage::issue(x_stage(st), in, M, K1, m0, k0);
            if constexpr (BWD) W1Stage::issue(w1_stage(st), w1, K1, r, k0);  // B rows k0…: K1×r
            else W1Stage::issue(w1_stage(st), w1, r, K1, 0, k0);             // A columns k0…: r×K1
        }
        cp_async_commit();
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc1[Cfg::FPW1];
#pragma unroll
    for (int i = 0; i < Cfg::FPW1; ++i) wmma::fill_fragment(acc1[i], 0.f);
    const int group = warp / Cfg::KS1, ks = warp % Cfg::KS1;

#pragma unroll
    for (int t = 0; t < S - 1; ++t) issue(t);
    for (int i = 0; i < tiles1; ++i) {
        cp_async_wait<S - 2>();  // this thread's copies of tile i have landed
        const int st = i % S, t = t1_begin + i;
        T* x_s = x_stage(st);
        if (dropout) XStage::drop(x_s, M, K1, m0, t * BK, seed, offset, threshold, inv_keep, mask_out);
        const T* w_s;
        if constexpr (Cfg::kSame) {
            w_s = w1_stage(st);
        } else {  // (the buffer held tile i − 2, which every warp finished before the last barrier)
            T* d = w1t + (i & 1) * Cfg::W1_ELEMS;
            W1Stage::convert(w1_stage(st), d);
            w_s = d;
            if constexpr (!BWD) {  // A's rounded copy: tile t from block t mod gridDim.x
                using W1T = RowStage<T, R, BK, Cfg::LD1>;
                if (args.w1_copy != nullptr && first_cover && t % gridDim.x == blockIdx.x)
                    W1T::store_own(d, static_cast<T*>(args.w1_copy), r, K1, 0, t * BK);
            }
        }
        __syncthreads();  // tile i visible to all; every warp is done with tile i − 1, whose stage the next copies take
        issue(i + S - 1);
#pragma unroll
        for (int s = ks; s < BK / 16; s += Cfg::KS1) {
#pragma unroll
            for (int i = 0; i < Cfg::FPW1; ++i) {
                const int f = group * Cfg::FPW1 + i, mb = f / (R / 16), jb = f % (R / 16);
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, B1Layout> b;
                wmma::load_matrix_sync(a, x_s + mb * 16 * Cfg::LDX + s * 16, Cfg::LDX);
                if constexpr (BWD) wmma::load_matrix_sync(b, w_s + s * 16 * Cfg::LD1 + jb * 16, Cfg::LD1);
                else wmma::load_matrix_sync(b, w_s + jb * 16 * Cfg::LD1 + s * 16, Cfg::LD1);
                wmma::mma_sync(acc1[i], a, b, acc1[i]);
            }
        }
    }
    cp_async_wait<0>();  // (only empty groups are left)
    __syncthreads();     // every warp is done with the stages: phase 2's buffers below reuse their bytes

    // ---- phase 2 starts its copies now: out[m0:m0+BM, cols] = Hs · w2 (+ bias + addend | masked), BN columns a
    // tile, S2 − 1 tiles of w2 in flight, the first ones landing while Hs is made
    const int tiles2 = (N2 + BN - 1) / BN;
    const int per_y = (tiles2 + gridDim.y - 1) / gridDim.y;
    const int t_begin = blockIdx.y * per_y, t_end = args.out != nullptr ? min(tiles2, t_begin + per_y) : t_begin;
    constexpr int S2 = Cfg::S2;
    using W2Raw = std::conditional_t<BWD, RowStage<TA, R, BN, Cfg::W2R_LD>, RankStage<TA, BN, R, Cfg::W2R_LD>>;
    using W2T = std::conditional_t<BWD, RowStage<T, R, BN, Cfg::LD2>, RankStage<T, BN, R, Cfg::LD2>>;
    auto w2_raw = [&](int st) { return reinterpret_cast<TA*>(smem + Cfg::RAW_OFF + st * Cfg::W2R_BYTES); };
    auto issue2 = [&](int i) {  // tile t_begin + i into stage i % S2; one commit group per call
        const int t = t_begin + i;
        if (t < t_end) {
            if constexpr (BWD) W2Raw::issue(w2_raw(i % S2), w2, r, N2, 0, t * BN);  // A columns: r×N2
            else W2Raw::issue(w2_raw(i % S2), w2, N2, r, t * BN);                   // B rows: N2×r
        }
        cp_async_commit();
    };
    if (t_begin < t_end)
#pragma unroll
        for (int i = 0; i < S2 - 1; ++i) issue2(i);

    T* small = static_cast<T*>(args.small);
    if (phase2_only) {  // Hs as phase 1 of the launch before wrote it (the same rounded values, zero-padded)
        for (int e = threadIdx.x; e < BM * R; e += kThreads) {
            const int m = e / R, j = e % R;
            hs[m * Cfg::LDH + j] =
                j < r && m0 + m < M ? small[static_cast<int64_t>(m0 + m) * r + j] : from_float<T>(0.f);
        }
    } else {  // k-split partial sums → shared floats → scale, round to T → Hs (and the global M×r copy)
#pragma unroll
        for (int i = 0; i < Cfg::FPW1; ++i) {
            const int f = group * Cfg::FPW1 + i, mb = f / (R / 16), jb = f % (R / 16);
            wmma::store_matrix_sync(fs + (ks * BM + mb * 16) * Cfg::LDR + jb * 16, acc1[i], Cfg::LDR,
                                    wmma::mem_row_major);
        }
        __syncthreads();
        constexpr int kPer = (BM * R + kThreads - 1) / kThreads;  // elements of Hs a thread makes
        float v[kPer];
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
            const int e = threadIdx.x + u * kThreads, m = e / R, j = e % R;
            v[u] = 0.f;
            if (e < BM * R)
#pragma unroll
                for (int q = 0; q < Cfg::KS1; ++q) v[u] += fs[(q * BM + m) * Cfg::LDR + j];
        }
#if __CUDA_ARCH__ >= 900
        if (ksplit > 1) {  // this block's partials into fs's first BM·R floats; every block sums all, in rank order
            auto cluster = cooperative_groups::this_cluster();
            __syncthreads();  // every thread has read its k-split sums out of fs
#pragma unroll
            for (int u = 0; u < kPer; ++u)
                if (threadIdx.x + u * kThreads < BM * R) fs[threadIdx.x + u * kThreads] = v[u];
            cluster.sync();  // every block's partials written
#pragma unroll
            for (int u = 0; u < kPer; ++u) {
                const int e = threadIdx.x + u * kThreads;
                v[u] = 0.f;
                if (e < BM * R)
                    for (int q = 0; q < ksplit; ++q) v[u] += cluster.map_shared_rank(fs, q)[e];
            }
            cluster.sync();  // every block done reading: phase 2 may take fs's bytes, and a block may exit
        }
#endif
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
            const int e = threadIdx.x + u * kThreads, m = e / R, j = e % R;
            if (e >= BM * R) continue;
            const T h = from_float<T>(v[u] * args.scale);
            hs[m * Cfg::LDH + j] = h;
            if (small != nullptr && first_y && j < r && m0 + m < M) small[static_cast<int64_t>(m0 + m) * r + j] = h;
        }
    }
    if (t_begin >= t_end) return;  // (forward inference without out, backward without dx: Hs was the point)
    __syncthreads();  // Hs complete; the k-split sums consumed (the w2 tiles in T take their bytes)

    // Each warp owns FPW2 16×16 units of a tile, all in one 16-row block of Hs, whose A fragments it loads once. A
    // unit is two m16n8k16 products a k-step; its accumulators go straight to global memory: a quad transpose gives
    // each lane 8 consecutive outputs of one row (lane 4g + q: row g + 8·(q / 2), columns 8·(q % 2) …), stored as
    // one 16-byte vector after the bias / addend / keep bits. No shared-memory round trip, no warp barrier.
    const int lane = threadIdx.x % 32;
    const bool mma_warp = Cfg::FR2 >= kWarps || warp < Cfg::FR2;
    const int mb = warp * Cfg::FPW2 / (BN / 16), nb0 = warp * Cfg::FPW2 % (BN / 16);
    const int prow = lane / 4 + 8 * ((lane & 3) >> 1), pcol = 8 * (lane & 1);  // this lane's outputs in a unit
    uint32_t afrag[R / 16][4];
    if (mma_warp)
#pragma unroll
        for (int js = 0; js < R / 16; ++js)
            ldmatrix_x4<false>(afrag[js], hs + (mb * 16 + (lane & 15)) * Cfg::LDH + js * 16 + (lane >> 4) * 8);
    // ldmatrix row addresses of a unit's w2 fragments (k-step js, unit column nb): register pairs (0, 1) and (2, 3)
    // are the two n8 halves. Forward: B stored [n][j] (non-transposed load), backward: A stored [j][k] (transposed).
    const int lm = lane >> 3, lr = lane & 7;
    auto w2_row = [&](const T* w_s, int js, int nb) {
        if constexpr (BWD) return w_s + (js * 16 + (lm & 1) * 8 + lr) * Cfg::LD2 + nb * 16 + (lm >> 1) * 8;
        else return w_s + (nb * 16 + (lm >> 1) * 8 + lr) * Cfg::LD2 + js * 16 + (lm & 1) * 8;
    };
    T* out = static_cast<T*>(args.out);
    const T* bias = static_cast<const T*>(args.bias);
    const T* addend = static_cast<const T*>(args.addend);
    const uint8_t* mask_in = BWD && args.p > 0.f ? args.mask : nullptr;
    T* w2t = reinterpret_cast<T*>(smem + Cfg::TAIL_OFF);
    for (int t = t_begin; t < t_end; ++t) {
        const int i = t - t_begin;
        cp_async_wait<S2 - 2>();  // this thread's copies of tile i have landed
        const T* w_s;
        if constexpr (Cfg::kSame) {
            w_s = w2_raw(i % S2);
        } else {  // (the buffer held tile i − 2, which every warp finished before the last barrier)
            T* d = w2t + (i & 1) * Cfg::W2_ELEMS;
            convert_own_chunks<W2Raw, W2T>(w2_raw(i % S2), d);
            w_s = d;
            if constexpr (!BWD) {  // B's rounded copy: tile t from block t mod gridDim.x (of the blocks that have it)
                if (args.w2_copy != nullptr && t % gridDim.x == blockIdx.x)
                    W2T::store_own(d, static_cast<T*>(args.w2_copy), N2, r, t * BN);
            }
        }
        // what this lane adds to / masks its outputs with, for all of the warp's units, loaded before any of them
        // is computed: one memory latency a tile, not one a unit
        uint4 extra[Cfg::FPW2];
        uint32_t keep[Cfg::FPW2];
        if (mma_warp) {
#pragma unroll
            for (int u = 0; u < Cfg::FPW2; ++u) {
                const int row = m0 + mb * 16 + prow, col = t * BN + (nb0 + u) * 16 + pcol;
                const bool inside = row < M && col < N2;
                extra[u] = make_uint4(0u, 0u, 0u, 0u);
                keep[u] = 0xFFu;
                if constexpr (BWD) {
                    if (mask_in != nullptr && inside) keep[u] = mask_in[static_cast<int64_t>(row) * (N2 / 8) + col / 8];
                } else {
                    if (addend != nullptr && inside)
                        extra[u] = __ldg(reinterpret_cast<const uint4*>(addend + static_cast<int64_t>(row) * N2 + col));
                }
            }
        }
        __syncthreads();  // tile i visible to all; every warp is done with tile i − 1, whose stage the next copies take
        issue2(i + S2 - 1);
        if (!mma_warp) continue;
#pragma unroll
        for (int u = 0; u < Cfg::FPW2; ++u) {
            const int nb = nb0 + u;
            float acc[2][4] = {};
#pragma unroll
            for (int js = 0; js < R / 16; ++js) {
                uint32_t b[4];
                ldmatrix_x4<BWD>(b, w2_row(w_s, js, nb));
                mma16816<T>(acc[0], afrag[js], b[0], b[1]);
                mma16816<T>(acc[1], afrag[js], b[2], b[3]);
            }
            // pairs: (row g, half 0), (row g, half 1), (row g + 8, half 0), (row g + 8, half 1)
            float2 w[4] = {make_float2(acc[0][0], acc[0][1]), make_float2(acc[1][0], acc[1][1]),
                           make_float2(acc[0][2], acc[0][3]), make_float2(acc[1][2], acc[1][3])};
            quad_transpose(w);
            const int row = m0 + mb * 16 + prow, col = t * BN + nb * 16 + pcol;
            if (row >= M || col >= N2) continue;
            float v[8] = {w[0].x, w[0].y, w[1].x, w[1].y, w[2].x, w[2].y, w[3].x, w[3].y};
            if constexpr (BWD) {
                if (mask_in != nullptr) apply_keep(v, keep[u], inv_keep);
            } else {
                float g[8];
                if (bias != nullptr) {  // (8 KiB at most, read by every row block: L1 / L2)
                    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(bias + col)), g);
#pragma unroll
                    for (int e = 0; e < 8; ++e) v[e] += g[e];
                }
                if (addend != nullptr) {
                    unpack8<T>(extra[u], g);
#pragma unroll
                    for (int e = 0; e < 8; ++e) v[e] += g[e];
                }
            }
            *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * N2 + col) = pack8<T>(v);
        }
    }
    cp_async_wait<0>();  // (only empty groups are left)
#endif
}

template <typename T, typename TA, int R, int BM, bool BWD>
cudaError_t launch_rows(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    using Cfg = RowsConfig<T, TA, R, BM, BWD>;
    const cudaError_t err = allow_dynamic_smem<lora_rows_kernel<T, TA, R, BM, BWD>, Cfg::SMEM>();
    if (err != cudaSuccess) return err;
    const int m_blocks = (args.m + BM - 1) / BM;
    const int n_tiles = args.out != nullptr ? (args.n2 + Cfg::BN - 1) / Cfg::BN : 1;
    // Row blocks for at most half the multiprocessors (decode, short prompts): phase 2's columns split over blocks
    // (each recomputes phase 1, its rows then coming from L2) up to about two blocks per multiprocessor. Above
    // that, no split: with phase 1 pipelined (several tiles in flight) a recomputed phase 1 is bandwidth, not idle
    // multiprocessors. H100, bf16 x, fp32 adapters, p 0.1, µs fwd/bwd, bm16 unsplit vs split in 2 (scripts/
    // probe_lora_kernels.py shapes, 2026-12-06 18:34 UTC):
    //   M2048 K4096 N4096   47/46 vs 54/60      M2048 K4096 N11008  74/74 vs 74/114     M2048 K11008 N4096  85/81 vs 116/88
    //   M2048 K2048 N8192   52/52 vs 50/83      M16 K=N=4096: unsplit 47/40, split over 16 blocks 31/21
    // Phase 2 alone (two_pass): columns split for about four blocks a multiprocessor; nothing is recomputed.
    int y = 1;
    if (args.column_splits > 0) y = min(n_tiles, args.column_splits);
    else if (args.small_ready) y = max(1, min(n_tiles, (4 * sm_count + m_blocks - 1) / m_blocks));
    else if (2 * m_blocks <= sm_count) y = max(1, min(n_tiles, (2 * sm_count + m_blocks - 1) / m_blocks));
    // Clusters along y that split phase 1's K (Hopper; 16-row blocks whose columns are split, as in decode): y rounded
    // up to whole clusters (a block past the last column tile still walks its share of K)
    const int k_tiles = (args.k1 + Cfg::BK - 1) / Cfg::BK;
    const int cluster = BM == 16 && y > 1 && !args.small_ready && lora_device_major() >= 9
                            ? std::min({args.cluster_k, kLoraRowsMaxCluster, k_tiles})
                            : 1;
    LoraRowsArgs a = args;
    a.cluster_k = std::max(1, cluster);
    if (a.cluster_k == 1) {
        lora_rows_kernel<T, TA, R, BM, BWD><<<dim3(m_blocks, y), kThreads, Cfg::SMEM, stream>>>(a);
        return cudaGetLastError();
    }
    return launch_in_clusters(lora_rows_kernel<T, TA, R, BM, BWD>,
                              dim3(m_blocks, (y + a.cluster_k - 1) / a.cluster_k * a.cluster_k),
                              dim3(1, a.cluster_k), Cfg::SMEM, stream, a);
}

// rank padded to a multiple of 16 (R ∈ {16, 32, 64, 128}); rows per block (unless args.block_rows forces 16, 32 or
// 64): the largest that still gives nearly every multiprocessor (90%) a block, 64 only above rank 32.
// H100, bf16, fp32 adapters, p 0.1, µs forward / backward rows kernel, unsplit (scripts/probe_lora_kernels.py shapes,
// 2026-12-06 18:34 UTC, the pipelined kernels):
//   M8192 K=N=4096 r16     bm16 127/141   bm32 104/109   bm64 118/109
//   M8192 K=N=4096 r64     bm16 275/294   bm32 191/196   bm64 193/171
//   M8192 K4096 N14336 r16 bm16 257/288   bm32 215/212   bm64 249/200
//   M4096 K=N=2048 r16     bm16 38/44     bm32 39/35     bm64 59/52       (128 blocks of 32 rows)
//   M2048 K=N=2048 r16     bm16 27/26     bm32 38/31     bm64 59/52       (64 blocks of 32 rows)
template <typename T, typename TA, bool BWD>
cudaError_t launch_rows_for(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    auto fills = [&](int rows) { return 10 * ((args.m + rows - 1) / rows) >= 9 * sm_count; };
    const int bm = args.block_rows > 0 ? args.block_rows : args.r > 32 && fills(64) ? 64 : fills(32) ? 32 : 16;
    if (bm != 16 && bm != 32 && bm != 64) return cudaErrorInvalidValue;
    const int r = args.r;
#define PEFT_FAST_ROWS(RR)                                                                                   \
    return bm == 64 ? launch_rows<T, TA, RR, 64, BWD>(args, sm_count, stream)                              \
         : bm == 32 ? launch_rows<T, TA, RR, 32, BWD>(args, sm_count, stream)                              \
                    : launch_rows<T, TA, RR, 16, BWD>(args, sm_count, stream)
    if (r <= 16) PEFT_FAST_ROWS(16);
    if (r <= 32) PEFT_FAST_ROWS(32);
    if (r <= 64) PEFT_FAST_ROWS(64);
    PEFT_FAST_ROWS(128);
#undef PEFT_FAST_ROWS
}

template <bool BWD>
cudaError_t launch_rows_dir(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    const bool same = args.adapter_dtype == args.dtype;
    if (args.dtype == LoraDtype::kBFloat16)
        return same ? launch_rows_for<__nv_bfloat16, __nv_bfloat16, BWD>(args, sm_count, stream)
                    : launch_rows_for<__nv_bfloat16, float, BWD>(args, sm_count, stream);
    return same ? launch_rows_for<__half, __half, BWD>(args, sm_count, stream)
                : launch_rows_for<__half, float, BWD>(args, sm_count, stream);
}

// ---------------------------------------------------------------------------------------------------------------
// The reduce kernel: out[c][j] = Σ_m big[m][c] · small[m][j] over a split of the rows, for a BC-column tile of
// big (BC 64, or 128: each row's read twice as long, half the rows a step); job = blockIdx.x (the dA tiles over K
// first: big = drop(x), small = gs, out = dAᵀ; then the dB tiles over N: big = dy, small = hs, out = dB), split =
// blockIdx.y. With several splits each block writes its partial tile to the workspace, and the last block to finish
// a tile (a counter per tile) sums the partials in split order.

template <typename T, int R, int BC_, bool COMPACT = false>
struct ReduceConfig {
    static constexpr int BC = BC_, BMR = R <= 32 && BC == 64 ? 128 : 64;  // rows a step
    // COMPACT (rank 16 at 64 columns only; lora_kernels_set_reduce_compact): the rank tile unpadded and at most three
    // stages, 70.6 KB a block instead of 76.8, so that three blocks fit a Hopper multiprocessor (228 KB) where two
    // do. Nsight Compute found the kernel at 24 % occupancy, shared memory its limit, DRAM at 66 % (H100, M8192
    // K=N=4096, 2026-12-07). The unpadded rows cost the rank operand's fragment loads a 2-way bank conflict.
    static_assert(!COMPACT || (R == 16 && BC == 64), "the compact layout is rank 16 at 64 columns");
    static constexpr int LDG = BC + 8, LDS = COMPACT ? R : R + 8, LDR = R + 4;
    static constexpr int FR = (BC / 16) * (R / 16);
    static constexpr int KS = FR >= kWarps ? 1 : kWarps / FR;
    static constexpr int FPW = FR >= kWarps ? FR / kWarps : 1;
    // a stage: the big tile, the small tile and (dA with dropout) the tile's keep bytes
    static constexpr int G_ELEMS = BMR * LDG, S_ELEMS = BMR * LDS, KEEP_BYTES = BMR * BC / 8;
    static constexpr int STAGE_BYTES = (G_ELEMS + S_ELEMS) * int(sizeof(T)) + KEEP_BYTES;
    static constexpr int STAGES = stages_for(STAGE_BYTES, 0, COMPACT ? 3 : 4);
    static constexpr int LOOP_BYTES = STAGES * STAGE_BYTES;
    static constexpr int RED_BYTES = KS * BC * LDR * 4;
    static constexpr int SMEM = cmax<LOOP_BYTES, RED_BYTES>();
    static_assert(BMR % (16 * KS) == 0, "each k-split warp needs whole 16-row steps");
    static_assert(STAGE_BYTES % 32 == 0 && G_ELEMS * sizeof(T) % 32 == 0 && SMEM <= kSmemBudget,
                  "WMMA tiles start 32-byte aligned; within consumer GPUs' shared memory");
};

template <typename T, typename TO, int R, int BC_, bool COMPACT = false>
__global__ void __launch_bounds__(kThreads) lora_reduce_kernel(LoraReduceArgs args, LoraReducePlan plan) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // never launched there: lora_kernels_support refuses GPUs below sm_80 (bf16 WMMA)
#else
    using Cfg = ReduceConfig<T, R, BC_, COMPACT>;
    constexpr int BC = Cfg::BC, BMR = Cfg::BMR, S = Cfg::STAGES;
    extern __shared__ __align__(128) unsigned char smem[];
    auto big_stage = [&](int st) { return reinterpret_cast<T*>(smem + st * Cfg::STAGE_BYTES); };
    auto small_stage = [&](int st) { return big_stage(st) + Cfg::G_ELEMS; };
    auto keep_stage = [&](int st) {
        return smem + st * Cfg::STAGE_BYTES + (Cfg::G_ELEMS + Cfg::S_ELEMS) * int(sizeof(T));
    };
    float* red = reinterpret_cast<float*>(smem);  // after the loop

    const int job = blockIdx.x, split = blockIdx.y;
    const bool is_a = job < plan.tiles_a;
    const int tile = is_a ? job : job - plan.tiles_a;
    const int c0 = tile * BC;
    const int C = is_a ? args.k : args.n;
    const T* big = static_cast<const T*>(is_a ? args.x : args.dy);
    const T* small = static_cast<const T*>(is_a ? args.gs : args.hs);
    const uint8_t* mask = is_a && args.p > 0.f ? args.mask : nullptr;
    const float inv_keep = args.p > 0.f ? 1.f / (1.f - args.p) : 1.f;
    const int r = args.r;
    const int row_begin = split * plan.rows_per_split;
    const int row_end = min(args.m, row_begin + plan.rows_per_split);

    using BigStage = RowStage<T, BMR, BC, Cfg::LDG>;
    using SmallStage = RankStage<T, BMR, R, Cfg::LDS>;
    // the keep bytes of a step: BMR rows of BC/8 bytes, copied 4 at a time where every row's run is 4-byte aligned
    // (C % 32 == 0), else byte by byte
    const bool keep_async = C % 32 == 0;
    const int steps = (row_end - row_begin + BMR - 1) / BMR;
    auto issue = [&](int t) {  // step t's copies into stage t % S; one commit group per call
        if (t < steps) {
            const int st = t % S, row0 = row_begin + t * BMR;
            BigStage::issue(big_stage(st), big, row_end, C, row0, c0);  // rows past this split's end read as zeros
            SmallStage::issue(small_stage(st), small, row_end, r, row0);
            if (mask != nullptr) {
                uint8_t* keep = keep_stage(st);
                for (int e = threadIdx.x; e < Cfg::KEEP_BYTES / 4; e += kThreads) {
                    const int row = row0 + e / (BC / 32), b4 = 4 * (e % (BC / 32));
                    const uint8_t* src = mask + static_cast<int64_t>(row) * (C / 8) + c0 / 8 + b4;
                    const bool inside = row < row_end && c0 + 8 * b4 < C;
                    if (keep_async && inside) {
                        cp_async4(keep + 4 * e, src);
                    } else {
#pragma unroll
                        for (int b = 0; b < 4; ++b) keep[4 * e + b] = inside && c0 + 8 * (b4 + b) < C ? src[b] : 0;
                    }
                }
            }
        }
        cp_async_commit();
    };

    const int warp = threadIdx.x / 32, group = warp / Cfg::KS, ks = warp % Cfg::KS;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Cfg::FPW];
#pragma unroll
    for (int i = 0; i < Cfg::FPW; ++i) wmma::fill_fragment(acc[i], 0.f);
#pragma unroll
    for (int t = 0; t < S - 1; ++t) issue(t);
    for (int t = 0; t < steps; ++t) {
        cp_async_wait<S - 2>();  // this thread's copies of step t have landed
        const int st = t % S;
        T* g_s = big_stage(st);
        const T* s_s = small_stage(st);
        if (mask != nullptr) {  // the keep bytes are other threads' copies: a barrier first
            __syncthreads();
            BigStage::zero_dropped(g_s, keep_stage(st));
        }
        __syncthreads();  // step t visible to all; every warp is done with step t − 1, whose stage the next copies take
        issue(t + S - 1);
#pragma unroll
        for (int s = ks; s < BMR / 16; s += Cfg::KS) {
#pragma unroll
            for (int i = 0; i < Cfg::FPW; ++i) {
                const int f = group * Cfg::FPW + i, cb = f / (R / 16), jb = f % (R / 16);
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // bigᵀ: (c, m)
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;  // small: (m, j)
                wmma::load_matrix_sync(a, g_s + s * 16 * Cfg::LDG + cb * 16, Cfg::LDG);
                wmma::load_matrix_sync(b, s_s + s * 16 * Cfg::LDS + jb * 16, Cfg::LDS);
                wmma::mma_sync(acc[i], a, b, acc[i]);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the stages: the sums below reuse their bytes
#pragma unroll
    for (int i = 0; i < Cfg::FPW; ++i) {
        const int f = group * Cfg::FPW + i, cb = f / (R / 16), jb = f % (R / 16);
        wmma::store_matrix_sync(red + (ks * BC + cb * 16) * Cfg::LDR + jb * 16, acc[i], Cfg::LDR, wmma::mem_row_major);
    }
    __syncthreads();

    TO* out = static_cast<TO*>(is_a ? args.grad_a : args.grad_b);
    // out element e of the tile (coalesced along the output's rows): dA is r×K (j, c), dB is N×r (c, j)
    auto out_index = [&](int e, int& c, int& j) {
        if (is_a) c = e % BC, j = e / BC;
        else c = e / R, j = e % R;
    };
    auto write = [&](int c, int j, float v) {
        if (j >= r || c0 + c >= C) return;
        const int64_t at = is_a ? static_cast<int64_t>(j) * C + c0 + c : static_cast<int64_t>(c0 + c) * r + j;
        out[at] = from_float<TO>(mask != nullptr ? v * inv_keep : v);  // (dA under dropout: the kept x's 1/(1−p))
    };
    if (plan.splits == 1) {
        for (int e = threadIdx.x; e < BC * R; e += kThreads) {
            int c, j;
            out_index(e, c, j);
            float v = 0.f;
#pragma unroll
            for (int q = 0; q < Cfg::KS; ++q) v += red[(q * BC + c) * Cfg::LDR + j];
            write(c, j, v);
        }
        return;
    }
    float* part = args.workspace + (static_cast<int64_t>(job) * plan.splits + split) * BC * R;
    for (int e = threadIdx.x; e < BC * R; e += kThreads) {
        const int c = e / R, j = e % R;
        float v = 0.f;
#pragma unroll
        for (int q = 0; q < Cfg::KS; ++q) v += red[(q * BC + c) * Cfg::LDR + j];
        part[e] = v;
    }
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) last = atomicAdd(args.counters + job, 1) == plan.splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* parts = args.workspace + static_cast<int64_t>(job) * plan.splits * BC * R;
    for (int e = threadIdx.x; e < BC * R; e += kThreads) {
        int c, j;
        out_index(e, c, j);
        float v = 0.f;
        for (int q = 0; q < plan.splits; ++q) v += __ldcg(parts + static_cast<int64_t>(q) * BC * R + c * R + j);
        write(c, j, v);
    }
#endif
}

template <typename T, typename TO, int R, int BC, bool COMPACT = false>
cudaError_t launch_reduce(const LoraReduceArgs& args, const LoraReducePlan& plan, cudaStream_t stream) {
    using Cfg = ReduceConfig<T, R, BC, COMPACT>;
    constexpr auto kernel = lora_reduce_kernel<T, TO, R, BC, COMPACT>;
    if (const cudaError_t err = allow_dynamic_smem<kernel, Cfg::SMEM>(); err != cudaSuccess) return err;
    if (plan.splits > 1 && !args.counters_zeroed) {
        const cudaError_t err = cudaMemsetAsync(args.counters, 0, sizeof(int) * plan.counters, stream);
        if (err != cudaSuccess) return err;
    }
    kernel<<<dim3(plan.tiles_a + plan.tiles_b, plan.splits), kThreads, Cfg::SMEM, stream>>>(args, plan);
    return cudaGetLastError();
}

template <typename T, typename TO, int BC>
cudaError_t launch_reduce_cols(const LoraReduceArgs& args, const LoraReducePlan& plan, cudaStream_t stream) {
    if constexpr (BC == 64) {
        if (plan.compact) return launch_reduce<T, TO, 16, 64, true>(args, plan, stream);  // (only made for r ≤ 16)
    }
    if (args.r <= 16) return launch_reduce<T, TO, 16, BC>(args, plan, stream);
    if (args.r <= 32) return launch_reduce<T, TO, 32, BC>(args, plan, stream);
    if (args.r <= 64) return launch_reduce<T, TO, 64, BC>(args, plan, stream);
    return launch_reduce<T, TO, 128, BC>(args, plan, stream);
}

template <typename T, typename TO>
cudaError_t launch_reduce_for(const LoraReduceArgs& args, const LoraReducePlan& plan, cudaStream_t stream) {
    if (plan.cols == 128) return launch_reduce_cols<T, TO, 128>(args, plan, stream);
    if (plan.cols == 64) return launch_reduce_cols<T, TO, 64>(args, plan, stream);
    return cudaErrorInvalidValue;  // (a plan not made by lora_reduce_plan)
}

}  // namespace lora_kernels
