// A LoRA linear's forward and backward as one C++ autograd node (no Python in either direction). CPU or CUDA.
#pragma once

#include <torch/extension.h>

// y = x Wᵀ (+ bias) + scale · drop(x) Aᵀ Bᵀ over the last dimension of x (…×K → …×N), computed in `dtype` (x, the
// weights and the bias are cast to it inside; gradients come back in each one's own dtype); weight is N×K (kn = false,
// nn.Linear) or K×N (kn = true, transformers' Conv1D). Same formulas as peft_fast/ops/cuda_lora.py. `kernels`: take
// the fused kernels of lora_kernels.h where they apply (CUDA builds), else the low-rank half is composed from ATen ops.
torch::Tensor lora_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& lora_a, const torch::Tensor& lora_b, double scale, double p, bool kn,
                          c10::ScalarType dtype, bool kernels);

// base_out + scale · drop(x) Aᵀ Bᵀ, for a base layer with an autograd node of its own (bitsandbytes 4-/8-bit):
// base_out is …×N with x's leading dimensions; the term is computed in `dtype` and added in the promoted dtype of
// the two (`dtype` when base_out has it); base_out's gradient is dy.
torch::Tensor lora_add(const torch::Tensor& x, const torch::Tensor& base_out, const torch::Tensor& lora_a,
                       const torch::Tensor& lora_b, double scale, double p, c10::ScalarType dtype, bool kernels);

// lora_linear over a bitsandbytes 4-bit weight (N×K: packed bytes, 16 code values, absmax per block; under double
// quantization absmax holds uint8 codes and absmax2 / code2 / offset dequantize them), which is dequantized into a
// buffer for each GEMM, in forward and again in backward (only for dx), and never kept. `dequant_kernel`: take the
// kernel of dequant4.h where it applies (CUDA builds), else ATen ops. Same numbers as bitsandbytes' dequantization.
// An inference call of at most kQgemvMaxRows rows skips the buffer where qgemv.h takes it (dequant_kernel on): the
// 4-bit GEMM reads the packed weight, then the LoRA term is added.
torch::Tensor qlora_linear(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias,
                           const torch::Tensor& lora_a, const torch::Tensor& lora_b, const torch::Tensor& packed,
                           const torch::Tensor& code, const torch::Tensor& absmax,
                           const c10::optional<torch::Tensor>& absmax2, const c10::optional<torch::Tensor>& code2,
                           const c10::optional<torch::Tensor>& offset, int64_t n, int64_t k, int64_t blocksize,
                           int64_t blocksize2, double scale, double p, c10::ScalarType dtype, bool dequant_kernel,
                           bool kernels);

#ifdef PEFT_FAST_CUDA_KERNELS
// The fused kernels' two halves on their own, for tests that check them against torch with the kernels' own dropout
// bits. Forward: {y = s·drop(x)Aᵀ Bᵀ (+ bias) (+ addend), hs = s·drop(x)Aᵀ, mask (M×K/8 keep bits; empty when
// p == 0)}. Backward: {drop(s·dy B A), dA, dB} (undefined where not asked for). x, dy, hs: 2-D, compute dtype.
// block_rows / column_splits force the rows kernel's shape (0: the launcher's rule), for tests and probes. copies: the
// forward also returns the adapters as backward reads them (fp32 ones: their rounded copies); shrink_only: y is not
// computed (returned undefined), hs alone.
std::vector<torch::Tensor> lora_kernels_forward(const torch::Tensor& x, const torch::Tensor& lora_a,
                                                const torch::Tensor& lora_b, double scale, double p,
                                                const c10::optional<torch::Tensor>& bias,
                                                const c10::optional<torch::Tensor>& addend, int64_t block_rows,
                                                int64_t column_splits, bool copies, bool shrink_only);
// From how many rows a training forward with fp32 adapters rounds them to the compute dtype in one small kernel
// before the rows kernel, which then reads half the bytes in every row block, instead of rounding them as it reads them
// (and writing the copies backward reads on the way). Default: never (lora_autograd.cpp says what was measured and
// what is missing); probes and tests set it.
void lora_kernels_set_preround_rows(int64_t rows);
int64_t lora_kernels_preround_rows();
// From how many rows the rows kernels run as two launches (phase 1 alone, then phase 2 alone in pass2_rows-row
// blocks, 0: the launcher's rule), forward and backward. Default: never (lora_autograd.cpp); probes and tests set it.
void lora_kernels_set_two_pass_rows(int64_t rows, int64_t pass2_rows);
std::tuple<int64_t, int64_t> lora_kernels_two_pass_rows();
// The reduce kernel's column tile (dA over K, dB over N), 64 or 128, for every backward. Default 64
// (lora_autograd.cpp); probes and tests set it.
void lora_kernels_set_reduce_cols(int64_t cols);
int64_t lora_kernels_reduce_cols();
// Whether rank ≤ 16 backwards at 64 columns run the reduce kernel in its compact layout (three blocks a Hopper
// multiprocessor). Default on (lora_autograd.cpp: measured); probes and tests set it.
void lora_kernels_set_reduce_compact(bool on);
bool lora_kernels_reduce_compact();
// Up to how many blocks (1: off, at most 8) form a cluster splitting the rows kernel's phase 1 over K where its 16-row
// blocks split their columns (decode), on sm_90+. Default 8 (lora_autograd.cpp: measured); probes and tests set it.
void lora_kernels_set_rows_cluster(int64_t blocks);
// Whether inference forwards of at most 16 rows (decode) of LoRA layers on nn.Linear weights run the one-launch decode
// kernel (lora_decode.cu, sm_90+) instead of cuBLAS then the rows kernel. Default on (lora_autograd.cpp: measured);
// PEFT_FAST_DECODE_KERNEL, probes and tests set it.
void lora_kernels_set_decode_kernel(bool on);
bool lora_kernels_decode_kernel();
// The same for 4-bit QLoRA layers (the decode kernel instead of qgemv then the rows kernel). Default off.
void lora_kernels_set_decode_kernel_4bit(bool on);
bool lora_kernels_decode_kernel_4bit();
// Whether the decode kernel reads nn.Linear weights in its spread layout (a quad's loads 64 contiguous bytes). Default
// off (not yet timed); probes and tests set it.
void lora_kernels_set_decode_spread_loads(bool on);
bool lora_kernels_decode_spread_loads();
// The decode kernel alone: y = x·Wᵀ (+ bias) + (s·x·Aᵀ)·Bᵀ for x of at most 16 rows (tests, probes)
torch::Tensor lora_kernels_decode(const torch::Tensor& x, const torch::Tensor& weight,
                                  const c10::optional<torch::Tensor>& bias, const torch::Tensor& lora_a,
                                  const torch::Tensor& lora_b, double scale);
int64_t lora_kernels_rows_cluster();
// The one-GEMM route (lora_autograd.cpp; Python turns it on: ops/one_gemm.py): a Triton GEMM registered through
// triton_launch.h for one direction (forward or dx), dtype, weight layout (kn), bias / keep-bit use and rank block,
// with its persistent grid size, tile shape and the GPU generation (compute capability major) its cubin runs on
// (produce: the kernel makes h itself from the adapters, read in fp32 or in the GEMM's dtype: adapter_fp32); and
// from how many rows a training forward takes the route.
void lora_kernels_register_tma(bool dx, bool bf16, bool kn, bool has_bias, bool has_keep, int64_t rank,
                               int64_t kernel_id, int64_t programs, int64_t block_m, int64_t block_n,
                               int64_t major = 9, bool produce = false, bool adapter_fp32 = false,
                               int64_t block_k = 64, int64_t max_splits = 8);
void lora_kernels_set_tma_rows(int64_t rows);
int64_t lora_kernels_tma_rows();
// From how many rows a training forward without dropout takes the route's producing kernels, where registered
void lora_kernels_set_tma_produce_rows(int64_t rows);
int64_t lora_kernels_tma_produce_rows();
std::vector<torch::Tensor> lora_kernels_backward(const torch::Tensor& dy, const torch::Tensor& x,
                                                 const torch::Tensor& lora_a, const torch::Tensor& lora_b,
                                                 const torch::Tensor& hs, const c10::optional<torch::Tensor>& mask,
                                                 double scale, double p, bool need_x, bool need_a, bool need_b,
                                                 int64_t block_rows, int64_t column_splits, bool fp32_grads,
                                                 int64_t reduce_cols);
#endif
