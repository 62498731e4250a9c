// Launcher of the small-M 4-bit GEMV with the LoRA term (qgemv.cu); plain pointers, no torch headers, so the
// kernel also compiles with a bare `nvcc -c` (CI checks that much without a GPU).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

constexpr int kQgemvMaxRows = 16;

struct QgemvArgs {
    const void* x;         // M×K, contiguous, bf16 or fp16
    const uint8_t* w;      // packed 4-bit weight, (N·K)/2 bytes
    const float* code;     // 16 code values
    const float* absmax;   // fp32 absmax per block of `blocksize` flat weights
    const void* bias;      // N, or nullptr
    const void* hs;        // M×R = s·x·Aᵀ, or nullptr
    const void* lora_b;    // N×R, or nullptr
    void* y;               // M×N output
    int m, n, k, r, blocksize;
    bool bf16;             // element type of x, bias, hs, lora_b, y: bf16 (true) or fp16
};

cudaError_t launch_qgemv_lora(const QgemvArgs& args, cudaStream_t stream);
