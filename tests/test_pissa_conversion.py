"""save_pretrained(path_initial_model_for_weight_conversion=...): a trained PiSSA / OLoRA adapter saved as the plain
LoRA adapter it amounts to on the original base model; the same files as HF PEFT writes."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import peft_fast as pf
from models import inputs_for, save_trained_and_converted, tiny_llama


def _logits(model):
    with torch.no_grad():
        return model(**inputs_for("llama")).logits


def _pissa_run(lib, base, tmp_path, init):
    torch.manual_seed(0)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    model = lib.get_peft_model(copy.deepcopy(base), config).eval()
    return model, save_trained_and_converted(model, str(tmp_path))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_on_the_original_base_matches_the_trained_model(tmp_path, init):
    base = tiny_llama().eval()
    model, out = _pissa_run(pf, base, tmp_path, init)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    assert model.peft_config["default"].r == 4  # the model's own config is untouched
    assert list(model.peft_config) == ["default"]  # the initial adapter was loaded only for the computation
    plain = pf.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()  # on the ORIGINAL weights
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-4, atol=1e-4)
    assert json.load(open(tmp_path / "initial" / "adapter_config.json"))["init_lora_weights"] is True


def test_same_files_as_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    _, ours = _pissa_run(pf, base, tmp_path / "ours", "pissa")
    _, theirs = _pissa_run(peft, base, tmp_path / "peft", "pissa")
    a, b = load_file(os.path.join(ours, "adapter_model.safetensors")), load_file(
        os.path.join(theirs, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    ca, cb = (json.load(open(os.path.join(p, "adapter_config.json"))) for p in (ours, theirs))
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert ca[key] == cb[key], key


def test_unsupported_conversions_raise(tmp_path):
    base = tiny_llama()
    model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(r=4, target_modules=["q_proj"], use_rslora=True,
                                                                  rank_pattern={"q_proj": 2}))
    with pytest.raises(ValueError, match="rank_pattern"):
        model.save_pretrained(str(tmp_path / "x"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    pissa = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="weights"):  # no initial adapter there: says so, saves nothing
        pissa.save_pretrained(str(tmp_path / "y"), path_initial_model_for_weight_conversion=str(tmp_path / "none"))
    assert list(pissa.peft_config) == ["default"] and not os.path.exists(tmp_path / "y" / "adapter_model.safetensors")


def test_subtract_mutated_init_matches_peft(tmp_path):
    """LoraModel.subtract_mutated_init (PEFT's method behind the conversion): the trained adapter's tensors joined
    with those of the initial adapter loaded beside it, the same as PEFT's, and the same as the saved conversion."""
    peft = pytest.importorskip("peft")
    base = tiny_llama().eval()
    joined = []
    for lib, folder in ((pf, tmp_path / "ours"), (peft, tmp_path / "peft")):
        model, converted = _pissa_run(lib, base, folder, "pissa")
        model.load_adapter(str(folder / "initial"), adapter_name="initial")
        trained = lib.get_peft_model_state_dict(model, adapter_name="default")
        joined.append(model.base_model.subtract_mutated_init(trained, "initial", {}))
        assert torch.equal(joined[-1][next(iter(joined[-1]))],
                           load_file(os.path.join(converted, "adapter_model.safetensors"))[next(iter(joined[-1]))])
    ours, theirs = joined
    assert sorted(ours) == sorted(theirs) and any("lora_B" in k for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)
