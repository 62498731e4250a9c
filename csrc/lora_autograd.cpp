// peft_fast/ops/cuda_lora.py's FusedLoraLinear in C++: the same GEMMs, issued from C++ in forward and run by the
// autograd engine without the GIL in backward. Why: on the H200 machine's host an eager op issued from Python costs
// ~16 µs and the Python autograd node's backward as much again, so a LoRA linear's fwd+bwd took ~640 µs of host time
// against ~160 µs for the bare layer (scripts/probe_lora_paths.py host, 2026-12-02); from C++ each op is a dispatcher
// call and a launch. Only argument shapes that peft_fast/ops/cuda_lora.supports() accepted reach this code.
#include "lora_autograd.h"

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor as(const Tensor& t, c10::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// drop(t) given the saved mask (identity without dropout): torch's own backward of native_dropout
Tensor dropped(const Tensor& t, const Tensor& mask, double p) {
    return mask.defined() ? at::native_dropout_backward(t, mask, 1.0 / (1.0 - p)) : t;
}

// scale · (a @ b) in dtype; on CUDA a 16-bit product goes straight into an fp32 result (one launch, no rounding)
Tensor mm_into(const Tensor& a, const Tensor& b, double scale, c10::ScalarType dtype) {
    Tensor out;
    if (dtype == torch::kFloat && a.is_cuda() && (a.scalar_type() == torch::kHalf || a.scalar_type() == torch::kBFloat16))
        out = at::mm(a, b, dtype);
    else
        out = as(at::mm(a, b), dtype);
    return scale != 1.0 ? out.mul_(scale) : out;
}

struct LoraLinearFn : public torch::autograd::Function<LoraLinearFn> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                          const Tensor& lora_a, const Tensor& lora_b, double scale, double p, bool kn) {
        const auto dt = x.scalar_type();
        const Tensor a = as(lora_a, dt), b = as(lora_b, dt), w = as(weight, dt);
        Tensor xd = x, mask;
        if (p > 0.0) std::tie(xd, mask) = at::native_dropout(x, p, true);
        const Tensor h = at::mm(xd, a.t());
        xd.reset();  // the dropped copy lives only for this GEMM
        const Tensor w_kn = kn ? w : w.t();
        Tensor y;
        if (bias.has_value())
            y = at::addmm(*bias, h, b.t(), 1.0, scale).addmm_(x, w_kn);
        else
            y = at::mm(h, b.t()).addmm_(x, w_kn, scale, 1.0);
        ctx->save_for_backward({x, w, a, b, h, mask});
        ctx->saved_data["scale"] = scale;
        ctx->saved_data["p"] = p;
        ctx->saved_data["kn"] = kn;
        ctx->saved_data["w_dtype"] = weight.scalar_type();
        ctx->saved_data["a_dtype"] = lora_a.scalar_type();
        ctx->saved_data["b_dtype"] = lora_b.scalar_type();
        ctx->saved_data["has_bias"] = bias.has_value();
        if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &w = saved[1], &a = saved[2], &b = saved[3], &h = saved[4], &mask = saved[5];
        const double s = ctx->saved_data["scale"].toDouble(), p = ctx->saved_data["p"].toDouble();
        const bool kn = ctx->saved_data["kn"].toBool();
        // needs_input_grad counts graph edges, which exist only for tensor arguments: no bias, no edge 2
        const size_t e = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
        const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
                   need_bias = e && ctx->needs_input_grad(2), need_a = ctx->needs_input_grad(2 + e),
                   need_b = ctx->needs_input_grad(3 + e);
        const Tensor dy = as(grads[0], x.scalar_type());
        Tensor grad_x, grad_w, grad_bias, grad_a, grad_b;
        const Tensor g = (need_a || need_x) ? at::mm(dy, b) : Tensor();
        if (need_b) grad_b = mm_into(dy.t(), h, s, ctx->saved_data["b_dtype"].toScalarType());
        if (need_a) grad_a = mm_into(g.t(), dropped(x, mask, p), s, ctx->saved_data["a_dtype"].toScalarType());
        if (need_x) grad_x = dropped(at::mm(g, a), mask, p).addmm_(dy, kn ? w.t() : w, s, 1.0);
        if (need_w)  // only when the user trains the base weight too
            grad_w = as(kn ? at::mm(x.t(), dy) : at::mm(dy.t(), x), ctx->saved_data["w_dtype"].toScalarType());
        if (need_bias) grad_bias = as(dy.sum(0), ctx->saved_data["bias_dtype"].toScalarType());
        return {grad_x, grad_w, grad_bias, grad_a, grad_b, Tensor(), Tensor(), Tensor()};
    }
};

}  // namespace

Tensor lora_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& lora_a,
                   const Tensor& lora_b, double scale, double p, bool kn) {
    return LoraLinearFn::apply(x, weight, bias, lora_a, lora_b, scale, p, kn);
}
