// peft_fast/ops/cuda_lora.py's FusedLoraLinear in C++: one autograd node per LoRA linear, issued from C++ in forward
// and run by the autograd engine without the GIL in backward. Why: on the lent machines' hosts an eager op issued from
// Python costs ~16 µs and the Python autograd node's backward as much again (scripts/probe_lora_paths.py host,
// 2026-12-02); from C++ each op is a dispatcher call and a launch. Only argument shapes that
// peft_fast/ops/cuda_lora.supports() accepted reach this code.
//
// Two routes, the same formulas (cuda_lora.py's docstring):
// - fused (CUDA builds, PEFT_FAST_CUDA_KERNELS; bf16/fp16 compute, rank ≤ 128, widths % 8 == 0): the low-rank half
//   runs in the kernels of lora_kernels.h — forward 1 kernel + 1 cuBLAS GEMM, backward 2 kernels + 1 cuBLAS GEMM,
//   adapters read in their own dtype (no casts), the dropout mask drawn once and kept as bits;
// - ATen (everything else, and the CPU build the tests use): cuBLAS/ATen GEMMs, torch's dropout kernel and mask.
#include "lora_autograd.h"

#include <ATen/ScalarOps.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <optional>

#ifdef PEFT_FAST_CUDA_KERNELS
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <climits>
#include <functional>
#include <mutex>

#include <unordered_map>

#include "dequant4.h"
#include "lora_kernels.h"
#include "qgemv.h"
#include "triton_launch.h"
#endif

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

// t as rows of its last dimension (a view where the layout allows, else a contiguous copy), in the compute dtype
Tensor rows(const Tensor& t, int64_t k, c10::ScalarType dtype) {
    Tensor t2 = as(t.reshape({-1, k}), dtype);
    return t2.stride(-1) == 1 ? t2 : t2.contiguous();
}

// The cast of the last x that linear_forward cast (this thread's): sibling projections (q, k, v; gate, up) read one
// input, which arrives in fp32 wherever the model's norms are fp32 (a prepare_model_for_kbit_training model, an fp32
// model under autocast), and each node would otherwise round its own copy: GPU time, and the memory of each node's
// saved copy. A hit needs the same tensor (held weakly: a freed tensor's address may come back), unchanged since
// (its version counter), the same dtype, width and stream. Holds one rounded tensor alive until the next miss.
struct SharedCast {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> source;
    int64_t version = 0;
    const void* data = nullptr;  // (with numel: metadata changed in place without a version bump, e.g. set_)
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    c10::Stream stream{c10::Stream::DEFAULT, c10::Device(c10::DeviceType::CPU)};
    Tensor rows;
};
thread_local SharedCast shared_cast;

// rows(x, k, dt), the cast shared with the call before where it was of the same x (SharedCast)
Tensor rows_shared(const Tensor& x, int64_t k, c10::ScalarType dt) {
    if (x.scalar_type() == dt || x.is_inference() || !x.has_storage()) return rows(x, k, dt);
    const c10::Stream stream = x.is_cpu() ? c10::Stream(c10::Stream::DEFAULT, x.device())
                                          : c10::impl::VirtualGuardImpl(x.device().type()).getStream(x.device());
    const int64_t version = x._version();
    SharedCast& c = shared_cast;
    const void* data = x.data_ptr();
    if (c.source.has_value() && c.version == version && c.data == data && c.dtype == dt && c.stream == stream &&
        c.rows.size(-1) == k && c.rows.numel() == x.numel() && c.source->lock().get() == x.unsafeGetTensorImpl())
        return c.rows;
    Tensor out = rows(x, k, dt);
    c.rows = Tensor();  // (the old one goes before the new one is kept)
    c.source.emplace(x.getIntrusivePtr());
    c.version = version, c.data = data, c.dtype = dt, c.stream = stream, c.rows = out;
    return out;
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

// ---- the low-rank half of both nodes on the ATen route

// h = drop(x) Aᵀ (M×r) and the dropout mask (undefined without dropout); the dropped copy of x lives only for the GEMM
std::pair<Tensor, Tensor> shrink(const Tensor& x, const Tensor& a, double p) {
    Tensor xd = x, mask;
    if (p > 0.0) std::tie(xd, mask) = at::native_dropout(x, p, true);
    return {at::mm(xd, a.t()), mask};
}

struct LowRankGrads {
    Tensor dx_low, grad_a, grad_b;  // drop(gs A), gsᵀ drop(x), s · dyᵀ h, each only where asked for
};

// the adapters' gradients and the low-rank part of dx, from dy (M×N) and what forward saved (bs = s·B)
LowRankGrads low_rank_grads(const Tensor& dy, const Tensor& x, const Tensor& a, const Tensor& bs, const Tensor& h,
                            const Tensor& mask, double s, double p, bool need_x, bool need_a, bool need_b,
                            c10::ScalarType a_dtype, c10::ScalarType b_dtype) {
    LowRankGrads g;
    const Tensor gs = (need_a || need_x) ? at::mm(dy, bs) : Tensor();  // s · dy B
    if (need_b) g.grad_b = mm_into(dy.t(), h, s, b_dtype);
    if (need_a) g.grad_a = mm_into(gs.t(), dropped(x, mask, p), 1.0, a_dtype);
    if (need_x) g.dx_low = dropped(at::mm(gs, a), mask, p);
    return g;
}

#ifdef PEFT_FAST_CUDA_KERNELS
// ---- the fused route (lora_kernels.h)

LoraDtype kernel_dtype(c10::ScalarType t) {
    return t == torch::kBFloat16 ? LoraDtype::kBFloat16 : t == torch::kHalf ? LoraDtype::kFloat16 : LoraDtype::kFloat32;
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// bytes rounded up to the allocator's 256-byte alignment, so that pieces of one allocation keep it
constexpr int64_t kAlign = 256;
int64_t padded(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// A contiguous tensor of `sizes` and `dtype` over buf's bytes from byte `at` (a multiple of the element size): one
// allocation cut into the several tensors a call keeps, each made directly rather than by a chain of view ops, which
// would each pass the dispatcher (host time every layer pays). Not an autograd view: scratch that needs no gradient.
Tensor carve(const Tensor& buf, int64_t at, at::IntArrayRef sizes, c10::ScalarType dtype) {
    Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(buf.storage()), buf.key_set(),
                                                        c10::scalarTypeToTypeMeta(dtype));
    t.unsafeGetTensorImpl()->set_storage_offset((buf.storage_offset() * buf.element_size() + at) /
                                                 static_cast<int64_t>(c10::elementSize(dtype)));
    t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
    return t;
}

// Whether the kernels take this call: x (M×K, contiguous, compute dtype dt) and `other` (base_out, if defined) on
// one GPU with the adapters, a supported dtype pair and rank, dropout below 1.
bool fused_takes(const Tensor& x, const Tensor& a, const Tensor& b, double p, c10::ScalarType dt,
                 const Tensor& other = Tensor()) {
    if (!x.is_cuda() || x.size(0) == 0 || !(p >= 0.0 && p < 1.0)) return false;
    if (dt != torch::kBFloat16 && dt != torch::kHalf) return false;
    const auto adt = a.scalar_type();
    if (b.scalar_type() != adt || (adt != dt && adt != torch::kFloat) || a.dim() != 2 || b.dim() != 2) return false;
    if (!lora_kernels_support(kernel_dtype(dt), kernel_dtype(adt), a.size(0), a.size(1), b.size(0))) return false;
    if (a.device() != x.device() || b.device() != x.device()) return false;
    if (!x.is_contiguous() || !a.is_contiguous() || !b.is_contiguous()) return false;
    if (!aligned16(x) || !aligned16(a) || !aligned16(b)) return false;
    if (other.defined() && (other.scalar_type() != dt || !other.is_contiguous() || !aligned16(other))) return false;
    return true;
}

// an attribute of the current device, asked once per device (`fallback` where the runtime does not say)
template <cudaDeviceAttr Attr>
int device_attribute(int fallback) {
    static int values[64] = {};
    int device = 0;
    cudaGetDevice(&device);
    if (device < 64 && values[device] > 0) return values[device];
    int value = 0;
    if (cudaDeviceGetAttribute(&value, Attr, device) != cudaSuccess || value <= 0) value = fallback;
    if (device < 64) values[device] = value;
    return value;
}

int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(132); }

int device_major() { return device_attribute<cudaDevAttrComputeCapabilityMajor>(0); }

void check(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "peft_fast LoRA kernel (", what, ") failed: ", cudaGetErrorString(err));
}

// torch's CUDA generator state for one call (reproducible under torch.manual_seed; safe under CUDA graph capture)
LoraPhilox philox_for(const Tensor& x) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(x.get_device()));
    at::PhiloxCudaState state;
    {
        std::lock_guard<std::mutex> lock(gen->mutex_);
        state = gen->philox_cuda_state(4);
    }
    LoraPhilox ph;
    if (state.captured_) {
        ph.captured = true;
        ph.seed_ptr = state.seed_.ptr;
        ph.offset_ptr = state.offset_.ptr;
        ph.offset_intragraph = state.offset_intragraph_;
    } else {
        ph.seed = state.seed_.val;
        ph.offset = state.offset_.val;
    }
    return ph;
}

// The rows kernel's block shape, when a caller forces one (0, 0: the launcher's rule; tests and probes only), and
// the reduce kernel's column tile (0: reduce_columns below)
struct RowsShape {
    int block_rows = 0, column_splits = 0, reduce_cols = 0;
};

// The reduce kernel's column tile, 64 or 128 (lora_kernels_set_reduce_cols changes it). 128 reads each row of x and dy
// in 256-byte runs instead of 128. Measured no better, so 64 stays (H100, reduce µs in the layer's fwd+bwd, 64 → 128
// columns: M8192 K=N=4096 r16 66.9 → 69.0 at p 0, 80.2 → 78.5 at p 0.1; M2048 K4096 N11008 34.7 → 38.6, 36.6 →
// 44.7; dB alone at r64 73.2 → 79.3; bench/RESULTS.md 2026-12-07 17:45 UTC).
std::atomic<int> reduce_columns{64};

// Whether rank ≤ 16 backwards at 64 columns run the reduce kernel's compact layout, three blocks a Hopper
// multiprocessor instead of two (lora_kernels.cuh ReduceConfig; lora_kernels_set_reduce_compact). On: never slower
// (H100, 2026-12-07 22:54 UTC, kprobe reduce, r16, backward without dx | dB alone µs, 64 columns → compact: M8192
// K=N=4096 p0 110.2 | 47.2 → 105.6 | 46.8; M8192 K4096 N14336 281.6 | 116.5 → 256.8 | 106.7; M2048 K4096 N11008
// 76.0 | 37.6 → 67.8 | 31.6, p0.1 76.0 | 37.1 → 73.0 | 32.1; the reduce kernel inside the layer's fwd+bwd 65.2 → 60.4
// and 30.1 → 22.9 µs at p0).
std::atomic<bool> reduce_compact{true};

// Blocks a cluster that splits the rows kernel's phase 1 over K where its 16-row blocks split their columns (decode:
// LoraRowsArgs::cluster_k; lora_kernels_set_rows_cluster changes it); 1: never. H100, 2026-12-07 (kprobe decode; bf16,
// fp32 adapters, forward | backward rows kernel do_bench µs, cluster 1 → 8): M1 K=N=4096 24.9 | 22.0 → 10.9 | 10.0,
// M16 25.1 | 22.1 → 10.7 | 9.6, M16 K11008 N4096 56.4 | 23.0 → 14.5 | 10.4, M16 r64 59.5 | 48.6 → 16.9 | 15.1, M256
// 36.4 | 46.5 → 20.3 | 19.8, M1000 54.9 | 63.3 → 36.0 | 32.8; decode layer M16 GPU 27.0 → 15.6 µs; the node's fwd+bwd
// GPU µs at M256 115.9 → 77.7, M1000 207.0 → 163.3 (p 0.1: 235.6 → 168.6). Cluster 4 lies between.
std::atomic<int> rows_cluster_k{kLoraRowsMaxCluster};

// Whether inference forwards of at most kLoraDecodeMaxRows rows (decode; nn.Linear weights, no dropout) run the
// one-launch decode kernel (lora_decode.cu, Hopper) instead of cuBLAS's GEMM then the rows kernel adding the term
// (lora_kernels_set_decode_kernel changes it). On, for the wall: a decode call's time is the host's, and the one launch
// skips cuBLAS's host work though its GPU time is longer. H100, M16 K=N=4096 r16 through the module, no_grad, a sync a
// call, wall µs (GPU µs), interleaved rounds (bench/RESULTS.md): 2026-12-07 21:52 UTC bare 52.6–53.6 (8.7–9.0), cuBLAS
// + rows kernel 93.2–106.6 (15.5–15.6), decode kernel 65.4–69.0 (27.8–27.9); 23:48 UTC on another host (a reworked
// kernel, since reverted: its GPU time was longer still) bare 68.8–72.8, cuBLAS + rows 132.9–138.0, decode kernel
// 88.5–90.6. The kernel alone on the GPU (do_bench, L2 flushed, µs, cuBLAS + rows → decode kernel): M16 K=N=4096
// 30.9 → 34.8, M1 K=N=2048 18.3 → 14.8; where many layers queue on the GPU (large K·N at M16) the GPU time may bind.
std::atomic<bool> decode_kernel{true};
// The same for bitsandbytes 4-bit weights (QLoRA decode: the decode kernel dequantizing in registers, instead of
// qgemv.cu's GEMM then the rows kernel; lora_kernels_set_decode_kernel_4bit). Off: tested, not yet timed.
std::atomic<bool> decode_kernel_4bit{false};
// Whether the decode kernel reads nn.Linear weights, x and A in its spread layout (LoraDecodeArgs::spread_loads:
// a quad's loads read 64 contiguous bytes, not 16 bytes at a 64-byte stride; lora_kernels_set_decode_spread_loads).
// Off: built and tested, not yet timed.
std::atomic<bool> decode_spread_loads{false};

// From how many rows a training forward rounds fp32 adapters first, in one small kernel (lora_kernels_set_preround_rows
// changes it; INT64_MAX: never). Every row block then reads them in bf16, half the bytes. The forward kernels gain
// (H200, 2026-12-07, kprobe preround, µs, in kernel → first): M2048 K4096 N4096 r16 40.0 → 33.4, K11008 N4096
// 69.4 → 48.9, K2048 N2048 22.9 → 22.5, M8192 K=N=4096 r16 83.9 → 79.1, r64 171 → 113, with dropout alike; the layer's
// fwd+bwd GPU time at 2048 rows −7 / −16 µs, at 8192 +13 (noise level). But it adds a launch (host time) to every
// training forward, and host-bound steps (the 1B model's forward) may lose what GPU-bound ones (7B QLoRA) gain: off
// until a bench run compares the model steps both ways.
std::atomic<int64_t> preround_min_rows{INT64_MAX};

// From how many rows the rows kernels run as two launches (LoraRowsArgs::two_pass: phase 1 alone, then phase 2 alone
// in pass2_block_rows-row blocks with split columns), forward and backward (lora_kernels_set_two_pass_rows changes
// both; INT64_MAX: never). Off: measured mixed (H100, 2026-12-07, kprobe twopass, fp32 adapters, µs fwd / bwd rows +
// reduce at p 0, one pass → two with 64-row second blocks): M8192 K=N=4096 r16 86/150 → 85/155, r64 170/217 →
// 150/223, N14336 179/320 → 168/327; M2048 K4096 N11008 67/88 → 51/91, N4096 41/55 → 36/57, K2048 N2048 24/34 → 23/37.
// The forward gains where phase 2 is wide or the rank high, the backward loses a little everywhere, and the layer's
// fwd+bwd through the node came out 992 → 1039 µs GPU at M8192 p0, 656 → 640 at M2048 N11008 (one more launch a
// direction on host-bound steps besides). A forward-only rule by width and rank is what is left to measure.
std::atomic<int64_t> two_pass_min_rows{INT64_MAX};
std::atomic<int> pass2_block_rows{64};

// the process-wide launch rules of the rows kernels (two passes from some rows; clusters)
void set_rows_rules(LoraRowsArgs& args, int64_t m) {
    args.two_pass = m >= two_pass_min_rows.load(std::memory_order_relaxed);
    args.pass2_rows = pass2_block_rows.load(std::memory_order_relaxed);
    args.cluster_k = rows_cluster_k.load(std::memory_order_relaxed);
}

// What a forward leaves for backward beside y: hs (M×r), with dropout the bit mask (M×K/8), and with adapters in
// another dtype than x (fp32) their copies rounded to x's dtype, which the backward rows kernel reads (else a, b
// are the adapters themselves)
struct FusedSaved {
    Tensor hs, mask, a, b;
};

// y2 (M×N, preallocated) = s·drop(x)Aᵀ Bᵀ (+ bias) (+ addend), and what backward needs (keep = false, an inference
// call: none of it is made, the kernel writes none of it)
void fused_forward(const Tensor& x, const Tensor& a, const Tensor& b, const Tensor& bias, const Tensor& addend,
                   double s, double p, Tensor& y2, FusedSaved& saved, bool keep = true, RowsShape shape = {},
                   bool copies_always = false) {
    const int64_t m = x.size(0), k = x.size(1), n = b.size(0), r = a.size(0);
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor& hs = saved.hs;
    Tensor& mask = saved.mask;
    saved.a = a, saved.b = b;
    // (B's copy is written by the expansion: none without y2)
    // (copies_always: hs alone is computed, y2 undefined, and the caller reads the adapters in x's dtype)
    const bool copies = keep && a.scalar_type() != x.scalar_type() && (y2.defined() || copies_always);
    if (keep) {  // one allocation for all of it: hs, the bits, A's copy (r×K), B's (N×r; 16-byte aligned: K % 8 == 0)
        const c10::ScalarType dt = x.scalar_type();
        const int64_t e = x.element_size(), hs_bytes = padded(m * r * e), mask_bytes = p > 0.0 ? padded(m * k / 8) : 0;
        const Tensor buf = at::empty({hs_bytes + mask_bytes + (copies ? r * (k + n) * e : 0)},
                                     x.options().dtype(torch::kUInt8));
        hs = carve(buf, 0, {m, r}, dt);
        if (p > 0.0) mask = carve(buf, hs_bytes, {m, k / 8}, torch::kUInt8);
        if (copies) {
            saved.a = carve(buf, hs_bytes + mask_bytes, {r, k}, dt);
            saved.b = carve(buf, hs_bytes + mask_bytes + r * k * e, {n, r}, dt);
        }
    }
    // (prerounded: the copies, which lie back to back in buf, are made here by one launch, and the kernel reads them
    // as adapters of x's dtype)
    const bool preround = copies && (!y2.defined() || m >= preround_min_rows.load(std::memory_order_relaxed));
    if (preround)
        check(launch_lora_round_adapters(a.data_ptr<float>(), r * k, b.data_ptr<float>(), n * r, saved.a.data_ptr(),
                                         kernel_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream()),
              "round adapters");
    LoraRowsArgs args{};
    args.in = x.data_ptr();
    args.w1 = preround ? saved.a.data_ptr() : a.data_ptr();
    args.w2 = preround ? saved.b.data_ptr() : b.data_ptr();
    args.bias = bias.defined() ? bias.data_ptr() : nullptr;
    args.addend = addend.defined() ? addend.data_ptr() : nullptr;
    args.out = y2.defined() ? y2.data_ptr() : nullptr;  // (undefined: hs alone, probes only)
    args.small = hs.defined() ? hs.data_ptr() : nullptr;
    args.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
    args.m = static_cast<int>(m);
    args.k1 = static_cast<int>(k);
    args.n2 = static_cast<int>(n);
    args.r = static_cast<int>(r);
    args.scale = static_cast<float>(s);
    args.p = static_cast<float>(p);
    if (p > 0.0) args.philox = philox_for(x);
    args.dtype = kernel_dtype(x.scalar_type());
    args.adapter_dtype = kernel_dtype(preround ? x.scalar_type() : a.scalar_type());
    args.backward = false;
    args.block_rows = shape.block_rows;
    args.column_splits = shape.column_splits;
    if (copies && !preround) args.w1_copy = saved.a.data_ptr(), args.w2_copy = saved.b.data_ptr();
    set_rows_rules(args, m);
    check(launch_lora_rows(args, sm_count(), c10::cuda::getCurrentCUDAStream()), "forward");
}

struct FusedGrads {
    Tensor dy;                      // the incoming gradient as the kernels read it: contiguous, 16-byte aligned M×N
    Tensor grad_x, grad_a, grad_b;  // grad_x (x's sizes) = drop(gs A), dA, dB in the adapters' dtype; where asked for
};

// A GEMM that computes dx and writes gs itself (the one-GEMM route's producing dx kernel), run by fused_backward in
// place of its rows pass, with scratch_bytes of scratch beside gs whose first zeroed_bytes it finds zeroed (cleared
// with the reduce's counters by one memset)
struct GsMaker {
    int64_t zeroed_bytes = 0, scratch_bytes = 0;
    std::function<void(const Tensor& dy, const Tensor& gs, void* flags)> run;
};

// the low-rank half of backward from dy (M×N rows) and what forward saved (x as M×K, the adapters or their copies,
// hs, the bits); dA and dB in grad_dtype (the adapters' own)
FusedGrads fused_backward(const Tensor& dy_rows, const Tensor& x, const Tensor& a, const Tensor& b, const Tensor& hs,
                          const Tensor& mask, double s, double p, bool need_x, bool need_a, bool need_b,
                          at::IntArrayRef x_sizes, c10::ScalarType grad_dtype, RowsShape shape = {},
                          Tensor* gs_out = nullptr, const GsMaker* gs_maker = nullptr) {
    const int64_t m = x.size(0), k = x.size(1), n = b.size(0), r = a.size(0);
    const c10::cuda::CUDAGuard guard(x.device());
    FusedGrads g;
    g.dy = dy_rows.contiguous();
    if (!aligned16(g.dy)) g.dy = g.dy.clone();
    const Tensor& dy = g.dy;
    Tensor dx2;
    if (need_x) {
        g.grad_x = at::empty(x_sizes, x.options());
        dx2 = g.grad_x.view({-1, k});
    }
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int sms = sm_count();
    const LoraDtype dt = kernel_dtype(x.scalar_type()), adt = kernel_dtype(a.scalar_type());
    const bool rows_pass = !gs_maker && (dx2.defined() || need_a || gs_out != nullptr), reduce_pass = need_a || need_b;
    const LoraReducePlan plan = reduce_pass ? lora_reduce_plan(static_cast<int>(m), static_cast<int>(k),
                                                               static_cast<int>(n), static_cast<int>(r), need_a,
                                                               need_b, sms,
                                                               shape.reduce_cols > 0
                                                                   ? shape.reduce_cols
                                                                   : reduce_columns.load(std::memory_order_relaxed),
                                                               reduce_compact.load(std::memory_order_relaxed))
                                            : LoraReducePlan{};
    // gs (M×r), the reduce kernel's fp32 workspace and its counters (and gs_maker's flags): scratch of this call, one
    // allocation
    const int64_t gs_bytes = rows_pass || gs_maker ? padded(m * r * x.element_size()) : 0;
    const int64_t ws_bytes = padded(plan.workspace_floats * 4), counter_bytes = padded(int64_t{plan.counters} * 4);
    const int64_t flag_bytes = gs_maker ? gs_maker->scratch_bytes : 0;
    Tensor scratch;
    if (gs_bytes + ws_bytes + counter_bytes + flag_bytes > 0)
        scratch = at::empty({gs_bytes + ws_bytes + counter_bytes + flag_bytes}, x.options().dtype(torch::kUInt8));
    char* base = scratch.defined() ? static_cast<char*>(scratch.data_ptr()) : nullptr;
    void* gs = gs_bytes > 0 ? base : nullptr;
    if (gs_out != nullptr) *gs_out = carve(scratch, 0, {m, r}, x.scalar_type());  // (keeps the scratch alive)
    float* workspace = plan.workspace_floats > 0 ? reinterpret_cast<float*>(base + gs_bytes) : nullptr;
    int* counters = plan.counters > 0 ? reinterpret_cast<int*>(base + gs_bytes + ws_bytes) : nullptr;
    if (gs_maker) {
        char* cleared = base + gs_bytes + ws_bytes;  // the counters, then the flags
        check(cudaMemsetAsync(cleared, 0, counter_bytes + gs_maker->zeroed_bytes, stream), "backward flags");
        gs_maker->run(dy, carve(scratch, 0, {m, r}, x.scalar_type()), cleared + counter_bytes);
    }
    if (rows_pass) {
        LoraRowsArgs args{};
        args.in = dy.data_ptr();
        args.w1 = b.data_ptr();
        args.w2 = a.data_ptr();
        args.out = dx2.defined() ? dx2.data_ptr() : nullptr;
        args.small = gs;
        args.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
        args.m = static_cast<int>(m);
        args.k1 = static_cast<int>(n);
        args.n2 = static_cast<int>(k);
        args.r = static_cast<int>(r);
        args.scale = static_cast<float>(s);
        args.p = mask.defined() ? static_cast<float>(p) : 0.f;
        args.dtype = dt;
        args.adapter_dtype = adt;
        args.backward = true;
        args.zero = counters;  // the reduce kernel's counters, cleared here instead of by a memset launch
        args.zero_count = counters != nullptr ? plan.counters : 0;
        args.block_rows = shape.block_rows;
        args.column_splits = shape.column_splits;
        set_rows_rules(args, m);
        check(launch_lora_rows(args, sms, stream), "backward rows");
    }
    if (!reduce_pass) return g;
    if (need_a) g.grad_a = at::empty({r, k}, a.options().dtype(grad_dtype));
    if (need_b) g.grad_b = at::empty({n, r}, b.options().dtype(grad_dtype));
    LoraReduceArgs args{};
    args.x = x.data_ptr();
    args.gs = gs;
    args.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
    args.grad_a = need_a ? g.grad_a.data_ptr() : nullptr;
    args.dy = dy.data_ptr();
    args.hs = hs.data_ptr();
    args.grad_b = need_b ? g.grad_b.data_ptr() : nullptr;
    args.workspace = workspace;
    args.counters = counters;
    args.counters_zeroed = rows_pass || gs_maker;
    args.m = static_cast<int>(m);
    args.k = static_cast<int>(k);
    args.n = static_cast<int>(n);
    args.r = static_cast<int>(r);
    args.p = mask.defined() ? static_cast<float>(p) : 0.f;
    args.dtype = dt;
    args.grad_dtype = kernel_dtype(grad_dtype);
    check(launch_lora_reduce(args, plan, stream), "backward reduce");
    return g;
}

// ---- the one-GEMM route (peft_fast/ops/dispatch.py ONE_GEMM_MIN_ROWS: on by default from 1024 rows, Hopper, r ≤ 16)
// From tma_min_rows rows (lora_kernels_set_tma_rows; INT64_MAX, until Python sets it: never) a training forward
// computes y = x Wᵀ + hs Bᵀ (+ bias) in one Triton GEMM (kernels/lora_gemm_tma.py, launched through
// csrc/triton_launch.h) after the rows kernel's phase 1, and its backward dx = dy W + drop(gs A) in another, instead
// of the rows kernel writing the M×N term and cuBLAS adding its GEMM onto it (beta = 1): the output is written once,
// not written, read and written again. Python compiles the kernels for this GPU and registers them here by key
// (peft_fast.kernels.lora_gemm_tma.register_for_node, called by ops/one_gemm.py); a direction whose kernel is missing
// takes the default route.
struct TmaKernel {
    int64_t id = -1, programs = 0, bm = 0, bn = 0, major = 9;  // (major: the GPU generation its cubin is for)
    int64_t bk = 64, br = 16, max_splits = 1;  // (K step, rank block, most producers a row block: producing kernels)
};
std::mutex tma_mutex;
std::unordered_map<int64_t, TmaKernel> tma_kernels;
std::atomic<int64_t> tma_min_rows{INT64_MAX};
// … and from how many rows, without dropout, the producing kernels (lora_kernels_set_tma_produce_rows; INT64_MAX until
// Python sets it: never)
std::atomic<int64_t> tma_produce_min_rows{INT64_MAX};

// (produce: the kernel makes h itself, from the adapters read in fp32 (adapter_fp32) or in the GEMM's dtype)
int64_t tma_key(bool dx, c10::ScalarType dt, bool kn, bool bias, bool keep, int64_t r, bool produce = false,
                bool adapter_fp32 = false) {
    return static_cast<int64_t>(dx) | static_cast<int64_t>(dt == torch::kBFloat16) << 1 |
           static_cast<int64_t>(kn) << 2 | static_cast<int64_t>(bias) << 3 | static_cast<int64_t>(keep) << 4 |
           static_cast<int64_t>(produce) << 5 | static_cast<int64_t>(adapter_fp32) << 6 |
           static_cast<int64_t>(lora_rank_block(r)) << 8;
}

// The kernel registered for `key` that runs on the current GPU (cubins run on the generation they were built for:
// another GPU of the same process takes the default route)
bool tma_find(int64_t key, TmaKernel& k) {
    {
        const std::lock_guard<std::mutex> lock(tma_mutex);
        const auto it = tma_kernels.find(key);
        if (it == tma_kernels.end()) return false;
        k = it->second;
    }
    return k.major == device_major();
}

TritonArg ptr_arg(const Tensor& t) {
    TritonArg a;
    a.pointer = reinterpret_cast<uint64_t>(t.data_ptr());
    return a;
}

TritonArg i32_arg(int64_t v) {
    TritonArg a;
    a.pointer = 0;
    a.i32 = static_cast<int32_t>(v);
    return a;
}

TritonArg f32_arg(double v) {
    TritonArg a;
    a.pointer = 0;
    a.f32 = static_cast<float>(v);
    return a;
}

// What a producing kernel (the key's `produce`) takes beside lora_gemm's operands: the adapter that makes h
// (h = s · x·srcᵀ, written into the h argument) and its scratch (tma_scratch below: counters zero at launch)
struct TmaProduce {
    Tensor src;
    void* flags = nullptr;
    double scale = 1.0;
};

// What a producing kernel of k's tiles needs behind its flags pointer for an m×n output over kk: one int32 counter a
// BM-row block (zeroed before the launch; 16-byte multiple), then with several producers a row block their fp32
// partial sums of h (kernels/lora_gemm_tma.py producer_splits and producer_scratch_words: the same arithmetic)
struct TmaScratch {
    int64_t zeroed = 0, total = 0;
};

TmaScratch tma_scratch(const TmaKernel& k, int64_t m, int64_t n, int64_t kk) {
    const int64_t num_m = (m + k.bm - 1) / k.bm, num_n = (n + k.bn - 1) / k.bn, k_tiles = (kk + k.bk - 1) / k.bk;
    const int64_t splits =
        std::max<int64_t>(std::min({k.programs / num_m, k.max_splits, num_n, k_tiles}), 1);
    TmaScratch s;
    s.zeroed = (num_m + 3) / 4 * 16;
    s.total = padded(s.zeroed + (splits > 1 ? num_m * splits * k.bm * k.br * 4 : 0));
    return s;
}

// out (M×N) = x·(W as `kn` stores it, read as the key's direction needs) + h·low (⊙ keep bits / (1−p)) (+ bias)
void launch_tma(const TmaKernel& k, const Tensor& x, const Tensor& w, const Tensor& h, const Tensor& low,
                const Tensor& bias, const Tensor& keep, double p, Tensor& out, const TmaProduce& produce = {}) {
    const int64_t m = x.size(0), kk = x.size(1), n = out.size(1);
    const int64_t tiles = ((m + k.bm - 1) / k.bm) * ((n + k.bn - 1) / k.bn);
    TritonArg flags;
    flags.pointer = reinterpret_cast<uint64_t>(produce.flags != nullptr ? produce.flags : out.data_ptr());
    const std::vector<TritonArg> args{ptr_arg(x), ptr_arg(w), ptr_arg(h), ptr_arg(low), ptr_arg(out),
                                      ptr_arg(bias.defined() ? bias : out), ptr_arg(keep.defined() ? keep : out),
                                      ptr_arg(produce.src.defined() ? produce.src : out), flags,
                                      i32_arg(m), i32_arg(n), i32_arg(kk), i32_arg(h.size(1)), i32_arg(n / 8),
                                      f32_arg(keep.defined() ? 1.0 / (1.0 - p) : 1.0), f32_arg(produce.scale)};
    triton_kernel_launch(k.id, std::min(k.programs, tiles), args);
}

// The producing kernel for adapter A (fused_takes passed: both adapters in fp32 or both in dt), where one is registered
bool tma_find_producing(bool dx, c10::ScalarType dt, bool kn, bool bias, const Tensor& a, TmaKernel& k) {
    return tma_find(tma_key(dx, dt, kn, bias, false, a.size(0), true, a.scalar_type() == torch::kFloat), k);
}

// Whether a training forward of these arguments (enough rows: the caller asks tma_min_rows first) takes the one-GEMM
// route: the fused kernels' layout, every operand 16-byte aligned for TMA, and a forward kernel registered: without
// dropout the producing one where registered (`produce`: it makes hs itself, no rows kernel before it), else the one
// that reads hs (the backward takes the dx kernel where one is registered for its dropout flag and the forward's
// kind, else the default route's dx)
bool tma_takes(const Tensor& x, const Tensor& w, const Tensor& a, const Tensor& b, const Tensor& bias, double p,
               c10::ScalarType dt, bool kn, TmaKernel& fwd, bool& produce) {
    if (!fused_takes(x, a, b, p, dt, Tensor()) || !w.is_contiguous() || !aligned16(w) || !x.is_contiguous() ||
        !aligned16(x) || (bias.defined() && (!bias.is_contiguous() || !aligned16(bias))))
        return false;
    const int64_t r = a.size(0);
    if (r % 8 != 0) return false;  // (the ranks the route was measured and tested at)
    produce = p == 0.0 && x.size(0) >= tma_produce_min_rows.load(std::memory_order_relaxed) &&
              tma_find_producing(false, dt, kn, bias.defined(), a, fwd);
    return produce || tma_find(tma_key(false, dt, kn, bias.defined(), false, r), fwd);
}
#endif  // PEFT_FAST_CUDA_KERNELS

// A node's non-tensor state. It travels as three saved_data entries (the two doubles and one packed int64: flags
// and dtypes) plus x's sizes, because each entry is a hash-map insert and an IValue: host time every layer pays.
struct NodeState {
    double scale = 1.0, p = 0.0;
    bool fused = false, kn = false, has_bias = false, tma = false, produced = false;
    c10::ScalarType a_dtype = torch::kFloat, b_dtype = torch::kFloat, w_dtype = torch::kFloat,
                    bias_dtype = torch::kFloat;

    void save(AutogradContext* ctx, const Tensor& x_in) const {
        ctx->saved_data["scale"] = scale;
        ctx->saved_data["p"] = p;
        ctx->saved_data["state"] = static_cast<int64_t>(fused) | static_cast<int64_t>(kn) << 1 |
                                   static_cast<int64_t>(has_bias) << 2 | static_cast<int64_t>(tma) << 3 |
                                   static_cast<int64_t>(produced) << 4 | code(a_dtype) << 8 | code(b_dtype) << 16 |
                                   code(w_dtype) << 24 | code(bias_dtype) << 32;
        ctx->saved_data["x_sizes"] = x_in.sizes();
    }

    static NodeState load(AutogradContext* ctx) {
        NodeState st;
        st.scale = ctx->saved_data["scale"].toDouble();
        st.p = ctx->saved_data["p"].toDouble();
        const int64_t bits = ctx->saved_data["state"].toInt();
        st.fused = bits & 1, st.kn = bits >> 1 & 1, st.has_bias = bits >> 2 & 1, st.tma = bits >> 3 & 1,
        st.produced = bits >> 4 & 1;
        st.a_dtype = dtype(bits >> 8), st.b_dtype = dtype(bits >> 16), st.w_dtype = dtype(bits >> 24),
        st.bias_dtype = dtype(bits >> 32);
        return st;
    }

  private:
    static int64_t code(c10::ScalarType t) { return static_cast<int64_t>(t) & 0xff; }
    static c10::ScalarType dtype(int64_t bits) { return static_cast<c10::ScalarType>(bits & 0xff); }
};

// What a forward computes: y and, for a call that keeps the graph, what backward needs (empty for an inference call)
struct Forward {
    Tensor y;
    std::vector<Tensor> saved;
    bool fused = false, tma = false, produced = false;  // (produced: the one-GEMM route's GEMM made hs)
};

// The low-rank half of a forward written into y2 (M×N rows, preallocated): y2 = s·drop(x)Aᵀ Bᵀ + bias, or with `add`
// y2 += s·drop(x)Aᵀ Bᵀ (y2 already holds the base output, bias included), on the fused kernels where they take the
// call (x is made contiguous for them), else ATen ops. What backward needs from it: the adapters as that route reads
// them and h (the fused route's a, b are the adapters themselves and h = s·drop(x)Aᵀ; the ATen route's A and s·B in
// the compute dtype and h unscaled), with the mask. keep = false: none of it is made.
struct LowRank {
    Tensor a, b, h, mask;
    bool fused = false;
};

LowRank low_rank_into(Tensor& x, const Tensor& lora_a, const Tensor& lora_b, const Tensor& bias, double scale, double p,
                      c10::ScalarType dt, bool kernels, bool keep, Tensor& y2, bool add) {
    LowRank l;
#ifdef PEFT_FAST_CUDA_KERNELS
    if (kernels && x.is_cuda()) x = x.contiguous();
    if (kernels && fused_takes(x, lora_a, lora_b, p, dt, add ? y2 : Tensor()) &&
        (!bias.defined() || (bias.is_contiguous() && aligned16(bias)))) {
        // (with `add`, y2 is the kernel's addend and its output: each element is read once, then written, by one thread)
        FusedSaved f;
        fused_forward(x, lora_a, lora_b, add ? Tensor() : bias, add ? y2 : Tensor(), scale, p, y2, f, keep);
        l.a = f.a, l.b = f.b, l.h = f.hs, l.mask = f.mask, l.fused = true;
        return l;
    }
#endif
    l.a = as(lora_a, dt), l.b = scaled_as(lora_b, scale, dt);
    std::tie(l.h, l.mask) = shrink(x, l.a, p);
    if (add) y2.addmm_(l.h, l.b.t());
    else if (bias.defined()) at::addmm_out(y2, bias, l.h, l.b.t());
    else at::mm_out(y2, l.h, l.b.t());
    return l;
}

#ifdef PEFT_FAST_CUDA_KERNELS
// Whether the decode kernel takes this call: x (M×K rows, dt), w (the layer's weight in dt, N×K unless kn), bias (in
// dt, or undefined), the adapters
bool decode_takes(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& a, const Tensor& b, double p,
                  c10::ScalarType dt, bool kn) {
    if (kn || p != 0.0 || !fused_takes(x, a, b, p, dt)) return false;
    if (!lora_decode_supported(x.size(0), x.size(1), w.size(0), a.size(0))) return false;
    if (w.scalar_type() != dt || w.dim() != 2 || w.size(1) != x.size(1) || w.size(0) != b.size(0) ||
        !w.is_contiguous() || !aligned16(w) || w.device() != x.device())
        return false;
    return !bias.defined() || (bias.scalar_type() == dt && bias.is_contiguous() && bias.device() == x.device());
}

// The decode kernel's arguments for y2 (M×N) = x·Wᵀ (+ bias) + (s·x·Aᵀ)·Bᵀ, but for the weight
LoraDecodeArgs decode_args(const Tensor& x, const Tensor& bias, const Tensor& a, const Tensor& b, double s,
                           Tensor& y2) {
    LoraDecodeArgs args{};
    args.x = x.data_ptr(), args.bias = bias.defined() ? bias.data_ptr() : nullptr;
    args.a = a.data_ptr(), args.b = b.data_ptr(), args.y = y2.data_ptr();
    args.m = static_cast<int>(x.size(0)), args.n = static_cast<int>(y2.size(1)), args.k = static_cast<int>(x.size(1));
    args.r = static_cast<int>(a.size(0));
    args.scale = static_cast<float>(s);
    args.dtype = kernel_dtype(x.scalar_type()), args.adapter_dtype = kernel_dtype(a.scalar_type());
    args.spread_loads = decode_spread_loads.load(std::memory_order_relaxed);
    return args;
}

// y2 (M×N) = x·Wᵀ (+ bias) + (s·x·Aᵀ)·Bᵀ in one launch (decode_takes said yes)
void decode_forward(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& a, const Tensor& b, double s,
                    Tensor& y2) {
    const c10::cuda::CUDAGuard guard(x.device());
    LoraDecodeArgs args = decode_args(x, bias, a, b, s, y2);
    args.w = w.data_ptr();
    check(launch_lora_decode(args, c10::cuda::getCurrentCUDAStream()), "decode");
}
#endif

// Up to this many rows (decode) a forward issues the base GEMM first and adds the low-rank term onto its output, as
// the QLoRA decode route does after its 4-bit GEMM (for the bf16 LoRA layer the order measured the same: H100 decode
// M16 0.060 ms against 0.059 term-first). Above it the term goes first and cuBLAS adds the GEMM onto it (beta = 1):
// reading y inside a compute-bound GEMM costs less than in the memory-bound rows kernel.
constexpr int64_t kGemmFirstMaxRows = 64;

// LoraLinearFn's forward arithmetic. keep = false (no gradient will be asked for: grad mode off or no input needing
// one): nothing is saved, the fused kernel writes neither hs nor the mask, and no autograd node is made at all.
Forward linear_forward(const Tensor& x_in, const Tensor& weight, const c10::optional<Tensor>& bias_in,
                       const Tensor& lora_a, const Tensor& lora_b, double scale, double p, bool kn, c10::ScalarType dt,
                       bool kernels, bool keep) {
    // everything below is cast to dt explicitly; autocast's wrapper around each op would only cost host time
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t k = x_in.size(-1);
    Tensor x = rows_shared(x_in, k, dt);
    const Tensor w = as(weight, dt);
    const Tensor w_kn = kn ? w : w.t();
    const int64_t n = w_kn.size(1);
    const Tensor bias = bias_in.has_value() ? as(*bias_in, dt) : Tensor();
    // y is made in its final shape, so the node returns no view (an in-place op on a view made inside a
    // custom node is an error in autograd)
    Forward out;
    out.y = at::empty(with_last(x_in.sizes(), n), x.options());
    Tensor y2 = out.y.view({-1, n});
    const bool gemm_first = x.size(0) <= kGemmFirstMaxRows;
#ifdef PEFT_FAST_CUDA_KERNELS
    if (!keep && kernels && x.size(0) <= kLoraDecodeMaxRows && x.is_cuda() &&
        decode_kernel.load(std::memory_order_relaxed)) {
        x = x.contiguous();
        if (decode_takes(x, w, bias, lora_a, lora_b, p, dt, kn)) {  // decode: one launch
            decode_forward(x, w, bias, lora_a, lora_b, scale, y2);
            out.fused = true;
            return out;
        }
    }
    TmaKernel tma;
    bool produce = false;
    // (the row count first: off, as by default, a training forward pays one atomic load here and nothing else)
    if (keep && kernels && !gemm_first && x.is_cuda() && x.size(0) >= tma_min_rows.load(std::memory_order_relaxed)) {
        x = x.contiguous();
        if (tma_takes(x, w, lora_a, lora_b, bias, p, dt, kn, tma, produce)) {  // the one-GEMM route (above)
            out.fused = out.tma = true;
            if (produce) {  // hs = s·x·Aᵀ made by the GEMM, which reads the adapters as they are: nothing before it
                const c10::cuda::CUDAGuard guard(x.device());
                const int64_t m = x.size(0), r = lora_a.size(0), e = x.element_size(), hs_bytes = padded(m * r * e);
                // fp32 adapters rounded to dt first, by one small kernel, where lora_kernels_set_preround_rows asks for
                // it and the producing kernels for dt's adapters are registered: the GEMMs then read them as they
                // read x (the backward's dx GEMM too, from the same copies). No gain measured (H100, fwd+bwd GPU µs,
                // in kernel → first: M8192 K=N=4096 899 → 942, M4096 473 → 476, M2048 K4096 N11008 609 → 613)
                TmaKernel rounded;
                const bool round = lora_a.scalar_type() != dt &&
                                   m >= preround_min_rows.load(std::memory_order_relaxed) &&
                                   tma_find(tma_key(false, dt, kn, bias.defined(), false, r, true, false), rounded);
                const int64_t copy_bytes = round ? r * (k + n) * e : 0;  // (16-byte multiples: k, n % 8 == 0)
                if (round) tma = rounded;
                const TmaScratch scratch = tma_scratch(tma, m, n, k);
                const Tensor buf =
                    at::empty({hs_bytes + copy_bytes + scratch.total}, x.options().dtype(torch::kUInt8));
                const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
                char* flags = static_cast<char*>(buf.data_ptr()) + hs_bytes + copy_bytes;
                check(cudaMemsetAsync(flags, 0, scratch.zeroed, stream), "route flags");
                const Tensor hs = carve(buf, 0, {m, r}, dt);
                Tensor a = lora_a, b = lora_b;
                if (round) {
                    a = carve(buf, hs_bytes, {r, k}, dt), b = carve(buf, hs_bytes + r * k * e, {n, r}, dt);
                    check(launch_lora_round_adapters(lora_a.data_ptr<float>(), r * k, lora_b.data_ptr<float>(), n * r,
                                                     a.data_ptr(), kernel_dtype(dt), stream),
                          "round adapters");
                }
                launch_tma(tma, x, w, hs, b, bias, Tensor(), p, y2, TmaProduce{a, flags, scale});
                out.saved = {x, w, a, b, hs, Tensor()};
                out.produced = true;
                return out;
            }
            FusedSaved f;
            Tensor none;
            fused_forward(x, lora_a, lora_b, Tensor(), Tensor(), scale, p, none, f, true, {}, true);
            launch_tma(tma, x, w, f.hs, f.b, bias, Tensor(), p, y2);
            out.saved = {x, w, f.a, f.b, f.hs, f.mask};
            return out;
        }
    }
#endif
    if (gemm_first && bias.defined()) at::addmm_out(y2, bias, x, w_kn);
    else if (gemm_first) at::mm_out(y2, x, w_kn);
    const LowRank l = low_rank_into(x, lora_a, lora_b, gemm_first ? Tensor() : bias, scale, p, dt, kernels, keep, y2,
                                    gemm_first);
    if (!gemm_first) y2.addmm_(x, w_kn);
    if (keep) out.saved = {x, w, l.a, l.b, l.h, l.mask};
    out.fused = l.fused;
    return out;
}

struct Needs {
    bool x, w, bias, a, b;  // which inputs want a gradient
};

struct LinearGrads {
    Tensor x, w, bias, a, b;
};

// LoraLinearFn's backward arithmetic, from what linear_forward saved ({x, w, a, b, h, mask}; the ATen route's a and
// b are A and s·B in the compute dtype and h is unscaled, the fused route's the adapters themselves and
// h = s·drop(x)Aᵀ) and the base weight w in the compute dtype (saved[1], or dequantized again by the QLoRA node;
// read only for dx)
LinearGrads linear_backward(const NodeState& st, const variable_list& saved, const Tensor& w, const Tensor& dy_in,
                            const Needs& need, at::IntArrayRef x_sizes) {
    const Tensor &x = saved[0], &a = saved[2], &b = saved[3], &h = saved[4], &mask = saved[5];
    const double s = st.scale, p = st.p;
    const bool kn = st.kn;
    Tensor dy = rows(dy_in, b.size(0), x.scalar_type());  // (B is N×r on both routes)
    LinearGrads g;
#ifdef PEFT_FAST_CUDA_KERNELS
    TmaKernel tma;  // (its kernels registered at forward; were they dropped since, the default route below)
    const bool produce_dx = st.produced && need.x && tma_find_producing(true, x.scalar_type(), kn, false, a, tma);
    const bool tma_dx = !st.produced && st.fused && st.tma && need.x &&
                        tma_find(tma_key(true, x.scalar_type(), kn, false, mask.defined(), a.size(0)), tma);
    if (produce_dx) {  // dx = dy W + gs A in one GEMM that makes gs = s·dy B itself, then the reduce kernel
        g.x = at::empty(x_sizes, x.options());
        Tensor dx2 = g.x.view({-1, x.size(1)});
        const Tensor wc = w.contiguous();
        const auto run = [&](const Tensor& dy_in, const Tensor& gs, void* flags) {
            launch_tma(tma, dy_in, wc, gs, a, Tensor(), Tensor(), p, dx2, TmaProduce{b, flags, s});
        };
        const TmaScratch scratch = tma_scratch(tma, x.size(0), x.size(1), dy.size(1));
        const GsMaker maker{scratch.zeroed, scratch.total, run};
        FusedGrads f = fused_backward(dy, x, a, b, h, mask, s, p, false, need.a, need.b, x_sizes, st.a_dtype, {},
                                      nullptr, &maker);
        dy = f.dy, g.a = f.grad_a, g.b = f.grad_b;
    } else if (tma_dx) {  // dx = dy W + drop(gs A) in one GEMM, gs from the rows kernel's phase 1
        Tensor gs;
        FusedGrads f = fused_backward(dy, x, a, b, h, mask, s, p, false, need.a, need.b, x_sizes, st.a_dtype, {},
                                      &gs);
        dy = f.dy, g.a = f.grad_a, g.b = f.grad_b;
        g.x = at::empty(x_sizes, x.options());
        Tensor dx2 = g.x.view({-1, x.size(1)});
        launch_tma(tma, dy, w.contiguous(), gs, a, Tensor(), mask, p, dx2);
    } else if (st.fused) {
        FusedGrads f = fused_backward(dy, x, a, b, h, mask, s, p, need.x, need.a, need.b, x_sizes, st.a_dtype);
        dy = f.dy, g.x = f.grad_x, g.a = f.grad_a, g.b = f.grad_b;
        if (need.x) g.x.view({-1, x.size(1)}).addmm_(dy, kn ? w.t() : w);
    }
#endif
    if (!st.fused) {
        LowRankGrads l = low_rank_grads(dy, x, a, b, h, mask, s, p, need.x, need.a, need.b, st.a_dtype, st.b_dtype);
        g.a = l.grad_a;
        g.b = l.grad_b;
        if (need.x) g.x = l.dx_low.addmm_(dy, kn ? w.t() : w).view(x_sizes);  // the engine casts it to x's dtype
    }
    if (need.w)  // only when the user trains the base weight too
        g.w = as(kn ? at::mm(x.t(), dy) : at::mm(dy.t(), x), st.w_dtype);
    if (need.bias) g.bias = as(dy.sum(0), st.bias_dtype);
    return g;
}

struct LoraLinearFn : public torch::autograd::Function<LoraLinearFn> {
    // The reshape to M×K and back happens here, not in Python: a view outside the node is an autograd node of its
    // own, in forward and backward (two ViewBackward nodes cost ~40 µs of host time per layer on a CPU).
    static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& weight,
                          const c10::optional<Tensor>& bias_in, const Tensor& lora_a, const Tensor& lora_b, double scale,
                          double p, bool kn, c10::ScalarType dt, bool kernels) {
        Forward out = linear_forward(x_in, weight, bias_in, lora_a, lora_b, scale, p, kn, dt, kernels, true);
        ctx->save_for_backward(out.saved);
        NodeState st;
        st.scale = scale, st.p = p, st.fused = out.fused, st.tma = out.tma, st.produced = out.produced, st.kn = kn,
        st.has_bias = bias_in.has_value();
        st.a_dtype = lora_a.scalar_type(), st.b_dtype = lora_b.scalar_type(), st.w_dtype = weight.scalar_type();
        if (bias_in.has_value()) st.bias_dtype = bias_in->scalar_type();
        st.save(ctx, x_in);
        return out.y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const NodeState st = NodeState::load(ctx);
        // needs_input_grad counts graph edges, which exist only for tensor arguments: no bias, no edge 2
        const size_t e = st.has_bias ? 1 : 0;
        const Needs need{ctx->needs_input_grad(0), ctx->needs_input_grad(1), e && ctx->needs_input_grad(2),
                         ctx->needs_input_grad(2 + e), ctx->needs_input_grad(3 + e)};
        LinearGrads g = linear_backward(st, saved, saved[1], grads[0], need, ctx->saved_data["x_sizes"].toIntVector());
        return {g.x, g.w, g.bias, g.a, g.b, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// LoraAddFn's forward arithmetic (keep: as linear_forward's)
Forward add_forward(const Tensor& x_in, const Tensor& base_out, const Tensor& lora_a, const Tensor& lora_b,
                    double scale, double p, c10::ScalarType dt, bool kernels, bool keep) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    Tensor x = rows(x_in, x_in.size(-1), dt);
    const int64_t n = lora_b.size(0);
    Forward out;
#ifdef PEFT_FAST_CUDA_KERNELS
    if (kernels && x.is_cuda()) x = x.contiguous();
    const Tensor base2 = kernels && base_out.scalar_type() == dt ? base_out.reshape({-1, n}) : Tensor();
    if (base2.defined() && fused_takes(x, lora_a, lora_b, p, dt, base2)) {
        FusedSaved f;
        out.y = at::empty(base_out.sizes(), x.options());
        Tensor y2 = out.y.view({-1, n});
        fused_forward(x, lora_a, lora_b, Tensor(), base2, scale, p, y2, f, keep);
        if (keep) out.saved = {x, f.a, f.b, f.hs, f.mask};
        out.fused = true;
        return out;
    }
#endif
    const Tensor a = as(lora_a, dt), bs = scaled_as(lora_b, scale, dt);
    auto [h, mask] = shrink(x, a, p);
    // a new tensor (base_out may be a view made inside its own autograd Function: not modifiable in place)
    if (base_out.scalar_type() == dt) {
        out.y = at::empty(base_out.sizes(), x.options());
        Tensor y2 = out.y.view({-1, n});
        at::addmm_out(y2, rows(base_out, n, dt), h, bs.t());
    } else {  // e.g. an fp32 base output under bf16 autocast: the sum in the promoted dtype, as HF PEFT adds
        out.y = at::add(base_out, at::mm(h, bs.t()).view(base_out.sizes()));
    }
    if (keep) out.saved = {x, a, bs, h, mask};
    return out;
}

// y = base_out + s · drop(x) Aᵀ Bᵀ: the LoRA term of a layer whose base output comes from its own autograd node (a
// bitsandbytes 4-bit / 8-bit linear). The same formulas as LoraLinearFn without W; dy reaches base_out unchanged.
struct LoraAddFn : public torch::autograd::Function<LoraAddFn> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& base_out, const Tensor& lora_a,
                          const Tensor& lora_b, double scale, double p, c10::ScalarType dt, bool kernels) {
        Forward out = add_forward(x_in, base_out, lora_a, lora_b, scale, p, dt, kernels, true);
        ctx->save_for_backward(out.saved);
        NodeState st;
        st.scale = scale, st.p = p, st.fused = out.fused;
        st.a_dtype = lora_a.scalar_type(), st.b_dtype = lora_b.scalar_type();
        st.save(ctx, x_in);
        return out.y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &a = saved[1], &b = saved[2], &h = saved[3], &mask = saved[4];
        const NodeState st = NodeState::load(ctx);
        const double s = st.scale, p = st.p;
        const bool fused = st.fused;
        const bool need_x = ctx->needs_input_grad(0), need_base = ctx->needs_input_grad(1),
                   need_a = ctx->needs_input_grad(2), need_b = ctx->needs_input_grad(3);
        const int64_t n = b.size(0);
        Tensor dy = rows(grads[0], n, x.scalar_type());
        const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
        Tensor grad_x, grad_a, grad_b;
#ifdef PEFT_FAST_CUDA_KERNELS
        if (fused) {
            FusedGrads g = fused_backward(dy, x, a, b, h, mask, s, p, need_x, need_a, need_b, x_sizes, st.a_dtype);
            grad_x = g.grad_x, grad_a = g.grad_a, grad_b = g.grad_b;
        }
#endif
        if (!fused) {
            LowRankGrads g = low_rank_grads(dy, x, a, b, h, mask, s, p, need_x, need_a, need_b, st.a_dtype,
                                            st.b_dtype);
            grad_a = g.grad_a;
            grad_b = g.grad_b;
            if (need_x) grad_x = g.dx_low.view(x_sizes);
        }
        // (the engine casts each gradient to its input's dtype)
        return {grad_x, need_base ? grads[0] : Tensor(), grad_a, grad_b, Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// ---- QLoRA: the LoRA linear over a bitsandbytes 4-bit base weight, dequantized inside the node

// A bitsandbytes 4-bit weight (N×K) as peft_fast/ops/cuda_qlora.py hands it over: the packed bytes, the 16 code
// values, the fp32 absmax per block, or under double quantization its uint8 codes with absmax2, code2 and offset
struct Quant4 {
    Tensor packed, code, absmax, absmax2, code2, offset;
    int64_t n = 0, k = 0, blocksize = 0, blocksize2 = 0;
    bool nested() const { return absmax2.defined(); }
};

// per-block values repeated over their blocks' elements (the last block may be short)
Tensor per_element(const Tensor& per_block, int64_t numel, int64_t blocksize) {
    return per_block.reshape({-1, 1}).expand({per_block.numel(), blocksize}).reshape({-1}).slice(0, 0, numel);
}

Tensor packed_bytes(const Tensor& packed) {
    Tensor flat = packed.reshape({-1});
    return flat.scalar_type() == torch::kByte ? flat : flat.view(torch::kByte);
}

// W = code[nibble] · absmax of its block in fp32, rounded once to dt (bitsandbytes' arithmetic) from ATen ops
Tensor dequant4_aten(const Quant4& q, c10::ScalarType dt) {
    const int64_t numel = q.n * q.k;
    const Tensor bytes = packed_bytes(q.packed);
    const Tensor nibbles = at::stack({at::bitwise_right_shift(bytes, 4), at::bitwise_and(bytes, 15)}, 1)
                               .reshape({-1}).slice(0, 0, numel).to(torch::kLong);
    Tensor absmax = q.absmax.reshape({-1});
    if (q.nested())  // dequantize_blockwise, then + offset: two roundings in fp32
        absmax = q.code2.to(torch::kFloat).index_select(0, absmax.to(torch::kLong))
                     .mul(per_element(q.absmax2.to(torch::kFloat), absmax.numel(), q.blocksize2))
                     .add(q.offset.to(torch::kFloat).reshape({}));
    else
        absmax = absmax.to(torch::kFloat);
    const Tensor values = q.code.to(torch::kFloat).index_select(0, nibbles).mul(per_element(absmax, numel, q.blocksize));
    return values.view({q.n, q.k}).to(dt);
}

#ifdef PEFT_FAST_CUDA_KERNELS
bool dequant4_kernel_takes(const Quant4& q, c10::ScalarType dt) {
    auto f32 = [&](const Tensor& t, int64_t numel) {
        return t.scalar_type() == torch::kFloat && t.is_contiguous() && t.device() == q.packed.device() &&
               (numel < 0 || t.numel() == numel);
    };
    if (!q.packed.is_cuda() || !q.packed.is_contiguous() || reinterpret_cast<uintptr_t>(q.packed.data_ptr()) % 4 != 0)
        return false;
    if ((dt != torch::kBFloat16 && dt != torch::kHalf) || !f32(q.code, 16)) return false;
    if (!dequant4_supports(q.n * q.k, static_cast<int>(q.blocksize), static_cast<int>(q.blocksize2), q.nested()))
        return false;
    if (!q.nested()) return f32(q.absmax, -1);
    return q.absmax.scalar_type() == torch::kByte && q.absmax.is_contiguous() && q.absmax.device() == q.packed.device() &&
           f32(q.absmax2, -1) && f32(q.code2, 256) && f32(q.offset, 1);
}

// The code book and block scales of W as the kernels' argument structs take them (Dequant4Args, QgemvArgs): the
// fp32 absmax, or under double quantization its uint8 codes with absmax2, code2 and the offset
template <typename Args>
void set_scales(Args& args, const Quant4& q) {
    args.code = q.code.data_ptr<float>();
    if (q.nested()) {
        args.qabsmax = q.absmax.data_ptr<uint8_t>();
        args.absmax2 = q.absmax2.data_ptr<float>();
        args.code2 = q.code2.data_ptr<float>();
        args.offset = q.offset.data_ptr<float>();
    } else {
        args.absmax = q.absmax.data_ptr<float>();
    }
}
#endif

// W (N×K, dt): the kernel of dequant4.cu where it takes the weight and `kernel` allows it, else ATen ops
Tensor dequant4(const Quant4& q, c10::ScalarType dt, bool kernel) {
#ifdef PEFT_FAST_CUDA_KERNELS
    if (kernel && dequant4_kernel_takes(q, dt)) {
        const c10::cuda::CUDAGuard guard(q.packed.device());
        Tensor w = at::empty({q.n, q.k}, q.packed.options().dtype(dt));
        Dequant4Args args{};
        args.packed = packed_bytes(q.packed).data_ptr<uint8_t>();
        set_scales(args, q);
        args.out = w.data_ptr();
        args.n = q.n * q.k;
        args.blocksize = static_cast<int>(q.blocksize);
        args.blocksize2 = static_cast<int>(q.blocksize2);
        args.bf16 = dt == torch::kBFloat16;
        check(launch_dequant4(args, c10::cuda::getCurrentCUDAStream()), "dequantize 4-bit");
        return w;
    }
#endif
    return dequant4_aten(q, dt);
}

#ifdef PEFT_FAST_CUDA_KERNELS
// Decode (an inference call of at most kQgemvMaxRows rows): y = x · deq(W)ᵀ (+ bias) by the 4-bit GEMM of qgemv.cu,
// which reads the packed weight once and dequantizes in registers (a dequantized copy would write and read W in 16
// bits: 8× the bytes of the packed weight), then y += s·drop(x)Aᵀ Bᵀ as in linear_forward. Undefined when the kernel
// does not take the call (the caller then dequantizes).
Tensor qgemv_forward(const Quant4& q, const Tensor& x_in, const c10::optional<Tensor>& bias_in, const Tensor& lora_a,
                     const Tensor& lora_b, double scale, double p, c10::ScalarType dt, bool kernels) {
    const int64_t m = x_in.numel() / q.k;
    if (!x_in.is_cuda() || x_in.device() != q.packed.device() || !dequant4_kernel_takes(q, dt) ||
        !aligned16(q.packed) || !qgemv_supports(m, q.k, q.blocksize, q.nested(), q.blocksize2))
        return Tensor();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const c10::cuda::CUDAGuard guard(x_in.device());
    Tensor x = rows(x_in, q.k, dt).contiguous();
    if (!aligned16(x)) x = x.clone();
    const Tensor bias = bias_in.has_value() ? as(*bias_in, dt).contiguous() : Tensor();
    Tensor y = at::empty(with_last(x_in.sizes(), q.n), x.options());
    Tensor y2 = y.view({-1, q.n});
    // the GEMM and the term in one launch (lora_decode.cu), where lora_kernels_set_decode_kernel_4bit asks for it
    if (kernels && p == 0.0 && decode_kernel_4bit.load(std::memory_order_relaxed) &&
        fused_takes(x, lora_a, lora_b, p, dt) && lora_decode_supported(m, q.k, q.n, lora_a.size(0))) {
        LoraDecodeArgs d = decode_args(x, bias, lora_a, lora_b, scale, y2);
        d.packed = packed_bytes(q.packed).data_ptr<uint8_t>();
        set_scales(d, q);
        d.blocksize = static_cast<int>(q.blocksize), d.blocksize2 = static_cast<int>(q.blocksize2);
        check(launch_lora_decode(d, c10::cuda::getCurrentCUDAStream()), "4-bit decode");
        return y;
    }
    QgemvArgs args{};
    args.x = x.data_ptr();
    args.w = packed_bytes(q.packed).data_ptr<uint8_t>();
    set_scales(args, q);
    args.bias = bias.defined() ? bias.data_ptr() : nullptr;
    args.y = y.data_ptr();
    args.m = static_cast<int>(m), args.n = static_cast<int>(q.n), args.k = static_cast<int>(q.k);
    args.blocksize = static_cast<int>(q.blocksize), args.blocksize2 = static_cast<int>(q.blocksize2);
    args.bf16 = dt == torch::kBFloat16;
    check(launch_qgemv_lora(args, c10::cuda::getCurrentCUDAStream()), "4-bit GEMM");
    low_rank_into(x, lora_a, lora_b, Tensor(), scale, p, dt, kernels, false, y2, true);
    return y;
}
#endif

// The checks a QLoRA call gets before anything runs: sizes that disagree would otherwise read out of bounds
void check_quant4(const Quant4& q, const Tensor& x, const Tensor& a, const Tensor& b) {
    TORCH_CHECK(q.n > 0 && q.k > 0 && q.blocksize > 0, "qlora_linear: n, k and blocksize must be positive, got ", q.n,
                ", ", q.k, ", ", q.blocksize);
    const int64_t numel = q.n * q.k, blocks = (numel + q.blocksize - 1) / q.blocksize;
    TORCH_CHECK(q.packed.numel() * q.packed.element_size() == (numel + 1) / 2, "qlora_linear: the packed weight holds ",
                q.packed.numel() * q.packed.element_size(), " bytes; ", q.n, "×", q.k, " needs ", (numel + 1) / 2);
    TORCH_CHECK(q.code.numel() == 16, "qlora_linear: code must hold the 16 code values, got ", q.code.numel());
    TORCH_CHECK(q.absmax.numel() == blocks, "qlora_linear: absmax must hold one value per block of ", q.blocksize,
                " (", blocks, "), got ", q.absmax.numel());
    if (q.nested()) {
        TORCH_CHECK(q.blocksize2 > 0 && q.code2.defined() && q.code2.numel() == 256 && q.offset.defined() &&
                        q.offset.numel() == 1 && q.absmax2.numel() == (blocks + q.blocksize2 - 1) / q.blocksize2,
                    "qlora_linear: double quantization needs absmax2 (one value per ", q.blocksize2,
                    " blocks), code2 (256 values) and offset (one value)");
        TORCH_CHECK(q.absmax.scalar_type() == torch::kByte, "qlora_linear: a double-quantized absmax holds uint8 codes");
    }
    TORCH_CHECK(x.size(-1) == q.k, "qlora_linear: x has ", x.size(-1), " features, the weight ", q.k);
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == q.k && b.size(0) == q.n && b.size(1) == a.size(0),
                "qlora_linear: lora_a must be r×", q.k, " and lora_b ", q.n, "×r, got ", a.sizes(), " and ", b.sizes());
}

// y = x Wᵀ (+ bias) + s·drop(x) Aᵀ Bᵀ with W dequantized from 4 bits into a buffer that lives for the one GEMM:
// LoraLinearFn's arithmetic, W made again in backward for dx (as bitsandbytes' own backward does) and never kept.
struct QLoraLinearFn : public torch::autograd::Function<QLoraLinearFn> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const c10::optional<Tensor>& bias_in,
                          const Tensor& lora_a, const Tensor& lora_b, const Tensor& packed, const Tensor& code,
                          const Tensor& absmax, const c10::optional<Tensor>& absmax2,
                          const c10::optional<Tensor>& code2, const c10::optional<Tensor>& offset, int64_t n, int64_t k,
                          int64_t blocksize, int64_t blocksize2, double scale, double p, c10::ScalarType dt,
                          bool dequant_kernel, bool kernels) {
        const Quant4 q{packed, code, absmax, absmax2.value_or(Tensor()), code2.value_or(Tensor()),
                       offset.value_or(Tensor()), n, k, blocksize, blocksize2};
        Forward out = linear_forward(x_in, dequant4(q, dt, dequant_kernel), bias_in, lora_a, lora_b, scale, p, false,
                                     dt, kernels, true);
        out.saved[1] = Tensor();  // the dequantized W is not kept
        out.saved.insert(out.saved.end(), {packed, code, absmax, q.absmax2, q.code2, q.offset});
        ctx->save_for_backward(out.saved);
        NodeState st;
        st.scale = scale, st.p = p, st.fused = out.fused, st.tma = out.tma, st.produced = out.produced,
        st.has_bias = bias_in.has_value();
        st.a_dtype = lora_a.scalar_type(), st.b_dtype = lora_b.scalar_type();
        if (bias_in.has_value()) st.bias_dtype = bias_in->scalar_type();
        st.save(ctx, x_in);
        ctx->saved_data["quant"] = std::vector<int64_t>{n, k, blocksize, blocksize2, dequant_kernel};
        return out.y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const NodeState st = NodeState::load(ctx);
        const size_t e = st.has_bias ? 1 : 0;  // (edges: x, bias if given, A, B; the quantized weight has none)
        const Needs need{ctx->needs_input_grad(0), false, e && ctx->needs_input_grad(1), ctx->needs_input_grad(1 + e),
                         ctx->needs_input_grad(2 + e)};
        Tensor w;
        if (need.x) {
            const auto qs = ctx->saved_data["quant"].toIntVector();
            const Quant4 q{saved[6], saved[7], saved[8], saved[9], saved[10], saved[11], qs[0], qs[1], qs[2], qs[3]};
            w = dequant4(q, saved[0].scalar_type(), qs[4] != 0);
        }
        LinearGrads g = linear_backward(st, saved, w, grads[0], need, ctx->saved_data["x_sizes"].toIntVector());
        variable_list out(19);
        out[0] = g.x, out[1] = g.bias, out[2] = g.a, out[3] = g.b;
        return out;
    }
};

// Whether a call must record an autograd node: grad mode on and some input needing a gradient. Otherwise (decode,
// evaluation under no_grad / inference_mode, frozen inputs) the forward runs bare: no node, nothing saved.
bool records_graph(std::initializer_list<const Tensor*> inputs) {
    if (!at::GradMode::is_enabled()) return false;
    for (const Tensor* t : inputs)
        if (t->defined() && t->requires_grad()) return true;
    return false;
}
}  // namespace

Tensor lora_add(const Tensor& x, const Tensor& base_out, const Tensor& lora_a, const Tensor& lora_b, double scale,
                double p, c10::ScalarType dtype, bool kernels) {
    if (!records_graph({&x, &base_out, &lora_a, &lora_b}))
        return add_forward(x, base_out, lora_a, lora_b, scale, p, dtype, kernels, false).y;
    return LoraAddFn::apply(x, base_out, lora_a, lora_b, scale, p, dtype, kernels);
}

Tensor qlora_linear(const Tensor& x, const c10::optional<Tensor>& bias, const Tensor& lora_a, const Tensor& lora_b,
                    const Tensor& packed, const Tensor& code, const Tensor& absmax,
                    const c10::optional<Tensor>& absmax2, const c10::optional<Tensor>& code2,
                    const c10::optional<Tensor>& offset, int64_t n, int64_t k, int64_t blocksize, int64_t blocksize2,
                    double scale, double p, c10::ScalarType dtype, bool dequant_kernel, bool kernels) {
    const Quant4 q{packed, code, absmax, absmax2.value_or(Tensor()), code2.value_or(Tensor()),
                   offset.value_or(Tensor()), n, k, blocksize, blocksize2};
    check_quant4(q, x, lora_a, lora_b);
    const Tensor& b = bias.has_value() ? *bias : x;
    if (!records_graph({&x, &b, &lora_a, &lora_b})) {
#ifdef PEFT_FAST_CUDA_KERNELS
        if (dequant_kernel && x.numel() <= kQgemvMaxRows * k) {
            Tensor y = qgemv_forward(q, x, bias, lora_a, lora_b, scale, p, dtype, kernels);
            if (y.defined()) return y;
        }
#endif
        return linear_forward(x, dequant4(q, dtype, dequant_kernel), bias, lora_a, lora_b, scale, p, false, dtype,
                              kernels, false).y;
    }
    return QLoraLinearFn::apply(x, bias, lora_a, lora_b, packed, code, absmax, absmax2, code2, offset, n, k, blocksize,
                                blocksize2, scale, p, dtype, dequant_kernel, kernels);
}

Tensor lora_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& lora_a,
                   const Tensor& lora_b, double scale, double p, bool kn, c10::ScalarType dtype, bool kernels) {
    const Tensor& b = bias.has_value() ? *bias : x;
    if (!records_graph({&x, &weight, &b, &lora_a, &lora_b}))
        return linear_forward(x, weight, bias, lora_a, lora_b, scale, p, kn, dtype, kernels, false).y;
    return LoraLinearFn::apply(x, weight, bias, lora_a, lora_b, scale, p, kn, dtype, kernels);
}

#ifdef PEFT_FAST_CUDA_KERNELS
namespace {
// a tensor the test entry points hand to the kernels: x's dtype and device, contiguous, 16-byte aligned, these sizes
void require_rows(const c10::optional<Tensor>& t, const char* name, const Tensor& x, at::IntArrayRef sizes) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device() && t->is_contiguous() &&
                    aligned16(*t) && t->sizes() == sizes,
                "lora_kernels: ", name, " must be a contiguous, 16-byte aligned ", x.scalar_type(), " tensor of sizes ",
                sizes, " on ", x.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
}

RowsShape rows_shape(int64_t block_rows, int64_t column_splits, int64_t reduce_cols = 0) {
    TORCH_CHECK(block_rows == 0 || block_rows == 16 || block_rows == 32 || block_rows == 64,
                "lora_kernels: block_rows must be 0 (the launcher's rule), 16, 32 or 64, got ", block_rows);
    TORCH_CHECK(column_splits >= 0 && column_splits <= 1024, "lora_kernels: column_splits must be 0 (the launcher's rule) "
                "to 1024, got ", column_splits);
    TORCH_CHECK(reduce_cols == 0 || lora_reduce_cols_supported(static_cast<int>(reduce_cols)),
                "lora_kernels: reduce_cols must be 0 (lora_kernels_set_reduce_cols' value), 64 or 128, got ",
                reduce_cols);
    return {static_cast<int>(block_rows), static_cast<int>(column_splits), static_cast<int>(reduce_cols)};
}
}  // namespace

void lora_kernels_set_reduce_cols(int64_t cols) {
    TORCH_CHECK(lora_reduce_cols_supported(static_cast<int>(cols)),
                "lora_kernels_set_reduce_cols: cols must be 64 or 128, got ", cols);
    reduce_columns.store(static_cast<int>(cols), std::memory_order_relaxed);
}

int64_t lora_kernels_reduce_cols() { return reduce_columns.load(std::memory_order_relaxed); }

void lora_kernels_set_reduce_compact(bool on) { reduce_compact.store(on, std::memory_order_relaxed); }

bool lora_kernels_reduce_compact() { return reduce_compact.load(std::memory_order_relaxed); }

void lora_kernels_set_decode_kernel(bool on) { decode_kernel.store(on, std::memory_order_relaxed); }

bool lora_kernels_decode_kernel() { return decode_kernel.load(std::memory_order_relaxed); }

void lora_kernels_set_decode_kernel_4bit(bool on) { decode_kernel_4bit.store(on, std::memory_order_relaxed); }

bool lora_kernels_decode_kernel_4bit() { return decode_kernel_4bit.load(std::memory_order_relaxed); }

void lora_kernels_set_decode_spread_loads(bool on) { decode_spread_loads.store(on, std::memory_order_relaxed); }

bool lora_kernels_decode_spread_loads() { return decode_spread_loads.load(std::memory_order_relaxed); }

void lora_kernels_set_rows_cluster(int64_t blocks) {
    TORCH_CHECK(blocks >= 1 && blocks <= kLoraRowsMaxCluster, "lora_kernels_set_rows_cluster: blocks must be 1 (off) "
                "to ", kLoraRowsMaxCluster, ", got ", blocks);
    rows_cluster_k.store(static_cast<int>(blocks), std::memory_order_relaxed);
}

int64_t lora_kernels_rows_cluster() { return rows_cluster_k.load(std::memory_order_relaxed); }

void lora_kernels_set_preround_rows(int64_t rows) {
    TORCH_CHECK(rows >= 0, "lora_kernels_set_preround_rows: rows must be >= 0, got ", rows);
    preround_min_rows.store(rows, std::memory_order_relaxed);
}

int64_t lora_kernels_preround_rows() { return preround_min_rows.load(std::memory_order_relaxed); }

void lora_kernels_set_two_pass_rows(int64_t rows, int64_t pass2_rows) {
    TORCH_CHECK(rows >= 0, "lora_kernels_set_two_pass_rows: rows must be >= 0, got ", rows);
    TORCH_CHECK(pass2_rows == 0 || pass2_rows == 16 || pass2_rows == 32 || pass2_rows == 64,
                "lora_kernels_set_two_pass_rows: pass2_rows must be 0 (the launcher's rule), 16, 32 or 64, got ",
                pass2_rows);
    two_pass_min_rows.store(rows, std::memory_order_relaxed);
    pass2_block_rows.store(static_cast<int>(pass2_rows), std::memory_order_relaxed);
}

void lora_kernels_register_tma(bool dx, bool bf16, bool kn, bool has_bias, bool has_keep, int64_t rank,
                               int64_t kernel_id, int64_t programs, int64_t block_m, int64_t block_n, int64_t major,
                               bool produce, bool adapter_fp32, int64_t block_k, int64_t max_splits) {
    TORCH_CHECK(rank >= 1 && rank <= kLoraKernelMaxRank && lora_rank_block(rank) == rank,
                "lora_kernels_register_tma: rank must be the rank block (16, 32, 64 or 128), got ", rank);
    TORCH_CHECK(kernel_id == -1 || (kernel_id >= 0 && programs > 0 && block_m > 0 && block_n > 0),
                "lora_kernels_register_tma: bad kernel description");
    TORCH_CHECK(!(produce && has_keep), "lora_kernels_register_tma: a producing kernel takes no keep bits");
    TORCH_CHECK(kernel_id == -1 || (block_k > 0 && max_splits >= 1),
                "lora_kernels_register_tma: block_k must be > 0 and max_splits >= 1, got ", block_k, ", ", max_splits);
    const int64_t key =
        tma_key(dx, bf16 ? torch::kBFloat16 : torch::kHalf, kn, has_bias, has_keep, rank, produce, adapter_fp32);
    const std::lock_guard<std::mutex> lock(tma_mutex);
    if (kernel_id == -1) tma_kernels.erase(key);  // (that direction back on the default route)
    else tma_kernels[key] = TmaKernel{kernel_id, programs, block_m, block_n, major, block_k, rank, max_splits};
}

void lora_kernels_set_tma_rows(int64_t rows) {
    TORCH_CHECK(rows >= 0, "lora_kernels_set_tma_rows: rows must be >= 0, got ", rows);
    tma_min_rows.store(rows, std::memory_order_relaxed);
}

int64_t lora_kernels_tma_rows() { return tma_min_rows.load(std::memory_order_relaxed); }

void lora_kernels_set_tma_produce_rows(int64_t rows) {
    TORCH_CHECK(rows >= 0, "lora_kernels_set_tma_produce_rows: rows must be >= 0, got ", rows);
    tma_produce_min_rows.store(rows, std::memory_order_relaxed);
}

int64_t lora_kernels_tma_produce_rows() { return tma_produce_min_rows.load(std::memory_order_relaxed); }

std::tuple<int64_t, int64_t> lora_kernels_two_pass_rows() {
    return {two_pass_min_rows.load(std::memory_order_relaxed), pass2_block_rows.load(std::memory_order_relaxed)};
}

std::vector<Tensor> lora_kernels_forward(const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, double scale,
                                         double p, const c10::optional<Tensor>& bias,
                                         const c10::optional<Tensor>& addend, int64_t block_rows,
                                         int64_t column_splits, bool copies, bool shrink_only) {
    TORCH_CHECK(x.dim() == 2 && fused_takes(x, lora_a, lora_b, p, x.scalar_type(), addend.value_or(Tensor())),
                "lora_kernels_forward: the fused kernels do not take these arguments");
    const int64_t m = x.size(0), n = lora_b.size(0);
    require_rows(bias, "bias", x, {n});
    require_rows(addend, "addend", x, {m, n});
    TORCH_CHECK(!shrink_only || !(bias.has_value() || addend.has_value() || copies),
                "lora_kernels_forward: shrink_only makes hs alone");
    Tensor y = shrink_only ? Tensor() : at::empty({m, n}, x.options());
    FusedSaved f;
    fused_forward(x, lora_a, lora_b, bias.value_or(Tensor()), addend.value_or(Tensor()), scale, p, y, f, true,
                  rows_shape(block_rows, column_splits));
    const Tensor mask = f.mask.defined() ? f.mask : at::empty({0}, x.options().dtype(torch::kUInt8));
    if (copies) return {y, f.hs, mask, f.a, f.b};
    return {y, f.hs, mask};
}

Tensor lora_kernels_decode(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                           const Tensor& lora_a, const Tensor& lora_b, double scale) {
    TORCH_CHECK(x.dim() == 2 && decode_takes(x, weight, bias.value_or(Tensor()), lora_a, lora_b, 0.0,
                                             x.scalar_type(), false),
                "lora_kernels_decode: the decode kernel does not take these arguments (sm_90+, 1 to ",
                kLoraDecodeMaxRows, " rows, K a multiple of 32, rank 1 to 64, contiguous 16-byte aligned tensors)");
    require_rows(bias, "bias", x, {weight.size(0)});
    Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
    decode_forward(x, weight, bias.value_or(Tensor()), lora_a, lora_b, scale, y);
    return y;
}

std::vector<Tensor> lora_kernels_backward(const Tensor& dy, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                                          const Tensor& hs, const c10::optional<Tensor>& mask, double scale, double p,
                                          bool need_x, bool need_a, bool need_b, int64_t block_rows,
                                          int64_t column_splits, bool fp32_grads, int64_t reduce_cols) {
    TORCH_CHECK(x.dim() == 2 && fused_takes(x, lora_a, lora_b, p, x.scalar_type(), dy),
                "lora_kernels_backward: the fused kernels do not take these arguments");
    const int64_t m = x.size(0), k = x.size(1), n = lora_b.size(0), r = lora_a.size(0);
    require_rows(dy, "dy", x, {m, n});
    require_rows(hs, "hs", x, {m, r});
    const Tensor bits = mask.has_value() && mask->numel() > 0 ? *mask : Tensor();
    TORCH_CHECK(!bits.defined() || (bits.scalar_type() == torch::kUInt8 && bits.is_contiguous() &&
                                    bits.device() == x.device() && bits.sizes() == at::IntArrayRef({m, k / 8})),
                "lora_kernels_backward: mask must be the forward's contiguous uint8 M×K/8 bits on x's device");
    TORCH_CHECK(bits.defined() || p == 0.0, "lora_kernels_backward: dropout p > 0 needs the forward's mask");
    FusedGrads g = fused_backward(dy, x, lora_a, lora_b, hs, bits, scale, p, need_x, need_a, need_b, x.sizes(),
                                  fp32_grads ? torch::kFloat : lora_a.scalar_type(),
                                  rows_shape(block_rows, column_splits, reduce_cols));
    return {g.grad_x, g.grad_a, g.grad_b};
}
#endif
