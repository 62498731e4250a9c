// Kernel templates of lora_kernels.h, shared by lora_rows_fwd.cu, lora_rows_bwd.cu and lora_reduce.cu (one
// translation unit each, so that ninja builds them in parallel).
//
// Tensor-core work goes through WMMA (16×16×16 bf16/fp16 tiles, fp32 accumulation). Every tile is staged through
// registers into double-buffered shared memory: the next tile's global loads are in flight while the current tile
// is multiplied, one __syncthreads per tile. Adapter weights are read in their own dtype (fp32 under PEFT's
// default autocast_adapter_dtype) and rounded to the compute dtype on the way into shared memory, as autocast
// rounds them for cuBLAS; the rank is zero-padded to R (a multiple of 16) there.
#pragma once

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
// 8 consecutive elements: loading in any dtype, converting to the compute dtype T as one 16-byte vector

template <typename TA>
struct Raw8 {  // 16-bit: one 16-byte vector
    uint4 v;
};
template <>
struct Raw8<float> {
    float4 lo, hi;
};

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

template <typename TA>
__device__ __forceinline__ void zero(Raw8<TA>& r) {
    if constexpr (std::is_same_v<TA, float>) {
        r.lo = r.hi = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
        r.v = make_uint4(0u, 0u, 0u, 0u);
    }
}

// 8 elements at p (16-byte aligned)
template <typename TA>
__device__ __forceinline__ Raw8<TA> load8(const TA* p) {
    Raw8<TA> r;
    if constexpr (std::is_same_v<TA, float>) {
        r.lo = __ldg(reinterpret_cast<const float4*>(p));
        r.hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
    } else {
        r.v = __ldg(reinterpret_cast<const uint4*>(p));
    }
    return r;
}

// elements j0 … j0+7 of a row of length r (any alignment; zeros past r)
template <typename TA>
__device__ __forceinline__ Raw8<TA> load8_partial(const TA* row, int j0, int r) {
    TA e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = j0 + i < r ? row[j0 + i] : from_float<TA>(0.f);
    Raw8<TA> out;
    if constexpr (std::is_same_v<TA, float>) {
        out.lo = make_float4(e[0], e[1], e[2], e[3]);
        out.hi = make_float4(e[4], e[5], e[6], e[7]);
    } else {
        out.v = *reinterpret_cast<const uint4*>(e);
    }
    return out;
}

template <typename TA>
__device__ __forceinline__ void to_floats(const Raw8<TA>& r, float f[8]) {
    if constexpr (std::is_same_v<TA, float>) {
        f[0] = r.lo.x, f[1] = r.lo.y, f[2] = r.lo.z, f[3] = r.lo.w;
        f[4] = r.hi.x, f[5] = r.hi.y, f[6] = r.hi.z, f[7] = r.hi.w;
    } else {
        unpack8<TA>(r.v, f);
    }
}

// the 8 elements as T, one 16-byte vector (a plain copy when TA is T)
template <typename T, typename TA>
__device__ __forceinline__ uint4 as_vec(const Raw8<TA>& r) {
    if constexpr (std::is_same_v<T, TA>) {
        return r.v;
    } else {
        float f[8];
        to_floats(r, f);
        return pack8<T>(f);
    }
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
// Tile loaders: global → registers (load), registers → shared memory as T (store). Row-major sources only.

// rows [row0, row0+ROWS) × columns [col0, col0+COLS) of a rows×cols matrix (cols % 8 == 0), into s[ROWS][LD]
template <typename T, typename TA, int ROWS, int COLS, int LD>
struct RowTile {
    static constexpr int kChunks = ROWS * COLS / 8;
    static constexpr int kPerThread = (kChunks + kThreads - 1) / kThreads;
    Raw8<TA> r[kPerThread];

    __device__ __forceinline__ void load(const TA* src, int rows, int cols, int row0, int col0) {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            const int row = row0 + q / (COLS / 8), col = col0 + 8 * (q % (COLS / 8));
            if (q < kChunks && row < rows && col < cols)
                r[i] = load8(src + static_cast<int64_t>(row) * cols + col);
            else
                zero(r[i]);
        }
    }

    __device__ __forceinline__ void store(T* s) const {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            if (q < kChunks)
                *reinterpret_cast<uint4*>(s + (q / (COLS / 8)) * LD + 8 * (q % (COLS / 8))) = as_vec<T>(r[i]);
        }
    }

    // store with the dropout mask applied: keep bits drawn here for rows [row0…) / columns [col0…) of x, written to
    // mask (when not null) as one byte per 8 elements
    __device__ __forceinline__ void store_dropped(T* s, int rows, int cols, int row0, int col0, uint64_t seed,
                                                  uint64_t offset, uint32_t threshold, float inv_keep,
                                                  uint8_t* mask) const {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            if (q >= kChunks) continue;
            const int row = row0 + q / (COLS / 8), col = col0 + 8 * (q % (COLS / 8));
            float f[8];
            to_floats(r[i], f);
            if (row < rows && col < cols) {
                const uint32_t bits = keep_bits(seed, offset, row, col / 8, threshold);
                if (mask != nullptr) mask[static_cast<int64_t>(row) * (cols / 8) + col / 8] = static_cast<uint8_t>(bits);
#pragma unroll
                for (int e = 0; e < 8; ++e) f[e] = (bits >> e) & 1u ? f[e] * inv_keep : 0.f;
            }
            *reinterpret_cast<uint4*>(s + (q / (COLS / 8)) * LD + 8 * (q % (COLS / 8))) = pack8<T>(f);
        }
    }

    // store with a saved mask applied (the reduce kernel's drop(x))
    __device__ __forceinline__ void store_masked(T* s, int rows, int cols, int row0, int col0, const uint8_t* mask,
                                                 float inv_keep) const {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            if (q >= kChunks) continue;
            const int row = row0 + q / (COLS / 8), col = col0 + 8 * (q % (COLS / 8));
            float f[8];
            to_floats(r[i], f);
            if (row < rows && col < cols) {
                const uint32_t bits = mask[static_cast<int64_t>(row) * (cols / 8) + col / 8];
#pragma unroll
                for (int e = 0; e < 8; ++e) f[e] = (bits >> e) & 1u ? f[e] * inv_keep : 0.f;
            }
            *reinterpret_cast<uint4*>(s + (q / (COLS / 8)) * LD + 8 * (q % (COLS / 8))) = pack8<T>(f);
        }
    }
};

// rows [row0, row0+ROWS) of a rows×r matrix (r ≤ R), all R columns (zeros past r), into s[ROWS][LD]; rows are r
// elements long, so vector loads only when r % 8 == 0 (then every chunk lies in one row and is 16-byte aligned)
template <typename T, typename TA, int ROWS, int R, int LD>
struct RankTile {
    static constexpr int kChunks = ROWS * R / 8;
    static constexpr int kPerThread = (kChunks + kThreads - 1) / kThreads;
    Raw8<TA> v[kPerThread];

    __device__ __forceinline__ void load(const TA* src, int rows, int r, int row0) {
        const bool vec = (r & 7) == 0;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            const int row = row0 + q / (R / 8), j0 = 8 * (q % (R / 8));
            if (q < kChunks && row < rows && j0 < r) {
                const TA* p = src + static_cast<int64_t>(row) * r;
                v[i] = vec ? load8(p + j0) : load8_partial(p, j0, r);
            } else {
                zero(v[i]);
            }
        }
    }

    __device__ __forceinline__ void store(T* s) const {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int q = threadIdx.x + i * kThreads;
            if (q < kChunks) *reinterpret_cast<uint4*>(s + (q / (R / 8)) * LD + 8 * (q % (R / 8))) = as_vec<T>(v[i]);
        }
    }
};

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

// ---------------------------------------------------------------------------------------------------------------
// The rows kernel. A block owns BM rows of `in`: phase 1 reduces them over K1 against w1 (small = s · in · w1ᵀ or
// s · in · w1, M×R in registers, then shared memory), phase 2 expands small against w2 into out, BN columns at a
// time. gridDim.y > 1 splits phase 2's columns over blocks (each recomputes phase 1: for few rows, as in decode).

template <typename T, typename TA, int R, int BM, bool BWD>
struct RowsConfig {
    static constexpr int BK = R <= 32 ? 256 : (R == 64 ? 128 : 64);   // phase-1 columns per tile
    static constexpr int BN = R <= 32 ? 256 : (R == 64 ? 128 : 64);   // phase-2 columns per tile
    static constexpr int LDX = BK + 8;
    // w1 tile: forward A[j][k] (rank-major: R rows of BK), backward B[n][j] (BK rows of R)
    static constexpr int W1_ROWS = BWD ? BK : R, LD1 = BWD ? R + 8 : BK + 8;
    // w2 tile: forward B[n][j] (BN rows of R), backward A[j][k] (R rows of BN)
    static constexpr int W2_ROWS = BWD ? R : BN, LD2 = BWD ? BN + 8 : R + 8;
    static constexpr int LDH = R + 8;
    static constexpr int LDR = R + 4;
    static constexpr int LDP = 16 + 4;                              // a warp's 16×16 output patch (floats)
    static constexpr int FR1 = (BM / 16) * (R / 16);                // phase-1 output fragments
    static constexpr int KS1 = FR1 >= kWarps ? 1 : kWarps / FR1;    // warps splitting each tile's k-steps
    static constexpr int FPW1 = FR1 >= kWarps ? FR1 / kWarps : 1;
    static constexpr int FR2 = (BM / 16) * (BN / 16);
    static constexpr int FPW2 = FR2 >= kWarps ? FR2 / kWarps : 1;   // (FR2 < kWarps: warps ≥ FR2 idle in MMA)
    static constexpr int X_ELEMS = BM * LDX, W1_ELEMS = W1_ROWS * LD1, W2_ELEMS = W2_ROWS * LD2;
    static constexpr int P1_BYTES = 2 * (X_ELEMS + W1_ELEMS) * int(sizeof(T));
    static constexpr int F_FLOATS = cmax<KS1 * BM * LDR, kWarps * 16 * LDP>();
    static constexpr int P2_BYTES = (BM * LDH + 2 * W2_ELEMS) * int(sizeof(T)) + F_FLOATS * 4;
    static constexpr int SMEM = cmax<P1_BYTES, P2_BYTES>();
    static_assert(BK % (16 * KS1) == 0, "each k-split warp needs whole 16-wide steps");
};

template <typename T, typename TA, int R, int BM, bool BWD>
__global__ void __launch_bounds__(kThreads) lora_rows_kernel(LoraRowsArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // never launched there: lora_kernels_support refuses GPUs below sm_80 (bf16 WMMA)
#else
    using Cfg = RowsConfig<T, TA, R, BM, BWD>;
    constexpr int BK = Cfg::BK, BN = Cfg::BN;
    extern __shared__ __align__(128) unsigned char smem[];
    // phase 1: Xs[2], W1s[2]; phase 2 (reusing the same bytes): Hs, W2s[2], floats (k-split sums, then Cs[2])
    T* xs = reinterpret_cast<T*>(smem);
    T* w1s = xs + 2 * Cfg::X_ELEMS;
    T* hs = reinterpret_cast<T*>(smem);
    T* w2s = hs + BM * Cfg::LDH;
    float* fs = reinterpret_cast<float*>(w2s + 2 * Cfg::W2_ELEMS);

    const int warp = threadIdx.x / 32;
    const int m0 = blockIdx.x * BM;
    const int M = args.m, K1 = args.k1, N2 = args.n2, r = args.r;
    const T* in = static_cast<const T*>(args.in);
    const TA* w1 = static_cast<const TA*>(args.w1);
    const TA* w2 = static_cast<const TA*>(args.w2);
    const bool first_y = blockIdx.y == 0;
    if (blockIdx.x == 0 && first_y)
        for (int i = threadIdx.x; i < args.zero_count; i += kThreads) args.zero[i] = 0;

    const bool dropout = !BWD && args.p > 0.f;
    uint64_t seed = 0, offset = 0;
    if (dropout) {
        const LoraPhilox& ph = args.philox;
        seed = ph.captured ? static_cast<uint64_t>(*ph.seed_ptr) : ph.seed;
        offset = ph.captured ? static_cast<uint64_t>(*ph.offset_ptr) + ph.offset_intragraph : ph.offset;
    }
    const uint32_t threshold = keep_threshold(args.p);
    const float inv_keep = args.p > 0.f ? 1.f / (1.f - args.p) : 1.f;
    uint8_t* mask_out = dropout && first_y ? args.mask : nullptr;

    // ---- phase 1: small = scale · in[m0:m0+BM] · w1 over K1
    using XTile = RowTile<T, T, BM, BK, Cfg::LDX>;
    using W1Tile = std::conditional_t<BWD, RankTile<T, TA, BK, R, Cfg::LD1>, RowTile<T, TA, R, BK, Cfg::LD1>>;
    using B1Layout = std::conditional_t<BWD, wmma::row_major, wmma::col_major>;
    XTile xt;
    W1Tile wt;
    auto load1 = [&](int k0) {
        xt.load(in, M, K1, m0, k0);
        if constexpr (BWD) wt.load(w1, K1, r, k0);  // B rows k0…: K1×r
        else wt.load(w1, r, K1, 0, k0);             // A columns k0…: r×K1
    };
    auto store1 = [&](int buf, int k0) {
        T* x_dst = xs + buf * Cfg::X_ELEMS;
        if (dropout) xt.store_dropped(x_dst, M, K1, m0, k0, seed, offset, threshold, inv_keep, mask_out);
        else xt.store(x_dst);
        wt.store(w1s + buf * Cfg::W1_ELEMS);
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc1[Cfg::FPW1];
#pragma unroll
    for (int i = 0; i < Cfg::FPW1; ++i) wmma::fill_fragment(acc1[i], 0.f);
    const int group = warp / Cfg::KS1, ks = warp % Cfg::KS1;

    const int tiles1 = (K1 + BK - 1) / BK;
    load1(0);
    store1(0, 0);
    __syncthreads();
    for (int t = 0; t < tiles1; ++t) {
        const int buf = t & 1;
        if (t + 1 < tiles1) load1((t + 1) * BK);
        const T* x_s = xs + buf * Cfg::X_ELEMS;
        const T* w_s = w1s + buf * Cfg::W1_ELEMS;
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
        if (t + 1 < tiles1) store1(buf ^ 1, (t + 1) * BK);
        __syncthreads();
    }

    // k-split partial sums → shared floats → scale, round to T → Hs (and the global M×r copy)
#pragma unroll
    for (int i = 0; i < Cfg::FPW1; ++i) {
        const int f = group * Cfg::FPW1 + i, mb = f / (R / 16), jb = f % (R / 16);
        wmma::store_matrix_sync(fs + (ks * BM + mb * 16) * Cfg::LDR + jb * 16, acc1[i], Cfg::LDR, wmma::mem_row_major);
    }
    __syncthreads();
    T* small = static_cast<T*>(args.small);
    for (int e = threadIdx.x; e < BM * R; e += kThreads) {
        const int m = e / R, j = e % R;
        float v = 0.f;
#pragma unroll
        for (int q = 0; q < Cfg::KS1; ++q) v += fs[(q * BM + m) * Cfg::LDR + j];
        const T h = from_float<T>(v * args.scale);
        hs[m * Cfg::LDH + j] = h;
        if (small != nullptr && first_y && j < r && m0 + m < M) small[static_cast<int64_t>(m0 + m) * r + j] = h;
    }
    if (args.out == nullptr) return;

    // ---- phase 2: out[m0:m0+BM, cols] = Hs · w2 (+ bias + addend | masked), BN columns a tile. Each warp finishes
    // its own 16×16 fragments (through a private shared patch, in registers' stead: WMMA's layout is opaque), so
    // the only block barrier per tile is the w2 double buffer's.
    const int tiles2 = (N2 + BN - 1) / BN;
    const int per_y = (tiles2 + gridDim.y - 1) / gridDim.y;
    const int t_begin = blockIdx.y * per_y, t_end = min(tiles2, t_begin + per_y);
    if (t_begin >= t_end) return;
    using W2Tile = std::conditional_t<BWD, RowTile<T, TA, R, BN, Cfg::LD2>, RankTile<T, TA, BN, R, Cfg::LD2>>;
    using B2Layout = std::conditional_t<BWD, wmma::row_major, wmma::col_major>;
    W2Tile w2t;
    auto load2 = [&](int t) {
        if constexpr (BWD) w2t.load(w2, r, N2, 0, t * BN);  // A columns: r×N2
        else w2t.load(w2, N2, r, t * BN);                   // B rows: N2×r
    };
    __syncthreads();  // Hs complete; the k-split floats consumed (the patches reuse them)
    load2(t_begin);
    w2t.store(w2s);
    __syncthreads();
    T* out = static_cast<T*>(args.out);
    const T* bias = static_cast<const T*>(args.bias);
    const T* addend = static_cast<const T*>(args.addend);
    const uint8_t* mask_in = BWD && args.p > 0.f ? args.mask : nullptr;
    float* patch = fs + warp * 16 * Cfg::LDP;
    const int lane = threadIdx.x % 32, prow = lane / 2, pcol = 8 * (lane % 2);  // each lane: 8 outputs of a row
    for (int t = t_begin; t < t_end; ++t) {
        const int buf = (t - t_begin) & 1;
        if (t + 1 < t_end) load2(t + 1);
        const T* w_s = w2s + buf * Cfg::W2_ELEMS;
        if (Cfg::FR2 >= kWarps || warp < Cfg::FR2) {
#pragma unroll 1
            for (int i = 0; i < Cfg::FPW2; ++i) {
                const int f = warp * Cfg::FPW2 + i, mb = f / (BN / 16), nb = f % (BN / 16);
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.f);
#pragma unroll
                for (int js = 0; js < R / 16; ++js) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, B2Layout> b;
                    wmma::load_matrix_sync(a, hs + mb * 16 * Cfg::LDH + js * 16, Cfg::LDH);
                    if constexpr (BWD) wmma::load_matrix_sync(b, w_s + js * 16 * Cfg::LD2 + nb * 16, Cfg::LD2);
                    else wmma::load_matrix_sync(b, w_s + nb * 16 * Cfg::LD2 + js * 16, Cfg::LD2);
                    wmma::mma_sync(acc, a, b, acc);
                }
                wmma::store_matrix_sync(patch, acc, Cfg::LDP, wmma::mem_row_major);
                __syncwarp();
                const int row = m0 + mb * 16 + prow, col = t * BN + nb * 16 + pcol;
                if (row < M && col < N2) {
                    float v[8];
                    const float4 lo = *reinterpret_cast<const float4*>(patch + prow * Cfg::LDP + pcol);
                    const float4 hi = *reinterpret_cast<const float4*>(patch + prow * Cfg::LDP + pcol + 4);
                    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z;
                    v[7] = hi.w;
                    const int64_t at = static_cast<int64_t>(row) * N2 + col;
                    if constexpr (BWD) {
                        if (mask_in != nullptr) {
                            const uint32_t bits = mask_in[static_cast<int64_t>(row) * (N2 / 8) + col / 8];
#pragma unroll
                            for (int e = 0; e < 8; ++e) v[e] = (bits >> e) & 1u ? v[e] * inv_keep : 0.f;
                        }
                    } else {
                        float g[8];
                        if (bias != nullptr) {
                            unpack8<T>(__ldg(reinterpret_cast<const uint4*>(bias + col)), g);
#pragma unroll
                            for (int e = 0; e < 8; ++e) v[e] += g[e];
                        }
                        if (addend != nullptr) {
                            unpack8<T>(__ldg(reinterpret_cast<const uint4*>(addend + at)), g);
#pragma unroll
                            for (int e = 0; e < 8; ++e) v[e] += g[e];
                        }
                    }
                    *reinterpret_cast<uint4*>(out + at) = pack8<T>(v);
                }
                __syncwarp();  // the patch is read before the next fragment overwrites it
            }
        }
        if (t + 1 < t_end) w2t.store(w2s + (buf ^ 1) * Cfg::W2_ELEMS);
        __syncthreads();
    }
#endif
}

template <typename T, typename TA, int R, int BM, bool BWD>
cudaError_t launch_rows(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    using Cfg = RowsConfig<T, TA, R, BM, BWD>;
    const cudaError_t err = allow_dynamic_smem<lora_rows_kernel<T, TA, R, BM, BWD>, Cfg::SMEM>();
    if (err != cudaSuccess) return err;
    const int m_blocks = (args.m + BM - 1) / BM;
    const int n_tiles = args.out != nullptr ? (args.n2 + Cfg::BN - 1) / Cfg::BN : 1;
    // row blocks for at most half the multiprocessors (decode, short prompts): split phase 2's columns over blocks
    // (each recomputes phase 1, its rows then coming from L2) up to about two blocks per multiprocessor. Not above:
    // there the recomputed phase 1 costs more than the idle multiprocessors (H100, M8192 K=N=4096 r16 p0.1, 128
    // blocks of 64 rows: forward 239 µs split in 3, 114 µs unsplit; scripts/probe_lora_kernels.py shapes)
    // Up to one wave of row blocks (the 1B and 7B training steps' 2048 rows at 16 a block: 128 blocks on 132
    // multiprocessors) the columns go to two blocks as well: always backward, and forward where phase 2 is at
    // least twice phase 1's width. H100, bf16 x, fp32 adapters, p 0.1, µs unsplit → split in 2 (scripts/
    // probe_lora_kernels.py shapes, 2026-12-06 15:48 UTC):
    //   M2048 K4096 N4096    fwd 48 → 49   bwd 49 → 42      M2048 K2048 N2048    fwd 27 → 28   bwd 28 → 24
    //   M2048 K4096 N11008   fwd 76 → 71   bwd 86 → 73      M2048 K2048 N5632    fwd 41 → 39   bwd 47 → 40
    //   M2048 K11008 N4096   fwd 90 → 98   bwd 95 → 71      M2048 K5632 N2048    fwd 49 → 53   bwd 49 → 39
    //   (M4096 K=N=2048, 256 blocks: fwd 35 → 45, bwd 34 → 38: not above one wave)
    int y = 1;
    if (args.column_splits > 0) y = min(n_tiles, args.column_splits);
    else if (2 * m_blocks <= sm_count) y = max(1, min(n_tiles, (2 * sm_count + m_blocks - 1) / m_blocks));
    else if (m_blocks <= sm_count && (BWD || args.n2 >= 2 * args.k1)) y = min(n_tiles, 2);
    lora_rows_kernel<T, TA, R, BM, BWD><<<dim3(m_blocks, y), kThreads, Cfg::SMEM, stream>>>(args);
    return cudaGetLastError();
}

// rank padded to a multiple of 16 (R ∈ {16, 32, 64, 128}); rows per block (unless args.block_rows forces 16, 32 or
// 64): 16 until 32-row blocks would fill every multiprocessor, then 32 at rank ≤ 32 and 64 above. H100, bf16, fp32
// adapters, p 0.1, µs forward / backward rows kernel (scripts/probe_lora_kernels.py shapes, 2026-12-06):
//   M8192 K=N=4096 r16     bm16 115/106   bm32 101/94    bm64 114/99      (unsplit)
//   M8192 K=N=4096 r64     bm16 237/232   bm32 181/222   bm64 187/162
//   M8192 K4096 N14336 r16 bm16 247/190   bm32 210/160   bm64 225/164
//   M4096 K=N=2048 r16     bm16 34/34     bm32 40/37     bm64 58/49
template <typename T, typename TA, bool BWD>
cudaError_t launch_rows_for(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    const int bm = args.block_rows > 0 ? args.block_rows : (args.m + 31) / 32 < sm_count ? 16 : args.r <= 32 ? 32 : 64;
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
// big; job = blockIdx.x (the dA tiles over K first: big = drop(x), small = gs, out = dAᵀ; then the dB tiles over
// N: big = dy, small = hs, out = dB), split = blockIdx.y. With several splits each block writes its partial tile
// to the workspace, and the last block to finish a tile (a counter per tile) sums the partials in split order.

template <typename T, int R>
struct ReduceConfig {
    static constexpr int BC = 64, BMR = R <= 32 ? 128 : 64;  // rows a step: more bytes in flight where registers allow
    static constexpr int LDG = BC + 8, LDS = R + 8, LDR = R + 4;
    static constexpr int FR = (BC / 16) * (R / 16);
    static constexpr int KS = FR >= kWarps ? 1 : kWarps / FR;
    static constexpr int FPW = FR >= kWarps ? FR / kWarps : 1;
    static constexpr int G_ELEMS = BMR * LDG, S_ELEMS = BMR * LDS;
    static constexpr int LOOP_BYTES = 2 * (G_ELEMS + S_ELEMS) * int(sizeof(T));
    static constexpr int RED_BYTES = KS * BC * LDR * 4;
    static constexpr int SMEM = cmax<LOOP_BYTES, RED_BYTES>();
    static_assert(BMR % (16 * KS) == 0, "each k-split warp needs whole 16-row steps");
};

template <typename T, typename TO, int R>
__global__ void __launch_bounds__(kThreads) lora_reduce_kernel(LoraReduceArgs args, LoraReducePlan plan) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // never launched there: lora_kernels_support refuses GPUs below sm_80 (bf16 WMMA)
#else
    using Cfg = ReduceConfig<T, R>;
    constexpr int BC = Cfg::BC, BMR = Cfg::BMR;
    extern __shared__ __align__(128) unsigned char smem[];
    T* gs_ = reinterpret_cast<T*>(smem);
    T* ss_ = gs_ + 2 * Cfg::G_ELEMS;
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

    RowTile<T, T, BMR, BC, Cfg::LDG> gt;
    RankTile<T, T, BMR, R, Cfg::LDS> st;
    auto load = [&](int row0) {
        gt.load(big, row_end, C, row0, c0);  // rows past this split's end read as zeros
        st.load(small, row_end, r, row0);
    };
    auto store = [&](int buf, int row0) {
        if (mask != nullptr) gt.store_masked(gs_ + buf * Cfg::G_ELEMS, row_end, C, row0, c0, mask, inv_keep);
        else gt.store(gs_ + buf * Cfg::G_ELEMS);
        st.store(ss_ + buf * Cfg::S_ELEMS);
    };

    const int warp = threadIdx.x / 32, group = warp / Cfg::KS, ks = warp % Cfg::KS;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Cfg::FPW];
#pragma unroll
    for (int i = 0; i < Cfg::FPW; ++i) wmma::fill_fragment(acc[i], 0.f);
    const int steps = (row_end - row_begin + BMR - 1) / BMR;
    if (steps > 0) {
        load(row_begin);
        store(0, row_begin);
    }
    __syncthreads();
    for (int t = 0; t < steps; ++t) {
        const int buf = t & 1;
        if (t + 1 < steps) load(row_begin + (t + 1) * BMR);
        const T* g_s = gs_ + buf * Cfg::G_ELEMS;
        const T* s_s = ss_ + buf * Cfg::S_ELEMS;
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
        if (t + 1 < steps) store(buf ^ 1, row_begin + (t + 1) * BMR);
        __syncthreads();
    }
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
        out[at] = from_float<TO>(v);
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

template <typename T, typename TO, int R>
cudaError_t launch_reduce(const LoraReduceArgs& args, const LoraReducePlan& plan, cudaStream_t stream) {
    using Cfg = ReduceConfig<T, R>;
    if (const cudaError_t err = allow_dynamic_smem<lora_reduce_kernel<T, TO, R>, Cfg::SMEM>(); err != cudaSuccess)
        return err;
    if (plan.splits > 1 && !args.counters_zeroed) {
        const cudaError_t err = cudaMemsetAsync(args.counters, 0, sizeof(int) * plan.counters, stream);
        if (err != cudaSuccess) return err;
    }
    lora_reduce_kernel<T, TO, R><<<dim3(plan.tiles_a + plan.tiles_b, plan.splits), kThreads, Cfg::SMEM, stream>>>(
        args, plan);
    return cudaGetLastError();
}

template <typename T, typename TO>
cudaError_t launch_reduce_for(const LoraReduceArgs& args, const LoraReducePlan& plan, cudaStream_t stream) {
    if (args.r <= 16) return launch_reduce<T, TO, 16>(args, plan, stream);
    if (args.r <= 32) return launch_reduce<T, TO, 32>(args, plan, stream);
    if (args.r <= 64) return launch_reduce<T, TO, 64>(args, plan, stream);
    return launch_reduce<T, TO, 128>(args, plan, stream);
}

}  // namespace lora_kernels
