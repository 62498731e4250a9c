// Triton kernels compiled in Python for this GPU (kernels/lora_gemm_tma.py compile_for_cpp) and launched from C++
// through the CUDA runtime's library API: a launch then costs the host what one of csrc/'s own kernels costs (no
// Python, no Triton launcher), so the C++ autograd node can call them (its one-GEMM route).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

// One argument's bits: a device pointer, an int32 or a float32, as the kernel's parameter kinds say ('p', 'i', 'f')
union TritonArg {
    uint64_t pointer;
    int32_t i32;
    float f32;
};

// Loads `cubin` (entry `name`) and returns its id. shared: dynamic shared memory bytes; kinds: every parameter's
// kind in order, the trailing ones past user_params being Triton's hidden scratch pointers (global scratch first:
// scratch_bytes a program, aligned to scratch_align; the others null).
int64_t triton_kernel_register(const std::string& cubin, const std::string& name, int64_t shared, int64_t num_warps,
                               int64_t scratch_bytes, int64_t scratch_align, const std::string& kinds,
                               int64_t user_params);

// Launches kernel `id` with `grid` programs on the current stream of the current device.
void triton_kernel_launch(int64_t id, int64_t grid, const std::vector<TritonArg>& args);

// Kernel `id`'s parameter kinds (for a caller that converts its arguments, bindings.cpp)
std::string triton_kernel_kinds(int64_t id);
