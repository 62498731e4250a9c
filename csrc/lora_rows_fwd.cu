// The forward rows kernel's instantiations (lora_kernels.cuh): hs = s·drop(x)Aᵀ, y = hs Bᵀ (+ bias) (+ addend).
#include "lora_kernels.cuh"

cudaError_t launch_lora_rows_forward(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    return lora_kernels::launch_rows_dir<false>(args, sm_count, stream);
}
