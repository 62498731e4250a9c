"""KaSA (kasa_config) against HF PEFT: the same truncated base weights, lora_diag and outputs from the same seed,
the same files both ways, the same merge and regularisation loss; what KaSA cannot do refused."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import randomize_adapters, rel_err, tiny_gpt2, tiny_llama

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def _pair(kasa=None):
    torch.manual_seed(0)
    base = tiny_llama()
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        config = lib.LoraConfig(**CFG, kasa_config=lib.tuners.lora.KasaConfig(**(kasa or {})))
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    return base, models


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_kasa_matches_peft_truncation_outputs_merge_and_loss(tmp_path):
    base, (theirs, ours) = _pair(dict(beta=0.01, gamma=0.1))
    state, ref_state = ours.state_dict(), theirs.state_dict()
    assert list(state) == list(ref_state)  # base weights (truncated), A, B and lora_diag under the same keys
    for key, value in ref_state.items():
        assert torch.allclose(state[key], value, atol=1e-6), key
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    original = base.model.layers[0].self_attn.q_proj.weight
    s_before = torch.linalg.svdvals(original)
    s_after = torch.linalg.svdvals(q.get_base_layer().weight)
    assert torch.allclose(s_after[:-4], s_before[:-4], atol=1e-5) and s_after[-4:].abs().max() < 1e-5  # r dropped
    randomize_adapters(theirs)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.tensor([[1, 5, 9, 13, 2], [3, 4, 5, 6, 7]])
    want = _logits(theirs, ids)
    assert rel_err(_logits(ours, ids), want) < 1e-6
    assert abs(float(ours.base_model._get_kasa_loss()) - float(theirs.base_model._get_kasa_loss())) < 1e-5
    assert float(ours.base_model._get_kasa_loss()) > 0
    # files both ways
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    from safetensors.torch import load_file

    files = [load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("ours", "theirs")]
    assert sorted(files[0]) == sorted(files[1]) and any(k.endswith("q_proj.lora_diag") for k in files[0])
    for source, lib in ((tmp_path / "theirs", pf), (tmp_path / "ours", ref)):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(source))
        assert rel_err(_logits(loaded, ids), want) < 1e-6, (source, lib.__name__)
    # merging adds s·B·diag·A into the truncated weight
    merged = ours.merge_and_unload()
    assert rel_err(_logits(merged, ids), want) < 1e-5


def test_kasa_loaded_with_low_cpu_mem_usage_truncates_at_the_first_forward(tmp_path):
    base, (theirs, _) = _pair()
    randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    want = _logits(theirs, ids)
    ours = pf.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), low_cpu_mem_usage=True)
    assert rel_err(_logits(ours, ids), want) < 1e-5  # the first forward: truncated now, its output corrected
    assert rel_err(_logits(ours, ids), want) < 1e-5


def test_kasa_refusals():
    with pytest.raises(ValueError, match="`beta` must be non-negative"):
        pf.KasaConfig(beta=-1)
    kasa = pf.KasaConfig()
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        pf.get_peft_model(tiny_gpt2(), pf.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True,
                                                     kasa_config=kasa))
    with pytest.raises(ValueError, match="Embedding does not support KaSA"):
        pf.get_peft_model(tiny_llama(), pf.LoraConfig(target_modules=["embed_tokens"], kasa_config=kasa))
    with pytest.raises(ValueError, match="smaller than min"):
        pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=32, target_modules=["q_proj"], kasa_config=kasa))
    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(**CFG, kasa_config=kasa))
    with pytest.raises(ValueError, match="KaSA cannot be combined with adapters that don't use KaSA"):
        model.add_adapter("plain", pf.LoraConfig(**CFG))
    with pytest.raises(ValueError, match="KaSA adapter"):
        model.eval()(input_ids=torch.tensor([[1, 2]]), adapter_names=["default"])
    assert model.base_model.model.model.layers[0].self_attn.q_proj.supports_lora_conversion("default") is False
