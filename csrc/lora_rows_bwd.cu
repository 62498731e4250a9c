// The backward rows kernel's instantiations (lora_kernels.cuh): gs = s·dy B, dx = drop(gs A).
#include "lora_kernels.cuh"

cudaError_t launch_lora_rows_backward(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    return lora_kernels::launch_rows_dir<true>(args, sm_count, stream);
}
