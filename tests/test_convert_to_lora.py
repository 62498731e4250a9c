"""convert_to_lora / save_as_lora: LoHa, LoKr (and LoRA) adapters approximated by a LoRA of rank r, against the
definition (B·A = the best rank-r approximation of each ΔW) and against HF PEFT's conversion and loading."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import EmbConv, randomize_adapters, rel_err, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(lib, kind="loha", base=None, **cfg):
    torch.manual_seed(0)
    base = tiny_llama() if base is None else base
    config = {"loha": lib.LoHaConfig, "lokr": lib.LoKrConfig, "lora": lib.LoraConfig}[kind]
    model = lib.get_peft_model(base, config(**{"r": 4, "target_modules": TARGETS, **cfg}))
    randomize_adapters(model, scale=0.3)
    for name, param in model.named_parameters():  # (LoHa / LoKr weights: randomize_adapters knows lora_* only)
        if "hada_" in name or "lokr_" in name:
            with torch.no_grad():
                param.copy_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def _best_rank(matrix, r):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_each_layer_becomes_the_best_rank_r_approximation_of_its_delta(kind):
    model = _model(pf, kind)
    config, state = pf.convert_to_lora(model, rank=3)
    assert (config.r, config.lora_alpha, config.rank_pattern) == (3, 3, {})
    layers = [(n, m) for n, m in model.named_modules() if n.endswith(tuple(TARGETS))]
    assert len(layers) == 6 and len(state) == 12
    for name, layer in layers:
        product = state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]
        assert rel_err(product, _best_rank(layer.get_delta_weight("default"), 3)) < 1e-5, name


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_full_rank_conversion_gives_the_same_model_in_hf_peft(kind, tmp_path):
    model = _model(pf, kind)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    pf.save_as_lora(tmp_path, model, rank=1.0)  # all of each ΔW's energy: each layer's full rank
    torch.manual_seed(0)
    loaded = ref.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_a_float_rank_keeps_that_share_of_each_layer_s_energy_as_hf_peft_does():
    ours, theirs = _model(pf), _model(ref)
    ours.load_state_dict(theirs.state_dict())
    (config, state), (ref_config, ref_state) = pf.convert_to_lora(ours, 0.8), ref.convert_to_lora(theirs, 0.8)
    assert config.rank_pattern == ref_config.rank_pattern and config.alpha_pattern == ref_config.alpha_pattern
    assert len(set(config.rank_pattern.values())) > 1  # the layers really differ
    assert state.keys() == ref_state.keys()
    for key in state:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            assert rel_err(state[b] @ state[key], ref_state[b] @ ref_state[key]) < 1e-5, key
    for name, layer in ours.named_modules():
        if name.endswith(tuple(TARGETS)):
            s = torch.linalg.svdvals(layer.get_delta_weight("default")).square()
            k = config.rank_pattern[name.removeprefix("base_model.model.")]
            assert s[:k].sum() >= 0.8 * s.sum() > s[:k - 1].sum()


def test_conv1d_layers_keep_their_layout():
    torch.manual_seed(0)  # (LoRA to LoRA: LoHa and LoKr do not take transformers' Conv1D)
    model = _model(pf, "lora", base=tiny_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        config, state = pf.convert_to_lora(model, rank=2)
    lora = pf.get_peft_model(tiny_gpt2(), pf.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"],
                                                         fan_in_fan_out=True))
    pf.set_peft_model_state_dict(lora, state)
    for name, layer in model.named_modules():
        if name.endswith("c_attn"):
            converted = lora.get_submodule(name).get_delta_weight("default")
            assert rel_err(converted, _best_rank(layer.get_delta_weight("default"), 2)) < 1e-5


def test_what_cannot_be_converted_is_refused_and_nothing_changes():
    dora = _model(pf, "lora", use_dora=True)
    before = copy.deepcopy(dora.state_dict())
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        pf.convert_to_lora(dora, rank=2)
    assert all(torch.equal(v, before[k]) for k, v in dora.state_dict().items())
    with pytest.raises(TypeError, match="do not support LoRA conversion"):  # (conv layers)
        pf.convert_to_lora(_model(pf, "loha", base=EmbConv(), target_modules=["conv2d", "lin"]), rank=2)
    for bad in (0, 1.5, True, "4"):
        with pytest.raises(ValueError, match="rank"):
            pf.convert_to_lora(_model(pf), rank=bad)
    with pytest.raises(ValueError, match="larger than the weight shape"):
        pf.convert_to_lora(_model(pf), rank=33)
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        pf.convert_to_lora(_model(pf, "lora"), rank=2)
