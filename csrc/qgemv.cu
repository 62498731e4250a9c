// Small-M (decode) 4-bit GEMM with the LoRA term, on tensor cores: y = x · deq(W)ᵀ (+ bias) (+ hs · Bᵀ), M ≤ 16.
//
// W is a bitsandbytes 4-bit weight (N×K, flattened row-major, two codes a byte, element 2i in the high nibble of
// byte i), value = code[nibble] · absmax of its block, rounded once to T: exactly the W that bitsandbytes'
// dequantize_4bit makes (double-quantized absmax decoded here, as dequant4.cu does). The packed weight streams from
// memory once; nothing is dequantized into memory.
//
// Each warp multiplies x (16 rows; rows ≥ M are zeros) by 8-row tiles of W with mma.sync m16n8k16 (fp32
// accumulation). In that instruction thread (g = lane/4, q = lane%4) holds W's column g at the logical k
// {2q, 2q+1, 2q+8, 2q+9} and x's rows g, g+8 at the same k. A dot product does not care about the order of k, so
// the kernel renames it: in a 128-wide step, thread q's 8 mmas j = 0..7 take the actual k 32c + 4j + {0, 1, 2, 3}
// of its chunk c = 4·step + q. Then each thread reads its 32 weights as one 16-byte load of W's row (byte 2j gives
// k 4j, 4j+1; byte 2j+1 gives 4j+2, 4j+3) and the matching x as 16-byte loads of its two rows; A and B use the same
// renaming, so every product pairs the right x with the right weight.
//
// A block: kWarps warps splitting K, each covering kTilesN tiles (16 output columns, sharing the x fragments); the
// partial sums meet in shared memory in a fixed order (deterministic), and the epilogue adds bias and the LoRA term
// when given (the LoRA node adds its term afterwards, with its own kernels).
//
// Requirements (qgemv_supports; pointers checked by the launcher): 1 ≤ M ≤ 16, K % 32 == 0, blocksize % 32 == 0
// (so a thread's 32 weights share one absmax), x and W 16-byte aligned, T in {bf16, fp16}, sm_80+.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "lora_kernels.h"
#include "qgemv.h"

namespace {

constexpr int kWarps = 8;                   // warps per block: they split K
constexpr int kTilesN = 2;                  // 8-column tiles of the output per block
constexpr int kColumns = 8 * kTilesN;       // output columns (rows of W) per block

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// two fp32 values rounded to T, lo in the low half (the smaller k, as mma reads a register pair)
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    } else {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
}

// c += a · b for one m16n8k16 tile (a: x rows g, g+8; b: W column g), fp32 accumulation
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // never launched there: qgemv_supports refuses GPUs below sm_80
#endif
}

// 32 consecutive x values of one row (16 registers, two per register), or zeros for a row beyond M / a chunk
// beyond K
__device__ __forceinline__ void load_x(uint32_t (&r)[16], const void* row, bool valid) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        const uint4 u = valid ? __ldg(reinterpret_cast<const uint4*>(row) + v) : make_uint4(0, 0, 0, 0);
        r[4 * v] = u.x, r[4 * v + 1] = u.y, r[4 * v + 2] = u.z, r[4 * v + 3] = u.w;
    }
}

template <typename T, bool kUpper>  // kUpper: M > 8, x rows g + 8 exist
__global__ void __launch_bounds__(kWarps * 32) qgemv_lora_kernel(const QgemvArgs a) {
    __shared__ float s_code[16];
    __shared__ float s_part[kWarps][kTilesN][4][32];  // each warp's partial sums, [lane] last: conflict-free
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    if (threadIdx.x < 16) s_code[threadIdx.x] = a.code[threadIdx.x];
    __syncthreads();

    const T* x = static_cast<const T*>(a.x);
    const int n0 = blockIdx.x * kColumns;
    const int chunks = a.k / 32, steps = (chunks + 3) / 4;
    const float offset = a.absmax == nullptr ? __ldg(a.offset) : 0.f;
    float acc[kTilesN][4];
#pragma unroll
    for (int t = 0; t < kTilesN; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

    for (int s = warp; s < steps; s += kWarps) {
        const int c = 4 * s + q;  // this thread's chunk: k = 32c .. 32c + 31
        const bool in_k = c < chunks;
        uint32_t xlo[16], xhi[16];
        load_x(xlo, x + (int64_t)g * a.k + 32 * c, in_k && g < a.m);
        if constexpr (kUpper) load_x(xhi, x + (int64_t)(g + 8) * a.k + 32 * c, in_k && g + 8 < a.m);
        uint4 packed[kTilesN];
        float scale[kTilesN];
#pragma unroll
        for (int t = 0; t < kTilesN; ++t) {
            const int n = n0 + 8 * t + g;
            packed[t] = make_uint4(0, 0, 0, 0);
            scale[t] = 0.f;  // a missing row or chunk contributes code · 0
            if (in_k && n < a.n) {
                const int64_t flat = (int64_t)n * a.k + 32 * c;
                packed[t] = __ldg(reinterpret_cast<const uint4*>(a.w + flat / 2));
                scale[t] = quant4_block_absmax(a, flat / a.blocksize, offset);
            }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const uint32_t a0 = xlo[2 * j], a2 = xlo[2 * j + 1];
            const uint32_t a1 = kUpper ? xhi[2 * j] : 0u, a3 = kUpper ? xhi[2 * j + 1] : 0u;
#pragma unroll
            for (int t = 0; t < kTilesN; ++t) {
                const uint32_t word = (&packed[t].x)[j / 2];
                const uint32_t b01 = word >> (16 * (j % 2));  // byte 2j (k 4j, 4j+1) then byte 2j+1 (4j+2, 4j+3)
                const uint32_t lo = b01 & 0xff, hi = b01 >> 8 & 0xff;
                const uint32_t b0 = pack2<T>(__fmul_rn(s_code[lo >> 4], scale[t]), __fmul_rn(s_code[lo & 15], scale[t]));
                const uint32_t b1 = pack2<T>(__fmul_rn(s_code[hi >> 4], scale[t]), __fmul_rn(s_code[hi & 15], scale[t]));
                mma16816<T>(acc[t], a0, a1, a2, a3, b0, b1);
            }
        }
    }

#pragma unroll
    for (int t = 0; t < kTilesN; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) s_part[warp][t][i][lane] = acc[t][i];
    __syncthreads();
    if (warp != 0) return;

    const T* bias = static_cast<const T*>(a.bias);
    const T* hs = static_cast<const T*>(a.hs);
    const T* lora_b = static_cast<const T*>(a.lora_b);
    T* y = static_cast<T*>(a.y);
#pragma unroll
    for (int t = 0; t < kTilesN; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // accumulator i: row g (+8 for i ≥ 2), column 2q (+1 for odd i) of tile t
            const int m = g + (i >= 2 ? 8 : 0), n = n0 + 8 * t + 2 * q + (i & 1);
            if (m >= a.m || n >= a.n) continue;
            float v = 0.f;
            for (int w = 0; w < kWarps; ++w) v += s_part[w][t][i][lane];
            if (bias != nullptr) v += to_float(bias[n]);
            if (hs != nullptr)
                for (int r = 0; r < a.r; ++r) v += to_float(hs[m * a.r + r]) * to_float(lora_b[(int64_t)n * a.r + r]);
            y[(int64_t)m * a.n + n] = from_float<T>(v);
        }
}

template <typename T>
cudaError_t launch_dtype(const QgemvArgs& a, cudaStream_t stream) {
    const dim3 grid((a.n + kColumns - 1) / kColumns), block(kWarps * 32);
    if (a.m > 8)
        qgemv_lora_kernel<T, true><<<grid, block, 0, stream>>>(a);
    else
        qgemv_lora_kernel<T, false><<<grid, block, 0, stream>>>(a);
    return cudaGetLastError();
}

}  // namespace

bool qgemv_supports(int64_t m, int64_t k, int64_t blocksize, bool nested, int64_t blocksize2) {
    return m >= 1 && m <= kQgemvMaxRows && k >= 32 && k % 32 == 0 && k <= INT32_MAX && blocksize >= 32 &&
           blocksize % 32 == 0 && blocksize <= INT32_MAX && (!nested || (blocksize2 >= 1 && blocksize2 <= INT32_MAX)) &&
           lora_device_supported();
}

cudaError_t launch_qgemv_lora(const QgemvArgs& args, cudaStream_t stream) {
    const bool nested = args.absmax == nullptr;
    if (!qgemv_supports(args.m, args.k, args.blocksize, nested, args.blocksize2) || args.n < 1 || args.r < 0 ||
        args.r > 128 || (args.hs != nullptr) != (args.lora_b != nullptr) ||
        !quant4_scales_given(args))
        return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(args.x) % 16 != 0 || reinterpret_cast<uintptr_t>(args.w) % 16 != 0)
        return cudaErrorMisalignedAddress;
    return args.bf16 ? launch_dtype<__nv_bfloat16>(args, stream) : launch_dtype<__half>(args, stream);
}
