// Launcher of the 4-bit dequantization kernel (dequant4.cu): a bitsandbytes NF4 / FP4 weight to bf16 / fp16, for
// the QLoRA node of lora_autograd.cpp, which multiplies by the result at once and frees it. Plain pointers, no
// torch headers, so the kernel also compiles with a bare `nvcc -c`.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

struct Dequant4Args {
    const uint8_t* packed;   // n/2 bytes, element 2j in the high nibble of byte j (bitsandbytes' layout)
    const float* code;       // the 16 code values
    const float* absmax;     // fp32 absmax per block of `blocksize` elements, or nullptr when double-quantized:
    const uint8_t* qabsmax;  //   absmax[b] = code2[qabsmax[b]] · absmax2[b / blocksize2] + *offset, each op
    const float* absmax2;    //   rounded in fp32, as bitsandbytes computes it (dequantize_blockwise, then + offset)
    const float* code2;      //   (256 values)
    const float* offset;     //   (one value, on the device: reading it on the host would synchronize)
    void* out;               // n elements, 16-byte aligned
    int64_t n;               // a multiple of 8
    int blocksize, blocksize2;  // blocksize a multiple of 8
    bool bf16;               // output bf16 (true) or fp16
};

// Whether the kernel takes these sizes (else the caller composes the dequantization from ATen ops)
bool dequant4_supports(int64_t n, int blocksize, int blocksize2, bool nested);

// value = code[nibble] · absmax of its block, in fp32, rounded once into the output type: bit-identical to
// bitsandbytes' dequantize_4bit
cudaError_t launch_dequant4(const Dequant4Args& args, cudaStream_t stream);
