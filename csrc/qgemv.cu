// Small-M (decode) 4-bit GEMV with the LoRA term: y = x · deq(W)ᵀ (+ bias) + hs · Bᵀ, for M ≤ 16 rows.
//
// W is a bitsandbytes 4-bit weight (N×K, flattened row-major, two codes a byte, element 2j in the high nibble),
// value = code[nibble] · absmax[flat index / blocksize] (absmax already fp32: double quantization undone by the
// caller). Each warp owns output rows n; each lane reads 16-byte chunks (32 weights) of its rows once, so W streams
// from memory exactly once. x is staged in shared memory one K tile at a time and shared by the block's 16 rows.
// hs = s·x·Aᵀ (M×R, R ≤ 128) comes precomputed; the low-rank term, bias and the cast to T happen in the epilogue.
//
// Requirements (checked by the caller, peft_fast/ops/cuda_qlora.py): K % 32 == 0, blocksize % 32 == 0, x rows
// contiguous and 16-byte aligned, T in {bf16, fp16}.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "qgemv.h"

namespace {

constexpr int kWarps = 8;           // warps per block
constexpr int kRowsPerWarp = 2;     // output rows per warp
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kTileK = 1024;        // K elements of x staged in shared memory at a time

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32)
qgemv_lora_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ code,
                  const float* __restrict__ absmax, int blocksize, int N, int K, const T* __restrict__ bias,
                  const T* __restrict__ hs, int R, const T* __restrict__ lora_b, T* __restrict__ y) {
    __shared__ float s_code[16];
    __shared__ __align__(16) T s_x[M * kTileK];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];

    float acc[kRowsPerWarp][M];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[i][m] = 0.f;

    const int row0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
    constexpr int kVec = 16 / sizeof(T);  // elements of T in one 16-byte load
    for (int k0 = 0; k0 < K; k0 += kTileK) {
        const int kt = min(kTileK, K - k0);
        __syncthreads();  // the previous tile is consumed (and s_code written, on the first pass)
        for (int v = threadIdx.x; v < M * kt / kVec; v += blockDim.x) {
            const int m = v / (kt / kVec), j = v % (kt / kVec);
            reinterpret_cast<uint4*>(s_x + m * kTileK)[j] =
                __ldg(reinterpret_cast<const uint4*>(x + (int64_t)m * K + k0) + j);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
            const int n = row0 + i;
            if (n >= N) continue;  // uniform across the warp
            const int64_t flat0 = (int64_t)n * K + k0;  // flat index of the tile's first weight in row n
            const uint4* wrow = reinterpret_cast<const uint4*>(w + flat0 / 2);
            for (int c = lane; c < kt / 32; c += 32) {
                const uint4 packed = __ldg(wrow + c);
                const float scale = __ldg(absmax + (flat0 + c * 32) / blocksize);
                const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
                float wv[32];
#pragma unroll
                for (int b = 0; b < 16; ++b) {
                    wv[2 * b] = s_code[bytes[b] >> 4] * scale;
                    wv[2 * b + 1] = s_code[bytes[b] & 0xF] * scale;
                }
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    const T* xr = s_x + m * kTileK + c * 32;
                    float sum = 0.f;
#pragma unroll
                    for (int j = 0; j < 32; ++j) sum += wv[j] * to_float(xr[j]);
                    acc[i][m] += sum;
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
        const int n = row0 + i;
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                acc[i][m] += __shfl_down_sync(0xffffffffu, acc[i][m], offset);
        if (lane != 0 || n >= N) continue;
        const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[i][m] + b;
            if (hs != nullptr)
                for (int r = 0; r < R; ++r) v += to_float(hs[m * R + r]) * to_float(lora_b[(int64_t)n * R + r]);
            y[(int64_t)m * N + n] = from_float<T>(v);
        }
    }
}

template <typename T, int M>
cudaError_t launch_m(const QgemvArgs& a, cudaStream_t stream) {
    const dim3 grid((a.n + kRowsPerBlock - 1) / kRowsPerBlock), block(kWarps * 32);
    qgemv_lora_kernel<T, M><<<grid, block, 0, stream>>>(
        static_cast<const T*>(a.x), a.w, a.code, a.absmax, a.blocksize, a.n, a.k, static_cast<const T*>(a.bias),
        static_cast<const T*>(a.hs), a.r, static_cast<const T*>(a.lora_b), static_cast<T*>(a.y));
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const QgemvArgs& a, cudaStream_t stream) {
    switch (a.m) {
#define PEFT_FAST_CASE(M) \
    case M:               \
        return launch_m<T, M>(a, stream);
        PEFT_FAST_CASE(1) PEFT_FAST_CASE(2) PEFT_FAST_CASE(3) PEFT_FAST_CASE(4) PEFT_FAST_CASE(5) PEFT_FAST_CASE(6)
        PEFT_FAST_CASE(7) PEFT_FAST_CASE(8) PEFT_FAST_CASE(9) PEFT_FAST_CASE(10) PEFT_FAST_CASE(11)
        PEFT_FAST_CASE(12) PEFT_FAST_CASE(13) PEFT_FAST_CASE(14) PEFT_FAST_CASE(15) PEFT_FAST_CASE(16)
#undef PEFT_FAST_CASE
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace

cudaError_t launch_qgemv_lora(const QgemvArgs& args, cudaStream_t stream) {
    if (args.m < 1 || args.m > kQgemvMaxRows || args.k % 32 != 0 || args.blocksize % 32 != 0 || args.r > 128)
        return cudaErrorInvalidValue;
    return args.bf16 ? launch_dtype<__nv_bfloat16>(args, stream) : launch_dtype<__half>(args, stream);
}
