// 4-bit (NF4 / FP4) dequantization, bit-identical to bitsandbytes' dequantize_4bit (dequant4.h). A chunk is 4 packed
// bytes → 8 outputs (one 16-byte store); its 8 elements share one absmax because blocksize is a multiple of 8. Each
// thread takes kChunksPerThread chunks a block-width apart (every load and store of a warp stays contiguous) and
// issues all their loads before any store: memory-bound (4 bytes read, 16 written a chunk), so what matters is how
// many bytes each multiprocessor has in flight. One chunk a thread ran at ~2.1 TB/s (H100, the 7B QLoRA step's
// weights: 34 µs a 4096×11008 / 3 × 4096² average), the same as bitsandbytes' kernel.
#include "dequant4.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;
constexpr int kChunksPerThread = 4;
constexpr int64_t kChunksPerBlock = int64_t{kThreads} * kChunksPerThread;

__device__ __forceinline__ uint32_t pack2(float lo, float hi, bool bf16) {
    if (bf16) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// Index: uint32_t where every element index fits (the usual weight: no 64-bit divisions), else int64_t
template <typename Index>
__global__ void __launch_bounds__(kThreads) dequant4_kernel(Dequant4Args args) {
    static_assert(kThreads == 256, "one thread a code2 value");
    __shared__ float code[16];
    __shared__ float code2[256];
    const bool nested = args.absmax == nullptr;
    if (threadIdx.x < 16) code[threadIdx.x] = args.code[threadIdx.x];
    if (nested) code2[threadIdx.x] = args.code2[threadIdx.x];
    __syncthreads();
    const Index chunks = static_cast<Index>(args.n / 8);
    const Index first = static_cast<Index>(blockIdx.x * kChunksPerBlock + threadIdx.x);
    const Index blocksize = static_cast<Index>(args.blocksize), blocksize2 = static_cast<Index>(args.blocksize2);
    const float offset = nested ? __ldg(args.offset) : 0.f;
    uint32_t bytes[kChunksPerThread] = {};
    float absmax[kChunksPerThread] = {};
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {  // every load first
        const Index c = first + static_cast<Index>(i * kThreads);
        if (c >= chunks) continue;
        bytes[i] = __ldg(reinterpret_cast<const uint32_t*>(args.packed) + c);
        const Index block = c * 8 / blocksize;
        if (!nested) {
            absmax[i] = __ldg(args.absmax + block);
        } else {  // two roundings, as bitsandbytes' two steps make them (no fused multiply-add)
            const float scale2 = __ldg(args.absmax2 + block / blocksize2);
            absmax[i] = __fadd_rn(__fmul_rn(code2[__ldg(args.qabsmax + block)], scale2), offset);
        }
    }
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
        const Index c = first + static_cast<Index>(i * kThreads);
        if (c >= chunks) continue;
        uint32_t words[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t byte = bytes[i] >> (8 * j) & 0xff;
            words[j] = pack2(__fmul_rn(code[byte >> 4], absmax[i]), __fmul_rn(code[byte & 0xf], absmax[i]), args.bf16);
        }
        static_cast<uint4*>(args.out)[c] = make_uint4(words[0], words[1], words[2], words[3]);
    }
}

}  // namespace

bool dequant4_supports(int64_t n, int blocksize, int blocksize2, bool nested) {
    return n > 0 && n % 8 == 0 && blocksize > 0 && blocksize % 8 == 0 && (!nested || blocksize2 > 0) &&
           (n / 8 + kChunksPerBlock - 1) / kChunksPerBlock < (1LL << 31);
}

cudaError_t launch_dequant4(const Dequant4Args& args, cudaStream_t stream) {
    if (!dequant4_supports(args.n, args.blocksize, args.blocksize2, args.absmax == nullptr))
        return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(args.packed) % 4 != 0 || reinterpret_cast<uintptr_t>(args.out) % 16 != 0)
        return cudaErrorMisalignedAddress;
    const int64_t chunks = args.n / 8;
    const unsigned grid = static_cast<unsigned>((chunks + kChunksPerBlock - 1) / kChunksPerBlock);
    // (32-bit indices while c · 8 of the last chunk of the last block fits)
    if ((int64_t{grid} * kChunksPerBlock) * 8 <= int64_t{UINT32_MAX})
        dequant4_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(args);
    else
        dequant4_kernel<int64_t><<<grid, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
}
