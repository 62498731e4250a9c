"""Triton LoRA kernels against the torch reference (DESIGN.md §2), in Triton's interpreter on the CPU.

Small odd shapes (M, K, N not multiples of any block), ranks 1 to 128 (padded ones too), fp32, fp16 and bf16 (16-bit
operands are exact 16-bit values; the interpreter multiplies them in fp32, the GPU tests run the real 16-bit dots).
GPU-sized runs of the same checks live in test_gpu_kernels.py.
"""

import copy
import os

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_fast import ops
from peft_fast.kernels import lora_linear as K
from peft_fast.ops import dispatch
from models import no_grad_outputs, rel_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests (CPU tensors); test_gpu_kernels.py covers the GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
RANKS = [1, 8, 40, 64, 128]  # ranks the kernels pad (to 16, to 64), whole rank blocks, the largest users train with


@pytest.fixture
def triton_backend(force_backend):
    force_backend("triton")


def _mask(m, k, p, seed):
    """The kernels' dropout mask, read back through the shrink with A = I (x = 1, scale 1)."""
    ones = torch.ones(m, k)
    return K.shrink(ones, torch.eye(k), 1.0, p, seed) != 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS)
def test_shrink_matches_reference(dtype, r):
    x, a = torch.randn(37, 45, dtype=dtype), torch.randn(r, 45, dtype=dtype)
    h = K.shrink(x, a, 0.75, 0.0, 0, out=torch.full((37, r), float("nan"), dtype=dtype))
    assert h.shape == (37, r) and h.dtype == dtype
    assert rel_err(h, 0.75 * x.float() @ a.float().T) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_with_low_rank_epilogue(dtype, r, with_bias):
    m, k, n = 33, 50, 41
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    h, b = torch.randn(m, r, dtype=dtype), torch.randn(n, r, dtype=torch.float32)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: every element must be written
    K.gemm_lora(x, w.t(), bias, h, b.t(), 0.5, 0.0, 0, dtype, out=out)
    ref = x.float() @ w.float().T + 0.5 * h.float() @ b.to(dtype).float().T
    if with_bias:
        ref = ref + bias.float()
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]
    plain = K.gemm_lora(x, w.t(), None, None, None, 0.0, 0.0, 0, dtype)
    assert rel_err(plain, x.float() @ w.float().T) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS)
def test_gemm_with_shrink_fused_in_the_k_loop(dtype, r):
    m, k, n = 21, 70, 37
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    a, b = torch.randn(r, k, dtype=torch.float32), torch.randn(n, r, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out = K.gemm_lora(x, w.t(), bias, None, b.t(), 1.0, 0.0, 0, dtype, shrink_a=a, shrink_scale=0.25)
    h = (0.25 * x.float() @ a.to(dtype).float().T).to(dtype).float()  # h is rounded to the input dtype
    assert rel_err(out, x.float() @ w.float().T + h @ b.float().T + bias.float()) < TOL[dtype]
    with pytest.raises(ValueError, match="dropout"):
        K.gemm_lora(x, w.t(), None, None, b.t(), 1.0, 0.1, 0, dtype, shrink_a=a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_term_alone(dtype):
    m, n, r = 29, 43, 16
    h, low, bias = torch.randn(m, r, dtype=dtype), torch.randn(r, n, dtype=dtype), torch.randn(n, dtype=dtype)
    out = K.lowrank(h, low, bias, 0.5, 0.0, 0, dtype)
    assert out.shape == (m, n)
    assert rel_err(out, 0.5 * h.float() @ low.float() + bias.float()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS)
def test_grad_a_matches_reference(dtype, r):
    m, k = 300, 37  # several M splits of 128 rows
    dh, x = torch.randn(m, r, dtype=dtype), torch.randn(m, k, dtype=dtype)
    out = K.grad_a(dh, x, 0.0, 0)
    assert out.dtype == torch.float32 and out.shape == (r, k)
    assert rel_err(out, dh.float().T @ x.float()) < TOL[dtype]


def test_dropout_mask_is_reproducible_and_keeps_one_minus_p():
    m, k, p = 64, 96, 0.3
    mask = _mask(m, k, p, seed=1234)
    assert torch.equal(mask, _mask(m, k, p, seed=1234))
    assert not torch.equal(mask, _mask(m, k, p, seed=1235))
    n = m * k
    keep = mask.float().mean().item()
    assert abs(keep - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)  # five standard deviations
    assert _mask(m, k, 0.0, seed=1).all()
    # statistics of the mask alone, independent of how the kernels use it: no row or column far off the keep
    # rate, and another seed gives an independent mask (agreement (1-p)² + p²); a mask that repeated per row
    # block or reused the seed's low bits fails these
    big = _mask(256, 64, p, seed=77).float()
    other = _mask(256, 64, p, seed=78).float()
    assert (big.mean(1) - (1 - p)).abs().max() < 5 * (p * (1 - p) / 64) ** 0.5
    assert (big.mean(0) - (1 - p)).abs().max() < 5 * (p * (1 - p) / 256) ** 0.5
    agree, expected = (big == other).float().mean().item(), (1 - p) ** 2 + p**2
    assert abs(agree - expected) < 5 * (expected * (1 - expected) / big.numel()) ** 0.5
    assert not torch.equal(big[:128], big[128:])  # no repeat across row blocks
    # the dx epilogue regenerates the same mask at the same (row, column)
    w, dh, a = torch.zeros(k, 5), torch.ones(m, k), torch.eye(k)
    dx = K.gemm_lora(torch.zeros(m, 5), w.t(), None, dh, a, 1.0, p, 1234, torch.float32)
    assert torch.equal(dx != 0, mask)


def _layer_pair(base, r, dropout, lora_bias=False, dtype=torch.float32, n_adapters=1):
    """A peft_fast LoRA layer around `base` (random B, so the term is not zero)."""
    import peft_fast as pf

    model = nn.Sequential(base)
    config = pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=dropout, lora_bias=lora_bias)
    model = pf.get_peft_model(model, config)
    for i in range(1, n_adapters):
        model.add_adapter(f"extra{i}", pf.LoraConfig(r=r + i, lora_alpha=3, target_modules=["0"],
                                                     lora_bias=lora_bias, use_rslora=True))
    layer = model.base_model.model[0]
    if n_adapters > 1:
        layer.set_adapter(["default"] + [f"extra{i}" for i in range(1, n_adapters)])
    for name, param in layer.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)
    return layer.to(dtype)


def _forward_backward(layer, x, backend, force_backend):
    force_backend(backend)
    terms = [layer._adapter_term(a) for a in layer.active_adapters]
    assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == backend
    x = x.clone().requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y, generator=torch.Generator().manual_seed(7))
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.fixture(params=["cublas", "triton"])
def gemm_mode(request, monkeypatch):
    """Both ways of running the big GEMM: torch's matmul accumulating onto the low-rank term, or all in Triton."""
    from peft_fast.ops import triton_lora

    monkeypatch.setattr(triton_lora, "GEMM_MODE", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear-lora-bias", "two-adapters"])
def test_layer_forward_and_grads_match_torch_backend(dtype, kind, gemm_mode, force_backend):
    k, n = 29, 23
    base = Conv1D(n, k) if kind == "conv1d" else nn.Linear(k, n)
    base.weight.requires_grad_(False)
    layer = _layer_pair(base, 8, 0.0, lora_bias=kind == "linear-lora-bias", dtype=dtype,
                        n_adapters=2 if kind == "two-adapters" else 1)
    x = torch.randn(3, 7, k, dtype=dtype)
    y_t, dx_t, g_t = _forward_backward(layer, x, "torch", force_backend)
    y_k, dx_k, g_k = _forward_backward(layer, x, "triton", force_backend)
    assert y_k.dtype == y_t.dtype == dtype
    assert rel_err(y_k, y_t) < TOL[dtype]
    assert rel_err(dx_k, dx_t) < TOL[dtype]
    assert g_k.keys() == g_t.keys() and len(g_t) >= 2
    for name in g_t:
        assert g_k[name].dtype == g_t[name].dtype
        assert rel_err(g_k[name], g_t[name]) < 3 * TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 128])
def test_layer_at_the_smallest_and_largest_ranks(dtype, r, gemm_mode, force_backend):
    layer = _layer_pair(nn.Linear(150, 70), r, 0.0, dtype=dtype)
    layer.base_layer.weight.requires_grad_(False)
    x = torch.randn(2, 9, 150, dtype=dtype)
    y_t, dx_t, g_t = _forward_backward(layer, x, "torch", force_backend)
    y_k, dx_k, g_k = _forward_backward(layer, x, "triton", force_backend)
    assert rel_err(y_k, y_t) < TOL[dtype] and rel_err(dx_k, dx_t) < TOL[dtype]
    assert g_k.keys() == g_t.keys() and len(g_t) == 2
    for name in g_t:
        assert rel_err(g_k[name], g_t[name]) < 3 * TOL[dtype], name


def test_active_adapters_over_the_epilogue_s_rank_run_on_torch_with_a_warning(force_backend, monkeypatch):
    """Two active adapters fold into one term of their summed rank; above K.MAX_RANK the forced Triton backend cannot
    take the call: it runs on torch (same numbers) and says why."""
    monkeypatch.setattr(dispatch, "_warned", set())  # the warning is once per process: this test must see its own
    layer = _layer_pair(nn.Linear(24, 12), K.MAX_RANK // 2 + 1, 0.0, n_adapters=2)  # ranks 129 + 130
    x = torch.randn(5, 24)
    terms = [layer._adapter_term(a) for a in layer.active_adapters]
    force_backend("triton")
    with pytest.warns(UserWarning, match=f"total rank of the active adapters exceeds {K.MAX_RANK}"):
        assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == "torch"
    with torch.no_grad():
        y = layer(x)
    with ops.use_backend("torch"), torch.no_grad():
        assert torch.equal(y, layer(x))


def test_dropout_forward_and_grads_follow_one_regenerated_mask(triton_backend, gemm_mode):
    """y, dx, dA, dB with p=0.2 equal the formula evaluated with the mask read back from the kernels."""
    torch.manual_seed(3)
    m, k, n, r, p = 19, 33, 21, 4, 0.2
    layer = _layer_pair(nn.Linear(k, n), r, p)
    layer.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    base = layer.base_layer
    x = torch.randn(m, k, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)  # the layer draws its seed from torch's generator: draw the same one
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    mask = _mask(m, k, p, seed).float()
    xd = x.detach() * mask / (1 - p)
    h = xd @ a.detach().T
    assert rel_err(y, base(x.detach()) + s * h @ b.detach().T) < 1e-5
    dy = torch.randn(m, n)
    y.backward(dy)
    dh = s * dy @ b.detach()
    assert rel_err(b.grad, s * dy.T @ h) < 1e-5
    assert rel_err(a.grad, dh.T @ xd) < 1e-5
    assert rel_err(x.grad, dy @ base.weight.detach() + (dh @ a.detach()) * mask / (1 - p)) < 1e-5


def test_base_bias_and_weight_grads_when_trainable(triton_backend):
    layer = _layer_pair(nn.Linear(17, 9), 4, 0.0)
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(5, 17)
    ref = copy.deepcopy(layer)
    layer(x).square().sum().backward()
    with ops.use_backend("torch"):
        ref(x).square().sum().backward()
    for (name, p1), (_, p2) in zip(layer.named_parameters(), ref.named_parameters()):
        assert (p1.grad is None) == (p2.grad is None), name
        if p1.grad is not None:
            assert rel_err(p1.grad, p2.grad) < 1e-5, name


@pytest.mark.parametrize("rows", [5, 70])  # the one-launch fused path (≤ FUSED_SMALL_M rows) and the other
def test_inference_path_and_autocast(gemm_mode, rows):
    layer = _layer_pair(nn.Linear(24, 12), 8, 0.1)
    layer.eval()
    x = torch.randn(2, rows, 24)
    y, y16 = no_grad_outputs(layer, x, "triton")
    y_ref, y16_ref = no_grad_outputs(layer, x, "torch")
    assert rel_err(y, y_ref) < 1e-5
    assert y16.dtype == y16_ref.dtype == torch.bfloat16
    assert rel_err(y16, y16_ref) < 2e-2


def test_dispatch_auto_stays_on_torch_for_cpu_and_warns_for_hooks(force_backend):
    layer = _layer_pair(nn.Linear(8, 8), 2, 0.0)
    x = torch.randn(3, 8)
    terms = [layer._adapter_term("default")]
    force_backend("auto")
    assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == "torch"
    force_backend("triton")
    assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == "triton"
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    try:
        with pytest.warns(UserWarning, match="forward hooks"):
            assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == "torch"
    finally:
        handle.remove()


def test_empty_batch(triton_backend):
    layer = _layer_pair(nn.Linear(8, 6), 2, 0.0)
    y = layer(torch.randn(0, 8))
    assert y.shape == (0, 6)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_custom_ops_pass_torch_library_opcheck(p):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch: what torch.compile relies on to
    trace the fused LoRA linear as one op without a graph break (the compiled run itself needs a GPU)."""
    from peft_fast.ops import triton_lora  # noqa: F401  (registers the ops)

    x = torch.randn(7, 16, requires_grad=True)
    w, bias = torch.randn(12, 16), torch.randn(12, requires_grad=True)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    seed = torch.tensor(123, dtype=torch.int64)
    result = torch.library.opcheck(torch.ops.peft_fast.lora_linear_fwd.default, (x, w, bias, a, b, 0.5, p, seed, False))
    assert set(result.values()) == {"SUCCESS"}, result
    result = torch.library.opcheck(torch.ops.peft_fast.lora_linear_bwd.default,
                                   (torch.randn(7, 12), x.detach(), w, a.detach(), b.detach(), torch.randn(7, 4), 0.5,
                                    p, seed, False, True))
    assert set(result.values()) == {"SUCCESS"}, result
