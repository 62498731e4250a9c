"""The cuda backend of quantized_linear_with_lora for training (ops/cuda_qlora.py): bitsandbytes' base output plus
the LoRA term as one C++ autograd node (csrc/lora_autograd.cpp `lora_add`), built here for the CPU and forced,
against the torch path (PEFT's arithmetic) on the same quantized model. The GPU tests run it at real sizes."""


import pytest
import torch

import peft_fast as pf
from peft_fast import ops
from peft_fast.ops import cuda_qlora, dispatch
from models import quantize_linears, rel_err, tiny_llama

pytest.importorskip("bitsandbytes")

QUANT = {"nf4-fp32": dict(bits=4, quant_type="nf4"),
         "nf4-bf16-double": dict(bits=4, quant_type="nf4", compute_dtype=torch.bfloat16, compress_statistics=True),
         "int8": dict(bits=8)}


@pytest.fixture(autouse=True)
def cpp_node(cpp_lora_add, monkeypatch):
    monkeypatch.setattr(cuda_qlora, "CPP_LORA_ADD", cpp_lora_add)


def _model(quant, dropout=0.0, **cfg):
    torch.manual_seed(0)
    base = quantize_linears(tiny_llama(), **quant)
    config = pf.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, **cfg)
    model = pf.get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 would hide a wrong low-rank term
            torch.nn.init.normal_(param, std=0.1)
    return model


def _step(model, backend, autocast=None):
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with ops.use_backend(backend), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach().float(), grads


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["no-autocast", "bf16-autocast"])
@pytest.mark.parametrize("quant", list(QUANT.values()), ids=list(QUANT))
def test_node_path_matches_the_torch_path(quant, autocast):
    model = _model(quant)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    terms = [layer._adapter_term("default")]
    with ops.use_backend("cuda"), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        assert dispatch.choose("quantized_linear_with_lora", x, layer.base_layer, terms) == "cuda"
    calls = []
    real = cuda_qlora.CPP_LORA_ADD
    cuda_qlora.CPP_LORA_ADD = lambda *a: calls.append(1) or real(*a)
    got = _step(model, "cuda", autocast)
    cuda_qlora.CPP_LORA_ADD = real
    want = _step(model, "torch", autocast)
    assert len(calls) == 14  # every projection of both layers, whatever dtype bitsandbytes returns
    tol = 1e-5 if autocast is None else 3e-2
    assert rel_err(got[0], want[0]) < tol
    assert got[1].keys() == want[1].keys() and len(got[1]) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for key in want[1]:
        assert rel_err(got[1][key], want[1][key]) < 3 * tol, key


def test_node_gets_grads_to_the_input_and_the_base_output():
    model = _model(QUANT["nf4-fp32"])
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features)
    results = []
    for backend in ("cuda", "torch"):
        xi = x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            y = layer(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        results.append((y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone()))
        layer.zero_grad(set_to_none=True)
    (y_c, dx_c, da_c), (y_t, dx_t, da_t) = results
    assert y_c.shape == (2, 5, layer.out_features)
    for a, b in ((y_c, y_t), (dx_c, dx_t), (da_c, da_t)):
        assert rel_err(a, b) < 1e-5


def test_dropout_is_reproducible_and_keeps_the_right_share():
    model = _model(QUANT["nf4-fp32"], dropout=0.5)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    layer.lora_B["default"].weight.data.copy_(torch.eye(*layer.lora_B["default"].weight.shape))
    x = torch.randn(64, layer.in_features)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with ops.use_backend("cuda"):
            outs.append(layer(x).detach())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    with ops.use_backend("torch"), torch.no_grad():
        layer.eval()
        no_drop = layer(x)
        layer.train()
    assert 0.5 < rel_err(outs[0], no_drop) and rel_err(outs[0], no_drop) < 5  # a mask, not the identity


def test_not_taken_on_cpu_in_auto_mode_nor_without_the_extension(monkeypatch):
    model = _model(QUANT["nf4-fp32"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x, terms = torch.randn(3, layer.in_features), [layer._adapter_term("default")]
    assert dispatch.choose("quantized_linear_with_lora", x, layer.base_layer, terms) == "torch"
    monkeypatch.setattr(cuda_qlora, "CPP_LORA_ADD", None)
    with ops.use_backend("cuda"):
        assert dispatch.choose("quantized_linear_with_lora", x, layer.base_layer, terms) == "torch"


# ---- the flat QLoRA node (ops/cuda_qlora.py eager_qlora_call: one C++ node for a whole Linear4bit layer), here its
# CPU build (ATen route: dequantization from ATen ops); the GPU tests run its kernels
QUANT4 = {"nf4": dict(quant_type="nf4", compute_dtype=torch.bfloat16),
          "nf4-double": dict(quant_type="nf4", compute_dtype=torch.bfloat16, compress_statistics=True),
          "fp4-double": dict(quant_type="fp4", compute_dtype=torch.bfloat16, compress_statistics=True)}


def _q_layer(quant, p=0.0, bias=False, k=96, n=80):
    torch.manual_seed(0)
    base = quantize_linears(torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias)), bits=4, **quant)
    model = pf.get_peft_model(base, pf.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=p))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)  # a clear share of y
    return layer


@pytest.fixture
def qlora_node(cpp_qlora_linear, monkeypatch):
    monkeypatch.setattr(cuda_qlora, "CPP_QLORA_LINEAR", cpp_qlora_linear)
    return cpp_qlora_linear


@pytest.mark.parametrize("quant", list(QUANT4.values()), ids=list(QUANT4))
def test_qlora_node_dequantizes_as_bitsandbytes(quant, qlora_node, monkeypatch):
    """y = I·Wᵀ with no LoRA term is W itself: bit for bit bitsandbytes' dequantization (peft_fast's copy of it)."""
    from peft_fast.quantization import dequantize_4bit

    layer = _q_layer(quant)
    layer.lora_B["default"].weight.data.zero_()
    monkeypatch.setattr(dispatch, "QLORA_NODE_MIN_ROWS", 1)
    x = torch.eye(96, dtype=torch.bfloat16)
    args = cuda_qlora.qlora_node_args(layer, x)
    assert args is not None
    weight = layer.base_layer.weight
    want = dequantize_4bit(weight.data, weight.quant_state, torch.bfloat16)
    assert torch.equal(qlora_node(*args).t(), want)


@pytest.mark.parametrize("case", ["bf16", "bf16-dropout", "fp32-input-autocast"])
@pytest.mark.parametrize("quant", list(QUANT4.values()), ids=list(QUANT4))
def test_qlora_node_matches_the_torch_path(quant, case, qlora_node):
    """Output and the gradients of x, A and B against the torch path (PEFT's arithmetic over bitsandbytes), with a
    bias, dropout, and a prepared model's fp32 input under bf16 autocast; under no_grad the same output, no node."""
    layer = _q_layer(quant, p=0.25 if case == "bf16-dropout" else 0.0, bias=True)
    layer.train()
    x_dtype = torch.float32 if case == "fp32-input-autocast" else torch.bfloat16
    x = torch.randn(2, 300, 96, dtype=x_dtype)  # 600 rows: over QLORA_NODE_MIN_ROWS
    dy = torch.randn(2, 300, 80, dtype=x_dtype)

    def run(node: bool):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x_dtype == torch.float32):
            torch.manual_seed(5)
            if node:
                args = cuda_qlora.qlora_node_args(layer, xi)
                assert args is not None and args[16] == torch.bfloat16
                y = qlora_node(*args).to(x_dtype)
            else:
                with ops.use_backend("torch"):
                    y = layer(xi)
        y.backward(dy)
        out = (y.detach().float(), xi.grad.float(), layer.lora_A["default"].weight.grad.clone(),
               layer.lora_B["default"].weight.grad.clone())
        layer.zero_grad(set_to_none=True)
        return out

    got, want = run(True), run(False)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert rel_err(a, b) < 2e-2, name
    if case == "bf16":
        with torch.no_grad():
            y = qlora_node(*cuda_qlora.qlora_node_args(layer, x))
        assert y.grad_fn is None and torch.equal(y.float(), got[0])


def test_qlora_node_is_taken_only_in_the_common_case(qlora_node):
    layer = _q_layer(QUANT4["nf4-double"])
    x = torch.randn(600, 96, dtype=torch.bfloat16)
    assert cuda_qlora.qlora_node_args(layer, x) is not None
    assert cuda_qlora.qlora_node_args(layer, x[:dispatch.QLORA_NODE_MIN_ROWS - 1]) is None  # prefill: bitsandbytes
    # decode (≤ QLORA_GEMV_MAX_ROWS rows): the node's 4-bit GEMM, but only for a call that records no graph
    decode = x[:dispatch.QLORA_GEMV_MAX_ROWS]
    assert cuda_qlora.qlora_node_args(layer, decode) is None  # the adapters are trainable: a graph would be recorded
    with torch.no_grad():
        assert cuda_qlora.qlora_node_args(layer, decode) is not None
        assert cuda_qlora.qlora_node_args(layer, decode[:1]) is not None
        assert cuda_qlora.qlora_node_args(layer, x[:dispatch.QLORA_GEMV_MAX_ROWS + 1]) is None
        with ops.use_cuda_kernels(False):  # the GEMM is a kernel: without kernels, bitsandbytes' own
            assert cuda_qlora.qlora_node_args(layer, decode) is None
    assert cuda_qlora.qlora_node_args(layer, x.float()) is None  # fp32 compute, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cuda_qlora.qlora_node_args(layer, x.float())[16] == torch.bfloat16
    with ops.use_backend("cuda"):  # a forced backend takes the general path
        assert cuda_qlora.qlora_node_args(layer, x) is None
    layer.enable_adapters(False)
    assert cuda_qlora.qlora_node_args(layer, x) is None
    layer.enable_adapters(True)
    with pytest.warns(UserWarning, match="rounding errors"):
        layer.merge()
    assert cuda_qlora.qlora_node_args(layer, x) is None
    layer.unmerge()
    assert cuda_qlora.qlora_node_args(layer, x) is not None
    layer.base_layer.compute_dtype = torch.float32  # bitsandbytes would compute x·Wᵀ in fp32 without autocast
    assert cuda_qlora.qlora_node_args(layer, x) is None
    int8 = _model(QUANT["int8"]).base_model.model.model.layers[0].self_attn.q_proj
    assert cuda_qlora.qlora_node_args(int8, torch.randn(600, int8.in_features)) is None


def test_qlora_node_refuses_inconsistent_arguments(qlora_node, monkeypatch):
    layer = _q_layer(QUANT4["nf4-double"])
    x = torch.randn(600, 96, dtype=torch.bfloat16)
    args = list(cuda_qlora.qlora_node_args(layer, x))
    for index, value, message in ((10, 81, "packed weight holds"), (6, args[6][:-1], "absmax must hold"),
                                  (0, x[:, :95], "x has 95 features"), (9, None, "double quantization needs")):
        bad = list(args)
        bad[index] = value
        with pytest.raises(RuntimeError, match=message):
            qlora_node(*bad)


def test_a_failing_qlora_node_hands_over_to_bitsandbytes_once_but_out_of_memory_propagates(monkeypatch):
    """The flat path's safety net: a node error (say its dequantization kernel has no image for this GPU) warns once
    and leaves every later call to the general path; running out of memory is the caller's to see."""
    layer = _q_layer(QUANT4["nf4"])
    x = torch.randn(600, 96, dtype=torch.bfloat16)
    monkeypatch.setattr(cuda_qlora, "_QLORA_NODE_FAILED", None)
    args = cuda_qlora.qlora_node_args(layer, x)
    assert args is not None
    monkeypatch.setattr(cuda_qlora, "qlora_node_args", lambda *a: args)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # (the flat path's first check)

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cuda_qlora, "CPP_QLORA_LINEAR", oom)
    with pytest.raises(torch.OutOfMemoryError):
        cuda_qlora.eager_qlora_call(layer, x)
    assert cuda_qlora._QLORA_NODE_FAILED is None

    def broken(*args):
        raise RuntimeError("peft_fast LoRA kernel (dequantize 4-bit) failed: no kernel image is available")

    monkeypatch.setattr(cuda_qlora, "CPP_QLORA_LINEAR", broken)
    with pytest.warns(UserWarning, match="QLoRA node failed here.*no kernel image"):
        assert cuda_qlora.eager_qlora_call(layer, x) is None
    assert cuda_qlora.eager_qlora_call(layer, x) is None  # off from now on, no second warning needed
    assert "no kernel image" in cuda_qlora._QLORA_NODE_FAILED
