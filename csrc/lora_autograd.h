// A LoRA linear's forward and backward as one C++ autograd node (no Python in either direction). CPU or CUDA.
#pragma once

#include <torch/extension.h>

// y = x Wᵀ (+ bias) + scale · drop(x) Aᵀ Bᵀ for 2-D x (M×K); weight is N×K (kn = false, nn.Linear) or K×N (kn = true,
// transformers' Conv1D); bias, if defined, is already in x's dtype. Same formulas as peft_fast/ops/cuda_lora.py.
torch::Tensor lora_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& lora_a, const torch::Tensor& lora_b, double scale, double p, bool kn);
