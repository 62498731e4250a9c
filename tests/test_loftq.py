"""LoftQ initialization (init_lora_weights="loftq") against its definition.

HF PEFT's LoftQ runs only on CUDA (it moves the weight to "cuda" to quantize it), so the CPU suite checks the
definition: the base weight becomes bitsandbytes' quantize → dequantize of it (NF4 blocksize 64, or row-wise int8),
B·A the best rank-r approximation of what quantization lost, A and B unscaled (as PEFT sets them); the config and
its saved form are PEFT's."""

import copy
import json

import peft as ref
import pytest
import torch

import peft_fast as pf
from peft_fast import quantization as Q
from models import quantize_linears, rel_err, tiny_gpt2, tiny_llama


def _quantized(weight, bits):
    """bitsandbytes' quantize → dequantize, computed here: NF4 through peft_fast.quantization (bit-identical to
    bitsandbytes, tests/test_quantization.py), int8 row-wise from its definition."""
    if bits == 4:
        packed, state = Q.quantize_4bit(weight.float(), blocksize=64, quant_type="nf4")
        return Q.dequantize_4bit(packed, state, dtype=torch.float32)
    scale = weight.float().abs().amax(dim=1, keepdim=True)
    return torch.round(weight.float() / scale * 127) * scale / 127


def _best_rank(matrix, r):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_base_is_the_quantized_weight_and_the_adapter_its_best_rank_r_correction(bits):
    torch.manual_seed(0)
    base = tiny_llama()
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("q_proj", "down_proj"))}
    config = pf.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights="loftq",
                           loftq_config=pf.LoftQConfig(loftq_bits=bits, loftq_iter=1))
    model = pf.get_peft_model(base, config)
    assert config.loftq_config == {"loftq_bits": bits, "loftq_iter": 1}
    for name, weight in originals.items():
        layer = model.base_model.model.get_submodule(name)
        quantized = _quantized(weight, bits)
        assert torch.allclose(layer.get_base_layer().weight, quantized, rtol=1e-6, atol=1e-7), name
        product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert rel_err(product, _best_rank(weight - quantized, 4)) < 1e-4, name
        assert torch.linalg.norm(weight - quantized - product) < 0.9 * torch.linalg.norm(weight - quantized)


def test_more_loftq_iterations_leave_less_error():
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    errors = []
    for iters in (1, 5):
        base = torch.nn.Sequential(torch.nn.Linear(96, 64, bias=False))
        base[0].weight.data = weight.clone()
        config = pf.LoraConfig(r=8, lora_alpha=8, target_modules=["0"], init_lora_weights="loftq",
                               loftq_config={"loftq_bits": 4, "loftq_iter": iters})
        layer = pf.get_peft_model(base, config).base_model.model[0]
        approx = layer.get_base_layer().weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        errors.append(torch.linalg.norm(weight - approx).item())
    assert errors[1] < errors[0]


def test_loftq_on_a_conv1d_base_keeps_its_in_by_out_layout():
    torch.manual_seed(0)
    base = tiny_gpt2()
    weight = base.transformer.h[0].attn.c_attn.weight.detach().clone()  # in × out
    model = pf.get_peft_model(base, pf.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights="loftq", loftq_config={"loftq_bits": 4}))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.get_base_layer().weight.shape == weight.shape
    assert torch.allclose(layer.get_base_layer().weight, _quantized(weight.T, 4).T, rtol=1e-6, atol=1e-7)
    assert layer.lora_A["default"].weight.shape == (2, weight.shape[0])


def test_loftq_config_checks_and_its_saved_form_load_in_peft(tmp_path):
    with pytest.raises(ValueError, match="`loftq_config` must be specified"):
        pf.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits 4 or 8"):
        pf.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    with pytest.raises(TypeError, match="`loftq_config` must be a LoftQConfig or a dict, got str"):
        pf.LoraConfig(init_lora_weights="loftq", loftq_config="4bit")
    config = pf.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq",
                           loftq_config=pf.LoftQConfig(loftq_iter=2))
    config.save_pretrained(tmp_path)
    assert vars(pf.LoftQConfig()) == vars(ref.LoftQConfig())
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2} and saved["init_lora_weights"] == "loftq"
    pytest.importorskip("scipy")  # (HF PEFT asks for it with LoftQ; CI installs it, the GPU machine may not have it)
    assert ref.LoraConfig.from_pretrained(tmp_path).loftq_config == {"loftq_bits": 4, "loftq_iter": 2}


def test_loftq_on_an_already_quantized_base_is_refused_and_the_model_unchanged():
    base = quantize_linears(tiny_llama(), bits=4)
    state = copy.deepcopy(base.state_dict())
    before = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match="LoftQ starts from a full-precision weight"):
        pf.get_peft_model(base, pf.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq",
                                              loftq_config={"loftq_bits": 4}))
    assert [(n, type(m)) for n, m in base.named_modules()] == before
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
