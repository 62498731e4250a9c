// peft_fast/ops/cuda_lora.py's FusedLoraLinear in C++: the same GEMMs, issued from C++ in forward and run by the
// autograd engine without the GIL in backward. Why: on the H200 machine's host an eager op issued from Python costs
// ~16 µs and the Python autograd node's backward as much again, so a LoRA linear's fwd+bwd took ~640 µs of host time
// against ~160 µs for the bare layer (scripts/probe_lora_paths.py host, 2026-12-02); from C++ each op is a dispatcher
// call and a launch. Only argument shapes that peft_fast/ops/cuda_lora.supports() accepted reach this code.
#include "lora_autograd.h"

#include <ATen/ScalarOps.h>

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

// x as M×K (a view where the layout allows, else a contiguous copy), in the compute dtype
Tensor rows(const Tensor& t, int64_t k, c10::ScalarType dtype) {
    Tensor t2 = as(t.reshape({-1, k}), dtype);
    return t2.stride(-1) == 1 ? t2 : t2.contiguous();
}

// t's sizes with the last one replaced by n
std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t n) {
    std::vector<int64_t> out(sizes.begin(), sizes.end());
    out.back() = n;
    return out;
}

// s·b in dtype, one kernel (the product is rounded once, into the output)
Tensor scaled_as(const Tensor& b, double s, c10::ScalarType dtype) {
    if (s == 1.0) return as(b, dtype);
    Tensor out = at::empty(b.sizes(), b.options().dtype(dtype));
    // a wrapped-number operand, as Python's torch.mul(b, s, out=…) passes it: mul.Scalar_out insists on b's dtype
    return at::mul_out(out, b, at::native::wrapped_scalar_tensor(s));
}

struct LoraLinearFn : public torch::autograd::Function<LoraLinearFn> {
    // The reshape to M×K and back happens here, not in Python: a view outside the node is an autograd node of its
    // own, in forward and backward (two ViewBackward nodes cost ~40 µs of host time per layer on a CPU).
    static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& weight,
                          const c10::optional<Tensor>& bias_in, const Tensor& lora_a, const Tensor& lora_b, double scale,
                          double p, bool kn, c10::ScalarType dt) {
        // everything below is cast to dt explicitly; autocast's wrapper around each op would only cost host time
        c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
        const int64_t k = x_in.size(-1);
        const Tensor x = rows(x_in, k, dt);
        const Tensor a = as(lora_a, dt), bs = scaled_as(lora_b, scale, dt), w = as(weight, dt);
        Tensor xd = x, mask;
        if (p > 0.0) std::tie(xd, mask) = at::native_dropout(x, p, true);
        const Tensor h = at::mm(xd, a.t());
        xd.reset();  // the dropped copy lives only for this GEMM
        const Tensor w_kn = kn ? w : w.t();
        const int64_t n = w_kn.size(1);
        // y is made in its final shape, so the node returns no view (an in-place op on a view made inside a
        // custom node is an error in autograd)
        Tensor y = at::empty(with_last(x_in.sizes(), n), x.options());
        Tensor y2 = y.view({-1, n});
        if (bias_in.has_value())
            at::addmm_out(y2, as(*bias_in, dt), h, bs.t());
        else
            at::mm_out(y2, h, bs.t());
        y2.addmm_(x, w_kn);
        ctx->save_for_backward({x, w, a, bs, h, mask});
        ctx->saved_data["scale"] = scale;
        ctx->saved_data["p"] = p;
        ctx->saved_data["kn"] = kn;
        ctx->saved_data["x_sizes"] = x_in.sizes();
        ctx->saved_data["w_dtype"] = weight.scalar_type();
        ctx->saved_data["a_dtype"] = lora_a.scalar_type();
        ctx->saved_data["b_dtype"] = lora_b.scalar_type();
        ctx->saved_data["has_bias"] = bias_in.has_value();
        if (bias_in.has_value()) ctx->saved_data["bias_dtype"] = bias_in->scalar_type();
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &w = saved[1], &a = saved[2], &bs = saved[3], &h = saved[4], &mask = saved[5];
        const double s = ctx->saved_data["scale"].toDouble(), p = ctx->saved_data["p"].toDouble();
        const bool kn = ctx->saved_data["kn"].toBool();
        // needs_input_grad counts graph edges, which exist only for tensor arguments: no bias, no edge 2
        const size_t e = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
        const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
                   need_bias = e && ctx->needs_input_grad(2), need_a = ctx->needs_input_grad(2 + e),
                   need_b = ctx->needs_input_grad(3 + e);
        const Tensor dy = rows(grads[0], bs.size(0), x.scalar_type());
        Tensor grad_x, grad_w, grad_bias, grad_a, grad_b;
        const Tensor gs = (need_a || need_x) ? at::mm(dy, bs) : Tensor();  // s · dy B
        if (need_b) grad_b = mm_into(dy.t(), h, s, ctx->saved_data["b_dtype"].toScalarType());
        if (need_a) grad_a = mm_into(gs.t(), dropped(x, mask, p), 1.0, ctx->saved_data["a_dtype"].toScalarType());
        if (need_x) {
            grad_x = dropped(at::mm(gs, a), mask, p).addmm_(dy, kn ? w.t() : w);
            grad_x = grad_x.view(ctx->saved_data["x_sizes"].toIntVector());  // the engine casts it to x's dtype
        }
        if (need_w)  // only when the user trains the base weight too
            grad_w = as(kn ? at::mm(x.t(), dy) : at::mm(dy.t(), x), ctx->saved_data["w_dtype"].toScalarType());
        if (need_bias) grad_bias = as(dy.sum(0), ctx->saved_data["bias_dtype"].toScalarType());
        return {grad_x, grad_w, grad_bias, grad_a, grad_b, Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// y = base_out + s · drop(x) Aᵀ Bᵀ: the LoRA term of a layer whose base output comes from its own autograd node (a
// bitsandbytes 4-bit / 8-bit linear). The same formulas as LoraLinearFn without W; dy reaches base_out unchanged.
struct LoraAddFn : public torch::autograd::Function<LoraAddFn> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& base_out, const Tensor& lora_a,
                          const Tensor& lora_b, double scale, double p, c10::ScalarType dt) {
        c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
        const Tensor x = rows(x_in, x_in.size(-1), dt);
        const Tensor a = as(lora_a, dt), bs = scaled_as(lora_b, scale, dt);
        Tensor xd = x, mask;
        if (p > 0.0) std::tie(xd, mask) = at::native_dropout(x, p, true);
        const Tensor h = at::mm(xd, a.t());
        xd.reset();
        const int64_t n = bs.size(0);
        // a new tensor (base_out may be a view made inside its own autograd Function: not modifiable in place)
        Tensor y;
        if (base_out.scalar_type() == dt) {
            y = at::empty(base_out.sizes(), x.options());
            Tensor y2 = y.view({-1, n});
            at::addmm_out(y2, rows(base_out, n, dt), h, bs.t());
        } else {  // e.g. an fp32 base output under bf16 autocast: the sum in the promoted dtype, as HF PEFT adds
            y = at::add(base_out, at::mm(h, bs.t()).view(base_out.sizes()));
        }
        ctx->save_for_backward({x, a, bs, h, mask});
        ctx->saved_data["scale"] = scale;
        ctx->saved_data["p"] = p;
        ctx->saved_data["x_sizes"] = x_in.sizes();
        ctx->saved_data["a_dtype"] = lora_a.scalar_type();
        ctx->saved_data["b_dtype"] = lora_b.scalar_type();
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &a = saved[1], &bs = saved[2], &h = saved[3], &mask = saved[4];
        const double s = ctx->saved_data["scale"].toDouble(), p = ctx->saved_data["p"].toDouble();
        const bool need_x = ctx->needs_input_grad(0), need_base = ctx->needs_input_grad(1),
                   need_a = ctx->needs_input_grad(2), need_b = ctx->needs_input_grad(3);
        const Tensor dy = rows(grads[0], bs.size(0), x.scalar_type());
        Tensor grad_x, grad_a, grad_b;
        const Tensor gs = (need_a || need_x) ? at::mm(dy, bs) : Tensor();  // s · dy B
        if (need_b) grad_b = mm_into(dy.t(), h, s, ctx->saved_data["b_dtype"].toScalarType());
        if (need_a) grad_a = mm_into(gs.t(), dropped(x, mask, p), 1.0, ctx->saved_data["a_dtype"].toScalarType());
        if (need_x) grad_x = dropped(at::mm(gs, a), mask, p).view(ctx->saved_data["x_sizes"].toIntVector());
        // (the engine casts each gradient to its input's dtype)
        return {grad_x, need_base ? grads[0] : Tensor(), grad_a, grad_b, Tensor(), Tensor(), Tensor()};
    }
};

}  // namespace

Tensor lora_add(const Tensor& x, const Tensor& base_out, const Tensor& lora_a, const Tensor& lora_b, double scale,
                double p, c10::ScalarType dtype) {
    return LoraAddFn::apply(x, base_out, lora_a, lora_b, scale, p, dtype);
}

Tensor lora_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& lora_a,
                   const Tensor& lora_b, double scale, double p, bool kn, c10::ScalarType dtype) {
    return LoraLinearFn::apply(x, weight, bias, lora_a, lora_b, scale, p, kn, dtype);
}
