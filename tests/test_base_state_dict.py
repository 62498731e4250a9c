"""get_base_model_state_dict / set_base_model_state_dict: the base model's tensors under its own keys, as HF PEFT."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import tiny_llama

CONFIGS = {
    "lora": lambda lib: lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "dora+seq_cls": lambda lib: lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"], use_dora=True),
    "loha": lambda lib: lib.LoHaConfig(r=4, target_modules=["q_proj", "down_proj"]),
    "prompt": lambda lib: lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


def _pair(kind):
    torch.manual_seed(0)
    base = tiny_llama(num_labels=3) if "seq_cls" in kind else tiny_llama()
    plain = copy.deepcopy(base)
    return plain, pf.get_peft_model(copy.deepcopy(base), CONFIGS[kind](pf)), \
        ref.get_peft_model(copy.deepcopy(base), CONFIGS[kind](ref))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_base_state_dict_has_the_bare_model_keys_and_tensors(kind):
    plain, ours, theirs = _pair(kind)
    got = pf.get_base_model_state_dict(ours)
    assert list(got) == list(ref.get_base_model_state_dict(theirs)) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_set_base_state_dict_loads_base_weights_and_leaves_adapters(kind):
    _, ours, theirs = _pair(kind)
    torch.manual_seed(1)
    new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in pf.get_base_model_state_dict(ours).items()}
    adapters = {k: v.clone() for k, v in pf.get_peft_model_state_dict(ours, save_embedding_layers=False).items()}
    result = pf.set_base_model_state_dict(ours, new)
    assert list(result.missing_keys) == list(result.unexpected_keys) == []
    for key, value in pf.get_base_model_state_dict(ours).items():
        assert torch.equal(value, new[key]), key
    for key, value in pf.get_peft_model_state_dict(ours, save_embedding_layers=False).items():
        assert torch.equal(value, adapters[key]), key
    if kind != "prompt":  # strict: the same message as HF PEFT, nothing loaded
        bad = dict(new)
        first = next(iter(bad))
        bad["not.a.key"] = bad.pop(first)
        with pytest.raises(RuntimeError) as mine:
            pf.set_base_model_state_dict(ours, bad)
        with pytest.raises(RuntimeError) as peft_error:
            ref.set_base_model_state_dict(theirs, bad)
        assert str(mine.value) == str(peft_error.value)
        loose = pf.set_base_model_state_dict(ours, bad, strict=False)
        assert loose.missing_keys == [first] and loose.unexpected_keys == ["not.a.key"]
