// pybind11 bindings of peft_fast._C: tensor checks, then the raw-pointer launchers of csrc/*.cu.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>

#include "qgemv.h"

namespace {

torch::Tensor qgemv_lora(torch::Tensor x, torch::Tensor qweight, torch::Tensor code, torch::Tensor absmax,
                         int64_t blocksize, int64_t n, int64_t k, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> hs, c10::optional<torch::Tensor> lora_b) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "qgemv_lora: x must be a contiguous 2-D CUDA tensor");
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf,
                "qgemv_lora: x must be bf16 or fp16");
    TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kQgemvMaxRows, "qgemv_lora: 1 to ", kQgemvMaxRows, " rows, got ",
                x.size(0));
    TORCH_CHECK(x.size(1) == k && k % 32 == 0, "qgemv_lora: x has ", x.size(1), " columns; K must be ", k,
                " and a multiple of 32");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "qgemv_lora: x must be 16-byte aligned");
    TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous() &&
                    qweight.numel() == n * k / 2 && reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
                "qgemv_lora: qweight must be the contiguous, 16-byte aligned uint8 packing of an ", n, "x", k,
                " weight");
    TORCH_CHECK(code.scalar_type() == torch::kFloat && code.numel() == 16 && code.is_cuda(),
                "qgemv_lora: code must be 16 fp32 values on the GPU");
    TORCH_CHECK(blocksize % 32 == 0, "qgemv_lora: blocksize must be a multiple of 32, got ", blocksize);
    TORCH_CHECK(absmax.scalar_type() == torch::kFloat && absmax.is_contiguous() &&
                    absmax.numel() == (n * k + blocksize - 1) / blocksize,
                "qgemv_lora: absmax must hold one fp32 value per block");
    const auto dtype = x.scalar_type();
    int64_t r = 0;
    if (hs.has_value()) {
        TORCH_CHECK(lora_b.has_value(), "qgemv_lora: hs needs lora_b");
        TORCH_CHECK(hs->scalar_type() == dtype && hs->is_contiguous() && hs->size(0) == x.size(0),
                    "qgemv_lora: hs must be contiguous M×R in x's dtype");
        r = hs->size(1);
        TORCH_CHECK(r <= 128, "qgemv_lora: rank ", r, " exceeds 128");
        TORCH_CHECK(lora_b->scalar_type() == dtype && lora_b->is_contiguous() && lora_b->size(0) == n &&
                        lora_b->size(1) == r,
                    "qgemv_lora: lora_b must be contiguous N×R in x's dtype");
    }
    if (bias.has_value())
        TORCH_CHECK(bias->scalar_type() == dtype && bias->numel() == n && bias->is_contiguous(),
                    "qgemv_lora: bias must be N values in x's dtype");
    auto y = torch::empty({x.size(0), n}, x.options());
    QgemvArgs args{x.data_ptr(),
                   qweight.data_ptr<uint8_t>(),
                   code.data_ptr<float>(),
                   absmax.data_ptr<float>(),
                   bias.has_value() ? bias->data_ptr() : nullptr,
                   hs.has_value() ? hs->data_ptr() : nullptr,
                   lora_b.has_value() ? lora_b->data_ptr() : nullptr,
                   y.data_ptr(),
                   static_cast<int>(x.size(0)),
                   static_cast<int>(n),
                   static_cast<int>(k),
                   static_cast<int>(r),
                   static_cast<int>(blocksize),
                   dtype == torch::kBFloat16};
    const cudaError_t err = launch_qgemv_lora(args, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "qgemv_lora: kernel launch failed: ", cudaGetErrorString(err));
    return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "peft_fast CUDA kernels";
    m.def("qgemv_lora", &qgemv_lora, "small-M 4-bit GEMV + LoRA term (M <= 16)", py::arg("x"), py::arg("qweight"),
          py::arg("code"), py::arg("absmax"), py::arg("blocksize"), py::arg("n"), py::arg("k"),
          py::arg("bias") = py::none(), py::arg("hs") = py::none(), py::arg("lora_b") = py::none());
    m.attr("max_rows") = kQgemvMaxRows;
}
