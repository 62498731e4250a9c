// 4-bit (NF4 / FP4) dequantization, bit-identical to bitsandbytes' dequantize_4bit (dequant4.h). Each thread turns
// 4 packed bytes into 8 outputs (one 16-byte store); a block's 8 elements share one absmax because blocksize is a
// multiple of 8. Memory-bound: 4 bytes read, 16 written per thread.
#include "dequant4.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint32_t pack2(float lo, float hi, bool bf16) {
    if (bf16) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

__global__ void dequant4_kernel(Dequant4Args args) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = args.code[threadIdx.x];
    __syncthreads();
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    const int64_t e0 = t * 8;
    if (e0 >= args.n) return;
    const int64_t block = e0 / args.blocksize;
    float absmax;
    if (args.absmax != nullptr) {
        absmax = args.absmax[block];
    } else {  // two roundings, as bitsandbytes' two steps make them (no fused multiply-add)
        absmax = __fadd_rn(__fmul_rn(args.code2[args.qabsmax[block]], args.absmax2[block / args.blocksize2]),
                           *args.offset);
    }
    const uint32_t bytes = *reinterpret_cast<const uint32_t*>(args.packed + e0 / 2);
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t byte = bytes >> (8 * j) & 0xff;
        words[j] = pack2(__fmul_rn(code[byte >> 4], absmax), __fmul_rn(code[byte & 0xf], absmax), args.bf16);
    }
    *reinterpret_cast<uint4*>(static_cast<char*>(args.out) + e0 * 2) = make_uint4(words[0], words[1], words[2], words[3]);
}

}  // namespace

bool dequant4_supports(int64_t n, int blocksize, int blocksize2, bool nested) {
    return n > 0 && n % 8 == 0 && blocksize > 0 && blocksize % 8 == 0 && (!nested || blocksize2 > 0) &&
           (n + 8LL * kThreads - 1) / (8LL * kThreads) < (1LL << 31);
}

cudaError_t launch_dequant4(const Dequant4Args& args, cudaStream_t stream) {
    if (!dequant4_supports(args.n, args.blocksize, args.blocksize2, args.absmax == nullptr))
        return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(args.packed) % 4 != 0 || reinterpret_cast<uintptr_t>(args.out) % 16 != 0)
        return cudaErrorMisalignedAddress;
    const int64_t threads = args.n / 8;
    const unsigned grid = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
    dequant4_kernel<<<grid, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
}
