// pybind11 bindings of peft_fast._C: argument checks, then the raw-pointer launchers of csrc/*.cu.
//
// Bad arguments raise ValueError, a failed launch RuntimeError. Neither goes through TORCH_CHECK / c10::Error
// (which captures a C++ backtrace when made) nor through the exception translators torch registers globally:
// our own exception types are translated by a module-local translator, which pybind11 tries first. A bad call
// from Python must never take the interpreter down (tests/test_gpu_kernels.py runs each in a child process).
// An earlier build did (SIGSEGV composing the first message): it had been linked with a private libstdc++ whose
// iostreams were never initialised; setup.py now links with the system c++, and a GPU test checks the .so for it.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "lora_autograd.h"
#include "qgemv.h"
#include "triton_launch.h"

namespace {

struct ArgError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
struct LaunchError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

template <typename... Parts>
void require(bool ok, const Parts&... parts) {
    if (ok) return;
    std::ostringstream msg;
    msg << "qgemv_lora: ";
    (msg << ... << parts);
    throw ArgError(msg.str());
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// A tensor argument on x's GPU, contiguous, of the given dtype and element count.
void require_tensor(const torch::Tensor& t, const char* name, const torch::Tensor& x, c10::ScalarType dtype,
                    int64_t numel, const char* what) {
    require(t.defined(), name, " is undefined");
    require(t.is_cuda() && t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
            t.device());
    require(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ",
            c10::toString(t.scalar_type()));
    require(t.is_contiguous(), name, " must be contiguous");
    require(t.numel() == numel, name, " must hold ", numel, " values (", what, "), got ", t.numel());
}

torch::Tensor qgemv_lora(torch::Tensor x, torch::Tensor qweight, torch::Tensor code, torch::Tensor absmax,
                         int64_t blocksize, int64_t n, int64_t k, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> hs, c10::optional<torch::Tensor> lora_b) {
    require(x.defined() && x.is_cuda(), "x must be a CUDA tensor, got ", x.defined() ? x.device().str() : "none");
    require(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor, got ", x.dim(), "-D",
            x.is_contiguous() ? "" : " non-contiguous");
    const auto dtype = x.scalar_type();
    require(dtype == torch::kBFloat16 || dtype == torch::kHalf, "x must be bf16 or fp16, got ",
            c10::toString(dtype));
    require(x.size(0) >= 1 && x.size(0) <= kQgemvMaxRows, "x must have 1 to ", kQgemvMaxRows, " rows, got ",
            x.size(0));
    require(n >= 1 && n <= INT32_MAX, "n must be in [1, 2^31), got ", n);
    require(k >= 32 && k % 32 == 0 && k <= INT32_MAX, "k must be a positive multiple of 32, got ", k);
    require(x.size(1) == k, "x has ", x.size(1), " columns, k is ", k);
    require(aligned16(x), "x must be 16-byte aligned");
    require(blocksize >= 32 && blocksize % 32 == 0 && blocksize <= INT32_MAX,
            "blocksize must be a positive multiple of 32, got ", blocksize);
    require_tensor(qweight, "qweight", x, torch::kUInt8, n * k / 2, "the 4-bit packing of an n x k weight");
    require(aligned16(qweight), "qweight must be 16-byte aligned");
    require_tensor(code, "code", x, torch::kFloat, 16, "the 4-bit code book");
    require_tensor(absmax, "absmax", x, torch::kFloat, (n * k + blocksize - 1) / blocksize, "one per block");
    int64_t r = 0;
    if (hs.has_value()) {
        require(lora_b.has_value(), "hs needs lora_b");
        require(hs->defined() && hs->dim() == 2, "hs must be 2-D (rows x rank)");
        r = hs->size(1);
        require(r >= 1 && r <= 128, "the rank (hs's columns) must be 1 to 128, got ", r);
        require_tensor(*hs, "hs", x, dtype, x.size(0) * r, "rows x rank");
        require(hs->size(0) == x.size(0), "hs must have x's ", x.size(0), " rows, got ", hs->size(0));
        require_tensor(*lora_b, "lora_b", x, dtype, n * r, "n x rank");
        require(lora_b->dim() == 2 && lora_b->size(0) == n, "lora_b must be n x rank");
    } else {
        require(!lora_b.has_value(), "lora_b needs hs");
    }
    if (bias.has_value()) require_tensor(*bias, "bias", x, dtype, n, "one per output");

    const c10::cuda::CUDAGuard guard(x.device());
    auto y = torch::empty({x.size(0), n}, x.options());
    QgemvArgs args{};
    args.x = x.data_ptr();
    args.w = qweight.data_ptr<uint8_t>();
    args.code = code.data_ptr<float>();
    args.absmax = absmax.data_ptr<float>();
    args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
    args.hs = hs.has_value() ? hs->data_ptr() : nullptr;
    args.lora_b = lora_b.has_value() ? lora_b->data_ptr() : nullptr;
    args.y = y.data_ptr();
    args.m = static_cast<int>(x.size(0)), args.n = static_cast<int>(n), args.k = static_cast<int>(k);
    args.r = static_cast<int>(r), args.blocksize = static_cast<int>(blocksize);
    args.bf16 = dtype == torch::kBFloat16;
    const cudaError_t err = launch_qgemv_lora(args, c10::cuda::getCurrentCUDAStream());
    if (err != cudaSuccess) throw LaunchError(std::string("qgemv_lora: kernel launch failed: ") +
                                              cudaGetErrorString(err));
    return y;
}

// A registered Triton kernel launched from Python (tests, probes): tensors give their data pointer, ints and floats
// their value, each as the kernel's parameter kind in that position wants
void triton_launch_from_python(int64_t id, int64_t grid, const py::list& args) {
    const std::string kinds = triton_kernel_kinds(id);
    if (args.size() > kinds.size()) throw ArgError("triton_kernel_launch: too many arguments");
    std::vector<TritonArg> values(args.size());
    for (size_t i = 0; i < args.size(); ++i) {
        const py::handle a = args[i];
        if (kinds[i] == 'p') {
            if (!THPVariable_Check(a.ptr())) throw ArgError("triton_kernel_launch: argument " + std::to_string(i) +
                                                            " must be a CUDA tensor");
            const torch::Tensor t = THPVariable_Unpack(a.ptr());
            if (!t.is_cuda()) throw ArgError("triton_kernel_launch: argument " + std::to_string(i) + " is not on CUDA");
            values[i].pointer = reinterpret_cast<uint64_t>(t.data_ptr());
        } else if (kinds[i] == 'i') {
            if (!py::isinstance<py::int_>(a)) throw ArgError("triton_kernel_launch: argument " + std::to_string(i) +
                                                              " must be an int");
            const int64_t v = a.cast<int64_t>();
            if (v < INT32_MIN || v > INT32_MAX) throw ArgError("triton_kernel_launch: argument " + std::to_string(i) +
                                                               " exceeds int32");
            values[i].i32 = static_cast<int32_t>(v);
        } else {
            values[i].f32 = a.cast<float>();
        }
    }
    triton_kernel_launch(id, grid, values);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "peft_fast CUDA kernels";
    py::register_local_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ArgError& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        } catch (const LaunchError& e) {
            PyErr_SetString(PyExc_RuntimeError, e.what());
        }
    });
    m.def("qgemv_lora", &qgemv_lora, "small-M 4-bit GEMV + LoRA term (M <= 16)", py::arg("x"), py::arg("qweight"),
          py::arg("code"), py::arg("absmax"), py::arg("blocksize"), py::arg("n"), py::arg("k"),
          py::arg("bias") = py::none(), py::arg("hs") = py::none(), py::arg("lora_b") = py::none());
    m.attr("max_rows") = kQgemvMaxRows;
    m.def("lora_linear", &lora_linear, "LoRA linear fwd (+ bwd via autograd) as one C++ autograd node", py::arg("x"),
          py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"), py::arg("p"),
          py::arg("kn"), py::arg("dtype"), py::arg("kernels") = true);
    m.def("lora_add", &lora_add, "base_out + the LoRA term, fwd (+ bwd via autograd) as one C++ autograd node",
          py::arg("x"), py::arg("base_out"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"), py::arg("p"),
          py::arg("dtype"), py::arg("kernels") = true);
    m.def("qlora_linear", &qlora_linear, "LoRA linear over a 4-bit bitsandbytes weight as one C++ autograd node",
          py::arg("x"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("packed"), py::arg("code"),
          py::arg("absmax"), py::arg("absmax2"), py::arg("code2"), py::arg("offset"), py::arg("n"), py::arg("k"),
          py::arg("blocksize"), py::arg("blocksize2"), py::arg("scale"), py::arg("p"), py::arg("dtype"),
          py::arg("dequant_kernel") = true, py::arg("kernels") = true);
#ifdef PEFT_FAST_CUDA_KERNELS
    m.def("lora_kernels_forward", &lora_kernels_forward, "the fused LoRA forward kernel alone (tests)", py::arg("x"),
          py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"), py::arg("p"), py::arg("bias") = py::none(),
          py::arg("addend") = py::none(), py::arg("block_rows") = 0, py::arg("column_splits") = 0,
          py::arg("copies") = false, py::arg("shrink_only") = false);
    m.def("lora_kernels_set_preround_rows", &lora_kernels_set_preround_rows,
          "from how many rows a training forward rounds fp32 adapters before the rows kernel (probes and tests)",
          py::arg("rows"));
    m.def("lora_kernels_preround_rows", &lora_kernels_preround_rows);
    m.def("lora_kernels_set_two_pass_rows", &lora_kernels_set_two_pass_rows,
          "from how many rows the rows kernels run as two launches, and the second's rows a block (probes and tests)",
          py::arg("rows"), py::arg("pass2_rows") = 64);
    m.def("lora_kernels_two_pass_rows", &lora_kernels_two_pass_rows);
    m.def("lora_kernels_set_reduce_cols", &lora_kernels_set_reduce_cols,
          "the reduce kernel's column tile, 64 or 128, for every backward (probes and tests)", py::arg("cols"));
    m.def("lora_kernels_reduce_cols", &lora_kernels_reduce_cols);
    m.def("lora_kernels_set_reduce_compact", &lora_kernels_set_reduce_compact,
          "rank <= 16 backwards at 64 columns run the reduce kernel's compact layout, three blocks a Hopper "
          "multiprocessor (probes and tests)", py::arg("on"));
    m.def("lora_kernels_reduce_compact", &lora_kernels_reduce_compact);
    m.def("lora_kernels_set_rows_cluster", &lora_kernels_set_rows_cluster,
          "up to how many blocks (1: off) form a cluster that splits the rows kernel's phase 1 over K where its "
          "16-row blocks split their columns (decode; sm_90+) (probes and tests)", py::arg("blocks"));
    m.def("lora_kernels_rows_cluster", &lora_kernels_rows_cluster);
    m.def("lora_kernels_set_decode_kernel", &lora_kernels_set_decode_kernel,
          "inference forwards of at most 16 rows on nn.Linear weights run the one-launch decode kernel (sm_90+) "
          "instead of cuBLAS then the rows kernel (default on)", py::arg("on"));
    m.def("lora_kernels_decode_kernel", &lora_kernels_decode_kernel);
    m.def("lora_kernels_set_decode_kernel_4bit", &lora_kernels_set_decode_kernel_4bit,
          "the same for bitsandbytes 4-bit weights: the decode kernel instead of qgemv then the rows kernel (default "
          "off)", py::arg("on"));
    m.def("lora_kernels_decode_kernel_4bit", &lora_kernels_decode_kernel_4bit);
    m.def("lora_kernels_set_decode_spread_loads", &lora_kernels_set_decode_spread_loads,
          "the decode kernel reads nn.Linear weights, x and A with each quad's loads 64 contiguous bytes (probes and "
          "tests)", py::arg("on"));
    m.def("lora_kernels_decode_spread_loads", &lora_kernels_decode_spread_loads);
    m.def("lora_kernels_decode", &lora_kernels_decode, "the decode kernel alone (tests)", py::arg("x"),
          py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"));
    m.def("lora_kernels_register_tma", &lora_kernels_register_tma,
          "register a compiled Triton GEMM for the node's one-GEMM route (kernels/lora_gemm_tma.register_for_node); "
          "kernel_id -1 removes that key's kernel; major: the GPU generation its cubin runs on; produce: it makes h "
          "itself from adapters in fp32 (adapter_fp32) or the GEMM's dtype, by up to max_splits producers a row block "
          "with block_k-wide K steps (max_splits as compiled; the default is lora_gemm_tma.MAX_SPLITS, and a value "
          "above the kernel's only over-sizes its scratch)",
          py::arg("dx"), py::arg("bf16"), py::arg("kn"), py::arg("has_bias"), py::arg("has_keep"), py::arg("rank"),
          py::arg("kernel_id"), py::arg("programs"), py::arg("block_m"), py::arg("block_n"), py::arg("major") = 9,
          py::arg("produce") = false, py::arg("adapter_fp32") = false, py::arg("block_k") = 64,
          py::arg("max_splits") = 8);
    m.def("lora_kernels_set_tma_rows", &lora_kernels_set_tma_rows,
          "from how many rows a training forward takes the one-GEMM route (probes and tests)", py::arg("rows"));
    m.def("lora_kernels_tma_rows", &lora_kernels_tma_rows);
    m.def("lora_kernels_set_tma_produce_rows", &lora_kernels_set_tma_produce_rows,
          "from how many rows a training forward without dropout takes the route's producing kernels (where "
          "registered)", py::arg("rows"));
    m.def("lora_kernels_tma_produce_rows", &lora_kernels_tma_produce_rows);
    m.def("triton_kernel_register", &triton_kernel_register,
          "load a Triton cubin compiled for this GPU (kernels/lora_gemm_tma.py compile_for_cpp); returns its id",
          py::arg("cubin"), py::arg("name"), py::arg("shared"), py::arg("num_warps"), py::arg("scratch_bytes"),
          py::arg("scratch_align"), py::arg("kinds"), py::arg("user_params"));
    m.def("triton_kernel_launch", &triton_launch_from_python,
          "launch a registered Triton kernel on the current stream (args: tensors, ints, floats)", py::arg("id"),
          py::arg("grid"), py::arg("args"));
    m.def("lora_kernels_backward", &lora_kernels_backward, "the fused LoRA backward kernels alone (tests)",
          py::arg("dy"), py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("hs"), py::arg("mask"),
          py::arg("scale"), py::arg("p"), py::arg("need_x") = true, py::arg("need_a") = true, py::arg("need_b") = true,
          py::arg("block_rows") = 0, py::arg("column_splits") = 0, py::arg("fp32_grads") = false,
          py::arg("reduce_cols") = 0);
#endif
}
