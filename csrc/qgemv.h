// Launcher of the small-M 4-bit GEMM with the LoRA term (qgemv.cu); plain pointers, no torch headers, so the
// kernel also compiles with a bare `nvcc -c` (CI checks that much without a GPU).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

constexpr int kQgemvMaxRows = 16;

struct QgemvArgs {
    const void* x;          // M×K, contiguous, 16-byte aligned, bf16 or fp16
    const uint8_t* w;       // packed 4-bit weight, (N·K)/2 bytes, 16-byte aligned (bitsandbytes' layout)
    const float* code;      // 16 code values
    const float* absmax;    // fp32 absmax per block of `blocksize` flat weights, or nullptr when double-quantized:
    const uint8_t* qabsmax; //   absmax[b] = code2[qabsmax[b]] · absmax2[b / blocksize2] + *offset (bitsandbytes'
    const float* absmax2;   //   two fp32 roundings, as dequant4.cu makes them)
    const float* code2;     //   (256 values)
    const float* offset;    //   (one value, read on the device)
    const void* bias;       // N, or nullptr
    const void* hs;         // M×R = s·x·Aᵀ, or nullptr
    const void* lora_b;     // N×R, or nullptr
    void* y;                // M×N output
    int m, n, k, r, blocksize, blocksize2;
    bool bf16;              // element type of x, bias, hs, lora_b, y: bf16 (true) or fp16
};

// Whether the kernel takes these sizes on the current GPU (sm_80 or newer: bf16 mma), pointers aside
bool qgemv_supports(int64_t m, int64_t k, int64_t blocksize, bool nested, int64_t blocksize2);

// The 4-bit weight's scales as the kernels that read the packed bytes in place take them (Args: QgemvArgs or
// LoraDecodeArgs, the same fields). Given: an fp32 absmax, or every part of the double-quantized one.
template <typename Args>
bool quant4_scales_given(const Args& a) {
    return a.absmax != nullptr ||
           (a.qabsmax != nullptr && a.absmax2 != nullptr && a.code2 != nullptr && a.offset != nullptr);
}

#ifdef __CUDACC__
// The absmax of flat block `block` (offset: *a.offset, read once a thread where double-quantized)
template <typename Args>
__device__ __forceinline__ float quant4_block_absmax(const Args& a, int64_t block, float offset) {
    return a.absmax != nullptr ? __ldg(a.absmax + block)
                               : __fadd_rn(__fmul_rn(__ldg(a.code2 + __ldg(a.qabsmax + block)),
                                                     __ldg(a.absmax2 + block / a.blocksize2)),
                                           offset);
}
#endif

// y = x · deq(W)ᵀ (+ bias) (+ hs · lora_bᵀ), reading the packed weight once
cudaError_t launch_qgemv_lora(const QgemvArgs& args, cudaStream_t stream);
