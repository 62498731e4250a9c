// The reduce kernel's instantiations (lora_kernels.cuh) and the entry points of lora_kernels.h.
#include "lora_kernels.cuh"

cudaError_t launch_lora_rows_forward(const LoraRowsArgs& args, int sm_count, cudaStream_t stream);
cudaError_t launch_lora_rows_backward(const LoraRowsArgs& args, int sm_count, cudaStream_t stream);

namespace {
// compute(device) for the current device, asked once per device: kept where positive (`fallback` where the current
// device cannot be asked)
template <typename F>
int once_per_device(int (&cache)[64], int fallback, F compute) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return fallback;
    if (device < 64 && cache[device] > 0) return cache[device];
    const int value = compute(device);
    if (device < 64 && value > 0) cache[device] = value;
    return value;
}
}  // namespace

int lora_device_major() {
    static int majors[64] = {};
    return once_per_device(majors, 0, [](int device) {
        int major = 0;
        return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess ? major : 0;
    });
}

bool lora_device_supported() { return lora_device_major() >= 8; }

bool lora_kernels_support(LoraDtype dtype, LoraDtype adapter_dtype, int r, int64_t k, int64_t n) {
    if (dtype != LoraDtype::kBFloat16 && dtype != LoraDtype::kFloat16) return false;
    if (!lora_device_supported()) return false;
    if (adapter_dtype != dtype && adapter_dtype != LoraDtype::kFloat32) return false;
    return r >= 1 && r <= kLoraKernelMaxRank && k >= 8 && n >= 8 && k % 8 == 0 && n % 8 == 0 && k <= INT32_MAX &&
           n <= INT32_MAX;
}

bool lora_reduce_cols_supported(int cols) { return cols == 64 || cols == 128; }

namespace {
// How many blocks of the compact reduce kernel one multiprocessor of the current GPU holds at once (its shared memory
// and registers), asked once per device: three on Hopper. Its bf16 instance stands for all (the same shared memory).
int compact_reduce_blocks_per_sm() {
    static int per_device[64] = {};
    return once_per_device(per_device, 2, [](int) {
        using namespace lora_kernels;
        constexpr auto kernel = lora_reduce_kernel<__nv_bfloat16, float, 16, 64, true>;
        constexpr int smem = ReduceConfig<__nv_bfloat16, 16, 64, true>::SMEM;
        int blocks = 0;
        if (allow_dynamic_smem<kernel, smem>() != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem) != cudaSuccess) {
            (void)cudaGetLastError();  // (a launch would report a real failure; this only sizes the grid)
            blocks = 2;
        }
        return std::max(1, std::min(blocks, 4));
    });
}
}  // namespace

LoraReducePlan lora_reduce_plan(int m, int k, int n, int r, bool grad_a, bool grad_b, int sm_count, int cols,
                                bool compact) {
    constexpr int rows_step = 64;
    const int bc = lora_reduce_cols_supported(cols) ? cols : 64;
    LoraReducePlan plan{};
    plan.cols = bc;
    plan.compact = compact && bc == 64 && r <= 16;
    plan.tiles_a = grad_a ? (k + bc - 1) / bc : 0;
    plan.tiles_b = grad_b ? (n + bc - 1) / bc : 0;
    const int tiles = plan.tiles_a + plan.tiles_b;
    // one wave of two blocks per multiprocessor (what shared memory allows: each block keeps one to three steps in
    // flight, lora_kernels.cuh ReduceConfig; compact: as many as the GPU holds), each summing at least 128 rows;
    // counted as if both gradients were asked for, so that each one's summation order (its bits) does not depend on
    // whether the other is computed
    const int all_tiles = (k + bc - 1) / bc + (n + bc - 1) / bc;
    int splits = (plan.compact ? compact_reduce_blocks_per_sm() : 2) * sm_count / all_tiles;
    splits = std::max(1, std::min(splits, (m + 127) / 128));
    const int steps = (m + rows_step - 1) / rows_step;
    plan.rows_per_split = ((steps + splits - 1) / splits) * rows_step;
    plan.splits = std::max(1, (m + plan.rows_per_split - 1) / plan.rows_per_split);
    plan.workspace_floats =
        plan.splits > 1 ? static_cast<int64_t>(tiles) * plan.splits * bc * lora_rank_block(r) : 0;
    plan.counters = plan.splits > 1 ? tiles : 0;
    return plan;
}

cudaError_t launch_lora_rows(const LoraRowsArgs& args, int sm_count, cudaStream_t stream) {
    if (args.m <= 0) return cudaSuccess;
    auto launch = [&](const LoraRowsArgs& a) {
        return a.backward ? launch_lora_rows_backward(a, sm_count, stream)
                          : launch_lora_rows_forward(a, sm_count, stream);
    };
    if (!args.two_pass || args.out == nullptr || args.small == nullptr) return launch(args);
    LoraRowsArgs first = args;  // phase 1 alone: small (and A's copy, the mask, the zeroed counters)
    first.out = nullptr;
    first.w2_copy = nullptr;
    first.column_splits = 0;
    if (const cudaError_t err = launch(first); err != cudaSuccess) return err;
    LoraRowsArgs second = args;  // phase 2 alone, from small: out (and B's copy)
    second.small_ready = true;
    second.w1_copy = nullptr;
    second.zero = nullptr;
    second.zero_count = 0;
    second.block_rows = args.pass2_rows;
    return launch(second);
}

namespace {
// dst[0 … na) = a, dst[na … na + nb) = b, each element rounded to T as torch's copy_ rounds it (to nearest even)
template <typename T>
__global__ void __launch_bounds__(lora_kernels::kThreads) round_pair_kernel(const float* __restrict__ a, int64_t na,
                                                                            const float* __restrict__ b, int64_t nb,
                                                                            T* __restrict__ dst) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < na + nb; i += stride)
        dst[i] = lora_kernels::from_float<T>(i < na ? a[i] : b[i - na]);
}
}  // namespace

cudaError_t launch_lora_round_adapters(const float* a, int64_t na, const float* b, int64_t nb, void* dst,
                                       LoraDtype dtype, cudaStream_t stream) {
    const int64_t total = na + nb;
    if (total <= 0) return cudaSuccess;
    // a few elements a thread: ~250k elements for r16 at the 7B shapes, so the launch is the cost, not the bytes
    const int threads = lora_kernels::kThreads;
    const int blocks = static_cast<int>(std::min<int64_t>((total + 4 * threads - 1) / (4 * threads), 1024));
    if (dtype == LoraDtype::kBFloat16)
        round_pair_kernel<<<blocks, threads, 0, stream>>>(a, na, b, nb, static_cast<__nv_bfloat16*>(dst));
    else if (dtype == LoraDtype::kFloat16)
        round_pair_kernel<<<blocks, threads, 0, stream>>>(a, na, b, nb, static_cast<__half*>(dst));
    else
        return cudaErrorInvalidValue;
    return cudaGetLastError();
}

cudaError_t launch_lora_reduce(const LoraReduceArgs& args, const LoraReducePlan& plan, cudaStream_t stream) {
    using namespace lora_kernels;
    if (args.m <= 0 || plan.tiles_a + plan.tiles_b == 0) return cudaSuccess;
    const bool fp32_out = args.grad_dtype == LoraDtype::kFloat32;
    if (args.dtype == LoraDtype::kBFloat16)
        return fp32_out ? launch_reduce_for<__nv_bfloat16, float>(args, plan, stream)
                        : launch_reduce_for<__nv_bfloat16, __nv_bfloat16>(args, plan, stream);
    return fp32_out ? launch_reduce_for<__half, float>(args, plan, stream)
                    : launch_reduce_for<__half, __half>(args, plan, stream);
}
