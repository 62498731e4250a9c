// The low-rank term of a decode call (an inference call of at most kLoraDecodeMaxRows rows, no dropout) in two short
// kernels: out = s·(x Aᵀ) Bᵀ (+ bias) (+ addend). The rows kernel (lora_kernels.cuh) walks all of K in one block per
// 16 rows before it writes anything: at 16 rows that walk is the kernel (14-20 µs for K = 4096, H100, where the
// bytes take about 1 µs). Here K is split over up to kMaxSplits blocks instead:
//   shrink  block c: P[c] = x[:, span c] · A[:, span c]ᵀ (M×r fp32, into the workspace), the span staged through
//           shared memory a chunk at a time
//   expand  block t: h = round_T(s · Σ_c P[c]) (rounded as the rows kernel rounds hs), then
//           out[:, tile t] = h · B[tile t]ᵀ (+ bias) (+ addend)
// Adapters are read in their own dtype and rounded to T, as the rows kernel does; sums in fp32 in a fixed order
// (deterministic). CUDA cores: at ≤ 16 rows the arithmetic is small next to the loads' latency.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "lora_kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kChunkFloats = 4096;  // A's chunk in shared memory: r_pad × chunk ≤ this many floats
constexpr int kTileN = 64;          // output columns per expand block

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// an adapter value as the compute dtype T rounds it, back in fp32
template <typename T, typename TA>
__device__ __forceinline__ float rounded(TA v) {
    if constexpr (std::is_same_v<T, TA>) return to_float(v);
    else return to_float(from_float<T>(to_float(v)));
}

constexpr int kMaxSplits = 32;      // shrink blocks at most (the expand blocks each sum that many partials)
constexpr int kOutsPerThread = kLoraDecodeMaxRows * kLoraKernelMaxRank / kThreads;

int padded_rank(int r) { return r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : 128; }
int chunk_of(int r) { return kChunkFloats / padded_rank(r); }  // 256, 128, 64 or 32 columns of K in shared memory
// columns of K per shrink block: whole chunks, at most kMaxSplits blocks
int64_t span_of(int64_t k, int r) {
    const int64_t chunks = (k + chunk_of(r) - 1) / chunk_of(r);
    return (chunks + kMaxSplits - 1) / kMaxSplits * chunk_of(r);
}

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads) lora_decode_shrink(LoraDecodeArgs a, int chunk, int span) {
    __shared__ float xs[kLoraDecodeMaxRows * 256];
    __shared__ float as[kChunkFloats + 128];  // r rows of chunk + 1 (the pad spreads a warp's rows over the banks)
    const T* x = static_cast<const T*>(a.x);
    const TA* w = static_cast<const TA*>(a.a);
    const int ld = chunk + 1, outs = a.m * a.r;
    const int64_t k_begin = (int64_t)blockIdx.x * span, k_end = min((int64_t)a.k, k_begin + span);
    float acc[kOutsPerThread] = {};
    for (int64_t k0 = k_begin; k0 < k_end; k0 += chunk) {
        const int kc = static_cast<int>(min((int64_t)chunk, k_end - k0));
        __syncthreads();  // the previous chunk is consumed
        for (int e = threadIdx.x; e < a.m * chunk; e += kThreads) {
            const int m = e / chunk, t = e % chunk;
            xs[m * chunk + t] = t < kc ? to_float(x[(int64_t)m * a.k + k0 + t]) : 0.f;
        }
        for (int e = threadIdx.x; e < a.r * chunk; e += kThreads) {
            const int j = e / chunk, t = e % chunk;
            as[j * ld + t] = t < kc ? rounded<T>(w[(int64_t)j * a.k + k0 + t]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kOutsPerThread; ++i) {  // o = m·r + j: a warp's lanes walk j (rows of A)
            const int o = threadIdx.x + i * kThreads;
            if (o >= outs) break;
            const float* xr = xs + (o / a.r) * chunk;
            const float* ar = as + (o % a.r) * ld;
            float v = 0.f;
            for (int t = 0; t < kc; ++t) v += xr[t] * ar[t];
            acc[i] += v;
        }
    }
    float* part = a.workspace + (int64_t)blockIdx.x * outs;
#pragma unroll
    for (int i = 0; i < kOutsPerThread; ++i) {
        const int o = threadIdx.x + i * kThreads;
        if (o < outs) part[o] = acc[i];
    }
}

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads) lora_decode_expand(LoraDecodeArgs a, int splits) {
    __shared__ float hs[kLoraDecodeMaxRows * kLoraKernelMaxRank];
    __shared__ float bs[kTileN * (kLoraKernelMaxRank + 1)];
    const TA* w = static_cast<const TA*>(a.b);
    const int n0 = blockIdx.x * kTileN, nc = min(kTileN, a.n - n0), ld = a.r + 1;
    for (int o = threadIdx.x; o < a.m * a.r; o += kThreads) {
        float v = 0.f;
        for (int c = 0; c < splits; ++c) v += a.workspace[(int64_t)c * a.m * a.r + o];
        hs[o] = to_float(from_float<T>(v * a.scale));
    }
    for (int e = threadIdx.x; e < nc * a.r; e += kThreads) {
        const int t = e / a.r, j = e % a.r;
        bs[t * ld + j] = rounded<T>(w[(int64_t)(n0 + t) * a.r + j]);
    }
    __syncthreads();
    const T* bias = static_cast<const T*>(a.bias);
    const T* addend = static_cast<const T*>(a.addend);
    T* out = static_cast<T*>(a.out);
    for (int o = threadIdx.x; o < a.m * kTileN; o += kThreads) {  // lanes walk columns: coalesced stores
        const int m = o / kTileN, t = o % kTileN;
        if (t >= nc) continue;
        const float* hr = hs + m * a.r;
        const float* br = bs + t * ld;
        float v = 0.f;
        for (int j = 0; j < a.r; ++j) v += hr[j] * br[j];
        const int64_t at = (int64_t)m * a.n + n0 + t;
        if (bias != nullptr) v += to_float(bias[n0 + t]);
        if (addend != nullptr) v += to_float(addend[at]);  // (addend may be out itself: read, then written, here)
        out[at] = from_float<T>(v);
    }
}

template <typename T, typename TA>
cudaError_t launch_typed(const LoraDecodeArgs& a, cudaStream_t stream) {
    const int64_t span = span_of(a.k, a.r);
    const int splits = static_cast<int>((a.k + span - 1) / span);
    lora_decode_shrink<T, TA><<<splits, kThreads, 0, stream>>>(a, chunk_of(a.r), static_cast<int>(span));
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    lora_decode_expand<T, TA><<<(a.n + kTileN - 1) / kTileN, kThreads, 0, stream>>>(a, splits);
    return cudaGetLastError();
}

}  // namespace

bool lora_decode_supports(int m, int64_t k, int64_t n, int r) {
    return m >= 1 && m <= kLoraDecodeMaxRows && r >= 1 && r <= kLoraKernelMaxRank && k >= 1 && n >= 1 &&
           k <= INT32_MAX && n <= INT32_MAX;
}

int64_t lora_decode_workspace_floats(int m, int64_t k, int r) {
    return (k + span_of(k, r) - 1) / span_of(k, r) * m * r;
}

cudaError_t launch_lora_decode(const LoraDecodeArgs& a, cudaStream_t stream) {
    if (!lora_decode_supports(a.m, a.k, a.n, a.r) || a.workspace == nullptr) return cudaErrorInvalidValue;
    const bool f32 = a.adapter_dtype == LoraDtype::kFloat32;
    switch (a.dtype) {
        case LoraDtype::kBFloat16:
            if (f32) return launch_typed<__nv_bfloat16, float>(a, stream);
            if (a.adapter_dtype == LoraDtype::kBFloat16) return launch_typed<__nv_bfloat16, __nv_bfloat16>(a, stream);
            break;
        case LoraDtype::kFloat16:
            if (f32) return launch_typed<__half, float>(a, stream);
            if (a.adapter_dtype == LoraDtype::kFloat16) return launch_typed<__half, __half>(a, stream);
            break;
        default:
            break;
    }
    return cudaErrorInvalidValue;
}
