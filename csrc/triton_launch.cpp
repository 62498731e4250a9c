// csrc/triton_launch.h: the registry of loaded Triton cubins and their launches.
#include "triton_launch.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mutex>

namespace {

struct TritonKernel {
    cudaLibrary_t library = nullptr;
    cudaKernel_t kernel = nullptr;
    int shared = 0, threads = 0, user_params = 0;
    int64_t scratch_bytes = 0, scratch_align = 1;
    std::string kinds, name;
    bool shared_set[64] = {};  // (the dynamic shared memory limit raised on that device)
};

std::mutex registry_mutex;
std::vector<TritonKernel*> registry;  // (never freed: loaded cubins live as long as the process)

void check(cudaError_t err, const TritonKernel& k, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "Triton kernel ", k.name, ": ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

int64_t triton_kernel_register(const std::string& cubin, const std::string& name, int64_t shared, int64_t num_warps,
                               int64_t scratch_bytes, int64_t scratch_align, const std::string& kinds,
                               int64_t user_params) {
    TORCH_CHECK(!cubin.empty() && !name.empty() && num_warps > 0 && shared >= 0 && scratch_bytes >= 0 &&
                    scratch_align > 0 && user_params >= 0 && user_params <= static_cast<int64_t>(kinds.size()),
                "triton_kernel_register: bad kernel description for ", name);
    TORCH_CHECK(kinds.find_first_not_of("pif") == std::string::npos, "triton_kernel_register: kinds must be p/i/f");
    auto* k = new TritonKernel();
    k->name = name;
    k->shared = static_cast<int>(shared);
    k->threads = static_cast<int>(32 * num_warps);
    k->scratch_bytes = scratch_bytes;
    k->scratch_align = scratch_align;
    k->kinds = kinds;
    k->user_params = static_cast<int>(user_params);
    check(cudaLibraryLoadData(&k->library, cubin.data(), nullptr, nullptr, 0, nullptr, nullptr, 0), *k,
          "cudaLibraryLoadData");
    check(cudaLibraryGetKernel(&k->kernel, k->library, name.c_str()), *k, "cudaLibraryGetKernel");
    const std::lock_guard<std::mutex> lock(registry_mutex);
    registry.push_back(k);
    return static_cast<int64_t>(registry.size()) - 1;
}

void triton_kernel_launch(int64_t id, int64_t grid, const std::vector<TritonArg>& args) {
    TritonKernel* k = nullptr;
    {
        const std::lock_guard<std::mutex> lock(registry_mutex);
        TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(registry.size()), "triton_kernel_launch: no kernel ", id);
        k = registry[id];
    }
    TORCH_CHECK(static_cast<int>(args.size()) == k->user_params, "Triton kernel ", k->name, " takes ",
                k->user_params, " arguments, got ", args.size());
    TORCH_CHECK(grid > 0 && grid <= INT32_MAX, "Triton kernel ", k->name, ": bad grid ", grid);
    int device = 0;
    check(cudaGetDevice(&device), *k, "cudaGetDevice");
    if (k->shared > 48 * 1024 && device < 64 && !k->shared_set[device]) {
        check(cudaFuncSetAttribute(reinterpret_cast<const void*>(k->kernel),
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, k->shared),
              *k, "cudaFuncSetAttribute");
        k->shared_set[device] = true;
    }
    // Triton's global scratch (each program's device-made TMA descriptors), from the caching allocator: freed when
    // this function returns, reused only by work queued after this launch on the same stream
    at::Tensor scratch;
    uint64_t scratch_ptr = 0;
    if (k->scratch_bytes > 0) {
        scratch = at::empty({grid * k->scratch_bytes + k->scratch_align},
                            at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
        const uint64_t base = reinterpret_cast<uint64_t>(scratch.data_ptr());
        scratch_ptr = (base + k->scratch_align - 1) / k->scratch_align * k->scratch_align;
    }
    const size_t total = k->kinds.size();
    std::vector<TritonArg> values(args);
    values.resize(total);
    for (size_t i = args.size(); i < total; ++i) values[i].pointer = i == args.size() ? scratch_ptr : 0;
    std::vector<void*> params(total);
    for (size_t i = 0; i < total; ++i) params[i] = &values[i];
    check(cudaLaunchKernel(reinterpret_cast<const void*>(k->kernel), dim3(static_cast<unsigned>(grid)),
                           dim3(static_cast<unsigned>(k->threads)), params.data(), static_cast<size_t>(k->shared),
                           c10::cuda::getCurrentCUDAStream(device).stream()),
          *k, "cudaLaunchKernel");
}

std::string triton_kernel_kinds(int64_t id) {
    const std::lock_guard<std::mutex> lock(registry_mutex);
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(registry.size()), "triton_kernel_launch: no kernel ", id);
    return registry[id]->kinds;
}
