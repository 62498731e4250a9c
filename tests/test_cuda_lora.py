"""The cuda backend of linear_with_lora (ops/cuda_lora.py: one autograd node over cuBLAS) against the torch
reference. It is plain torch code, so it runs on CPU tensors when forced; the GPU tests run it at real sizes."""

import contextlib
import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_fast as pf
from peft_fast import ops
from peft_fast.ops import cuda_lora, dispatch
from peft_fast.benchmark.timing import saved_activation_bytes
from models import no_grad_outputs, rel_err

TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True, params=["python-node", "cpp-node"])
def autograd_node(request, monkeypatch):
    """Every test runs on both forms of the node: FusedLoraLinear in Python and csrc/lora_autograd.cpp."""
    impl = request.getfixturevalue("cpp_lora_linear") if request.param == "cpp-node" else None
    monkeypatch.setattr(cuda_lora, "CPP_LORA_LINEAR", impl)
    return request.param


def _layer(base, r, p, dtype=torch.float32, n_adapters=1, lora_bias=False):
    config = pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=p, lora_bias=lora_bias,
                           fan_in_fan_out=isinstance(base, Conv1D))
    model = pf.get_peft_model(nn.Sequential(base), config)
    for i in range(1, n_adapters):
        model.add_adapter(f"extra{i}", pf.LoraConfig(r=r + i, lora_alpha=3, target_modules=["0"], use_rslora=True))
    layer = model.base_model.model[0]
    if n_adapters > 1:
        layer.set_adapter(["default"] + [f"extra{i}" for i in range(1, n_adapters)])
    for name, param in layer.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)  # B = 0 would hide a wrong low-rank term
    return layer.to(dtype)


def _run(layer, x, backend, x_grad=True):
    with ops.use_backend(backend):
        terms = [layer._adapter_term(a) for a in layer.active_adapters]
        assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == backend
        x = x.clone().requires_grad_(x_grad)
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear-bias-lora-bias", "two-adapters", "trainable-base"])
def test_forward_and_grads_match_the_torch_path(dtype, kind):
    k, n = 29, 23
    base = Conv1D(n, k) if kind == "conv1d" else nn.Linear(k, n, bias=kind != "linear")
    layer = _layer(base, 8, 0.0, dtype, n_adapters=2 if kind == "two-adapters" else 1,
                   lora_bias=kind == "linear-bias-lora-bias")
    layer.base_layer.requires_grad_(kind == "trainable-base")
    x = torch.randn(3, 7, k, dtype=dtype)
    y_t, dx_t, g_t = _run(layer, x, "torch")
    y_c, dx_c, g_c = _run(layer, x, "cuda")
    assert y_c.dtype == y_t.dtype == dtype
    assert rel_err(y_c, y_t) < TOL[dtype]
    assert rel_err(dx_c, dx_t) < TOL[dtype]
    assert g_c.keys() == g_t.keys() and len(g_t) >= 2
    for name in g_t:
        assert g_c[name].dtype == g_t[name].dtype, name
        assert rel_err(g_c[name], g_t[name]) < 3 * TOL[dtype], name


def test_fp32_adapters_on_a_bf16_base_under_autocast():
    """PEFT's default: fp32 adapter weights (autocast_adapter_dtype) on a bf16 model, trained under autocast."""
    model = pf.get_peft_model(nn.Sequential(nn.Linear(40, 24)).to(torch.bfloat16),
                              pf.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    results = {}
    for backend in ("torch", "cuda"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[backend] = _run(layer, x, backend)
    (y_t, dx_t, g_t), (y_c, dx_c, g_c) = results["torch"], results["cuda"]
    assert rel_err(y_c, y_t) < 1e-2 and rel_err(dx_c, dx_t) < 1e-2
    for name in g_t:
        assert g_c[name].dtype == torch.float32
        assert rel_err(g_c[name], g_t[name]) < 2e-2, name


def test_no_input_grad_gives_only_adapter_grads():
    """The first layer of a frozen model: x needs no grad, so no dx is computed, and A/B grads are still right."""
    layer = _layer(nn.Linear(16, 12), 4, 0.0)
    x = torch.randn(5, 16)
    y_t, dx_t, g_t = _run(layer, x, "torch", x_grad=False)
    y_c, dx_c, g_c = _run(layer, x, "cuda", x_grad=False)
    assert dx_t is None and dx_c is None
    for name in g_t:
        assert rel_err(g_c[name], g_t[name]) < 1e-6, name


def test_dropout_forward_and_grads_use_one_mask():
    """With A = I and B = I the output reads the mask back: y = x Wᵀ + s·drop(x). dA, dB and dx must use that very
    mask (a backward that drew a new one, or forgot 1/(1−p), fails)."""
    torch.manual_seed(3)
    m, k, p = 64, 16, 0.3
    layer = _layer(nn.Linear(k, k, bias=False), k, p)
    layer.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(torch.eye(k))
        b.copy_(torch.eye(k))
    s, w = layer.scaling["default"], layer.base_layer.weight.detach()
    x = torch.randn(m, k, requires_grad=True)
    with ops.use_backend("cuda"):
        y = layer(x)
    dropped = (y.detach() - x.detach() @ w.T) / s  # = drop(x)
    mask = dropped.abs() > 1e-6
    assert 0.55 < mask.float().mean() < 0.85
    assert rel_err(dropped[mask], x.detach()[mask] / (1 - p)) < 1e-6
    assert dropped[~mask].abs().max() < 1e-6
    dy = torch.randn(m, k)
    y.backward(dy)
    xd = x.detach() * mask / (1 - p)
    assert rel_err(b.grad, s * dy.T @ xd) < 1e-6
    assert rel_err(a.grad, s * dy.T @ xd) < 1e-6  # A = B = I: dh = s·dy, dA = dhᵀ drop(x)
    assert rel_err(x.grad, dy @ w + s * dy * mask / (1 - p)) < 1e-6


def test_dropout_is_reproducible_statistically_right_and_keeps_no_dropped_copy():
    m, k, p = 512, 256, 0.1
    layer = _layer(nn.Linear(k, k, bias=False), k, p)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(k))
        layer.lora_B["default"].weight.copy_(torch.eye(k))
    x = torch.randn(m, k, requires_grad=True)

    def mask(seed):
        torch.manual_seed(seed)
        with ops.use_backend("cuda"):
            return (layer(x) - layer.base_layer(x)).detach().abs() > 1e-6

    m1, m2, m3 = mask(1), mask(1), mask(2)
    assert torch.equal(m1, m2)  # torch.manual_seed reproduces the mask
    keep = m1.float()
    sd = (p * (1 - p) / m1.numel()) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    # no row or column far off the keep rate, and a new seed gives an independent mask
    assert (keep.mean(1) - (1 - p)).abs().max() < 6 * (p * (1 - p) / k) ** 0.5
    assert (keep.mean(0) - (1 - p)).abs().max() < 6 * (p * (1 - p) / m) ** 0.5
    agree = (m1 == m3).float().mean().item()
    expected = (1 - p) ** 2 + p**2
    assert abs(agree - expected) < 5 * (expected * (1 - expected) / m1.numel()) ** 0.5
    # what backward keeps: the boolean mask (1 byte per element of x), h (M×r) and s·B (N×r), never drop(x) itself
    r = 4
    small = _layer(nn.Linear(k, k, bias=False), r, p)
    with ops.use_backend("cuda"):
        saved = saved_activation_bytes(lambda: small(x), [x] + list(small.parameters()))
    assert saved == m * k + m * r * 4 + k * r * 4, saved
    with ops.use_backend("torch"):
        saved_torch = saved_activation_bytes(lambda: small(x), [x] + list(small.parameters()))
    assert saved_torch >= m * k * 4  # the torch path (as PEFT) keeps the dropped fp32 copy


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_inference_and_autocast(rows):
    layer = _layer(nn.Linear(24, 12), 8, 0.1).eval()
    x = torch.randn(2, rows, 24)
    y, y16 = no_grad_outputs(layer, x, "cuda")
    y_ref, y16_ref = no_grad_outputs(layer, x, "torch")
    assert rel_err(y, y_ref) < 1e-6
    assert y16.dtype == y16_ref.dtype == torch.bfloat16
    assert rel_err(y16, y16_ref) < 2e-2


def test_auto_mode_takes_it_on_cuda_only_and_hooks_send_calls_to_torch(force_backend, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())  # each run of this test must see its own once-only warning
    layer = _layer(nn.Linear(8, 8), 2, 0.0)
    x = torch.randn(3, 8)
    terms = [layer._adapter_term("default")]
    assert cuda_lora.supports(x, layer.base_layer, terms) == "input not on CUDA"
    assert isinstance(cuda_lora.supports(x, layer.base_layer, terms), dispatch.Skip)
    assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == "torch"
    assert dispatch.AUTO_RULES["linear_with_lora"][0][0] == "cuda"
    force_backend("cuda")
    assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == "cuda"
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    try:
        with pytest.warns(UserWarning, match="forward hooks"):
            assert dispatch.choose("linear_with_lora", x, layer.base_layer, terms) == "torch"
    finally:
        handle.remove()


def test_empty_batch_and_non_contiguous_input():
    layer = _layer(nn.Linear(8, 6), 2, 0.0)
    with ops.use_backend("cuda"):
        assert layer(torch.randn(0, 8)).shape == (0, 6)
        x = torch.randn(8, 5).t()  # stride (1, 5)
        y = layer(x)
    with ops.use_backend("torch"):
        assert rel_err(y, layer(x)) < 1e-6


def test_merged_and_disabled_adapters_do_not_reach_the_fused_path():
    layer = _layer(nn.Linear(10, 7), 3, 0.0)
    x = torch.randn(4, 10)
    with ops.use_backend("torch"):
        ref = layer(x).detach()
    merged = copy.deepcopy(layer)
    merged.merge()
    with ops.use_backend("cuda"):
        assert rel_err(merged(x), ref) < 1e-5
        with torch.no_grad():
            layer.enable_adapters(False)
            assert torch.equal(layer(x), layer.base_layer(x))


def test_eager_calls_take_the_cpp_node_when_it_is_there(autograd_node, force_backend):
    layer = _layer(nn.Linear(16, 12), 4, 0.0)
    force_backend("cuda")
    y = layer(torch.randn(3, 5, 16, requires_grad=True))
    if autograd_node == "cpp-node":  # the C++ node reshapes inside: it is the output's own node, no view around it
        assert "LoraLinearFn" in y.grad_fn.name(), y.grad_fn.name()
    else:  # the Python node works on M×K; the reshape on the way out is the last op
        assert "View" in y.grad_fn.name() and "FusedLoraLinear" in y.grad_fn.next_functions[0][0].name()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpp_node_records_no_graph_when_no_gradient_can_be_asked_for(p, cpp_lora_linear, cpp_lora_add):
    """Under no_grad, inference_mode or with every input frozen, the C++ entry points run the forward bare (no
    autograd node, nothing saved: a decode step's host time) and give the recording call's numbers, dropout included
    (same seed, same mask)."""
    torch.manual_seed(3)
    x, w, bias = torch.randn(2, 5, 16), torch.randn(12, 16), torch.randn(12)
    a, b = torch.randn(4, 16), torch.randn(12, 4)
    base_out = torch.randn(2, 5, 12)

    def both(**grads):
        xs = {k: v.clone().requires_grad_(grads.get(k, False)) for k, v in dict(x=x, a=a).items()}
        torch.manual_seed(11)
        y = cpp_lora_linear(xs["x"], w, bias, xs["a"], b, 0.5, p, False, torch.float32, False)
        torch.manual_seed(11)
        z = cpp_lora_add(xs["x"], base_out, xs["a"], b, 0.5, p, torch.float32, False)
        return y, z

    want_y, want_z = both(a=True)
    assert want_y.grad_fn is not None and want_z.grad_fn is not None
    for context, grads in ((torch.no_grad, dict(a=True)), (torch.inference_mode, dict(x=True)),
                           (contextlib.nullcontext, {})):
        with context():
            y, z = both(**grads)
        assert y.grad_fn is None and z.grad_fn is None, context
        torch.testing.assert_close(y, want_y.detach(), rtol=0, atol=0)
        torch.testing.assert_close(z, want_z.detach(), rtol=0, atol=0)


def test_cpp_node_rounds_an_input_that_sibling_projections_share_once(autograd_node, cpp_lora_linear):
    """q, k and v of one fp32 input under a bf16 compute dtype (a model whose norms are fp32, under autocast): the C++
    node rounds x once and every node saves that one copy, with the numbers and gradients of separate inputs. x
    changed in place, or another tensor, gets its own rounding."""
    if autograd_node != "cpp-node":
        pytest.skip("the C++ node's shared cast")
    torch.manual_seed(5)
    x = torch.randn(6, 32, requires_grad=True)
    ws = [torch.randn(16, 32) for _ in range(3)]
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)

    def node(inp, w):
        return cpp_lora_linear(inp, w, None, a, b, 0.5, 0.0, False, torch.bfloat16, False)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = [node(x, w) for w in ws]
    rounded = [t for t in saved if t.dtype == torch.bfloat16 and t.shape == (6, 32)]
    assert len(rounded) == 3 and len({t.data_ptr() for t in rounded}) == 1
    sum(y.float().sum() for y in ys).backward()
    grad_x, grad_a = x.grad.clone(), a.grad.clone()

    x.grad, a.grad, b.grad = None, None, None
    xs = [x.detach().clone().requires_grad_(True) for _ in ws]
    want = [node(xi, w) for xi, w in zip(xs, ws)]
    sum(y.float().sum() for y in want).backward()
    for got, ref in zip(ys, want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, sum(xi.grad for xi in xs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_a, a.grad, rtol=1e-6, atol=1e-6)

    with torch.no_grad():
        before = node(x, ws[0])
        x.mul_(-2)  # the same tensor, a new version: rounded afresh
        after = node(x, ws[0])
        torch.testing.assert_close(after, node(x.clone(), ws[0]), rtol=0, atol=0)
    assert not torch.equal(before, after)


@pytest.mark.parametrize("bias", [False, True])
def test_torch_compile_of_the_cuda_path_keeps_the_scale(bias, autograd_node, force_backend):
    """Traced, the path is plain torch ops; torch.add(base, low, alpha=scale) once compiled to base + low (scale
    dropped: the bench's HF PEFT gate saw 1.1 relative error). Outputs and adapter grads equal eager ones."""
    if autograd_node == "cpp-node":
        pytest.skip("traced calls never take the C++ node")
    layer = _layer(nn.Linear(32, 24, bias=bias), 4, 0.0)
    force_backend("cuda")
    x = torch.randn(3, 5, 32)
    assert layer.scaling["default"] != 1.0
    y_eager = layer(x)
    y_eager.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True)(x)
    y.square().sum().backward()
    assert rel_err(y, y_eager) < 1e-5
    for got, want in zip([p.grad for p in layer.parameters() if p.requires_grad], grads):
        assert rel_err(got, want) < 1e-4


def _general_path_node_args(layer, x, force_backend, monkeypatch):
    """The arguments the general path (layer checks → dispatch → supports → linear_with_lora) hands the C++ node for
    layer(x), None when it does not call it."""
    seen = []

    def spy(*args):
        seen.append(args)
        return torch.zeros(*x.shape[:-1], args[1].shape[1 if args[7] else 0], dtype=args[8])

    monkeypatch.setattr(cuda_lora, "CPP_LORA_LINEAR", spy)
    with ops.use_backend("cuda"), pytest.MonkeyPatch.context() as m:
        m.setattr(cuda_lora, "eager_layer_call", lambda *a: None)  # the general path only
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(x)
    return seen[0] if seen else None


def _layer_states():
    """(name, layer, x, context) for the states the fast path must take (or leave to the general path)."""
    def lin(**kw):
        return _layer(nn.Linear(12, 10, bias=kw.pop("bias", True)), 4, kw.pop("p", 0.0), **kw)

    states = [("linear", lin(), torch.randn(2, 3, 12), None),
              ("no bias", lin(bias=False), torch.randn(5, 12), None),
              ("conv1d", _layer(Conv1D(10, 12), 4, 0.0), torch.randn(3, 12), None),
              ("dropout train", lin(p=0.1).train(), torch.randn(3, 12), None),
              ("dropout eval", lin(p=0.1).eval(), torch.randn(3, 12), None),
              ("bf16", lin(dtype=torch.bfloat16), torch.randn(3, 12, dtype=torch.bfloat16), None),
              ("autocast", lin(), torch.randn(3, 12), "autocast"),
              ("x dtype differs", lin(), torch.randn(3, 12, dtype=torch.bfloat16), None),
              ("two adapters", lin(n_adapters=2), torch.randn(3, 12), None),
              ("lora bias", lin(lora_bias=True), torch.randn(3, 12), None),
              ("hooked base", lin(), torch.randn(3, 12), "hook"),
              ("tensor scaling", lin(), torch.randn(3, 12), "tensor scaling"),
              ("wrong width", lin(), torch.randn(3, 11), None)]
    return states


@pytest.mark.parametrize("state", range(13))
def test_the_flat_eager_path_makes_the_general_paths_call(state, force_backend, monkeypatch, autograd_node):
    """cuda_lora.eager_node_args (the fast path of LoRA Linear layers on CUDA) hands the node exactly what the general
    path hands it, and leaves to the general path every state that path treats otherwise."""
    name, layer, x, context = _layer_states()[state]
    if context == "hook":
        layer.base_layer.register_forward_hook(lambda *a: None)
    if context == "tensor scaling":
        layer.scaling["default"] = torch.tensor(layer.scaling["default"])
    with contextlib.ExitStack() as stack:
        if context == "autocast":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        fast = cuda_lora.eager_node_args(layer, x)
        if name in ("linear", "no bias", "conv1d", "dropout train", "dropout eval", "bf16", "autocast"):
            general = _general_path_node_args(layer, x, force_backend, monkeypatch)
            assert fast is not None and general is not None and len(fast) == len(general)
            for got, want in zip(fast, general):
                assert got is want or got == want, (name, got, want)
        else:
            assert fast is None, name
        with ops.use_backend("torch"):  # a forced backend always takes the general path
            assert cuda_lora.eager_node_args(layer, x) is None


def test_out_of_memory_in_the_node_is_not_a_kernel_failure(monkeypatch):
    """call_node retries a failing kernel call on the ATen route and then turns the kernels off; running out of
    memory is no such failure (the ATen route may well fit where the kernels did not): it propagates, and the
    kernels stay on."""
    monkeypatch.setattr(dispatch, "_KERNELS_FAILED", None)
    calls = []

    def node(*args):
        calls.append(args[-1])
        if args[-1]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(1)

    with pytest.raises(torch.OutOfMemoryError):
        dispatch.call_node(node, "x", True)
    assert calls == [True] and dispatch._KERNELS_FAILED is None


def test_failing_fused_kernels_turn_off_only_the_kernels(autograd_node, monkeypatch):
    """A node call whose fused kernels raise (a GPU they were not built for) runs again on the node's ATen route:
    the same numbers, one warning, the kernels off from then on — and the cuda backend still on."""
    if autograd_node != "cpp-node":
        pytest.skip("the C++ node's kernels argument")
    real, calls = cuda_lora.CPP_LORA_LINEAR, []

    def node(*args):
        calls.append(args[-1])
        if args[-1]:
            raise RuntimeError("peft_fast LoRA kernel (forward) failed: no kernel image is available")
        return real(*args)

    monkeypatch.setattr(cuda_lora, "CPP_LORA_LINEAR", node)
    monkeypatch.setattr(dispatch, "_KERNELS_FAILED", None)
    layer = _layer(nn.Linear(16, 8), 4, 0.0)
    x = torch.randn(5, 16)
    want = _run(layer, x, "torch")
    assert dispatch.fused_kernels_for(x, 8, 4)
    with pytest.warns(UserWarning, match="fused CUDA LoRA kernels failed here.*no kernel image"):
        got = _run(layer, x, "cuda")
    assert calls == [True, False] and not dispatch.fused_kernels_for(x, 8, 4)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b)
    _run(layer, x, "cuda")
    assert calls == [True, False, False]  # no second try of the kernels, no second warning
    assert ("linear_with_lora", "cuda") not in dispatch._FAILED
    with dispatch.use_cuda_kernels("on"), pytest.raises(RuntimeError, match="no kernel image"):
        _run(layer, x, "cuda")  # kernels forced on: their own error, not hidden
