"""The cuda backend of quantized_linear_with_lora for training (ops/cuda_qlora.py): bitsandbytes' base output plus
the LoRA term as one C++ autograd node (csrc/lora_autograd.cpp `lora_add`), built here for the CPU and forced,
against the torch path (PEFT's arithmetic) on the same quantized model. The GPU tests run it at real sizes."""

import copy

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
