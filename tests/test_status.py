"""get_layer_status / get_model_status report what HF PEFT reports, for consistent and for inconsistent models."""

import copy
import dataclasses

import peft as ref
import pytest
import torch
from torch import nn

import peft_fast as pf
from models import MLP, tiny_llama


def _as_dicts(statuses):
    return [dataclasses.asdict(s) for s in statuses]


def _both(build):
    """(peft_fast model, HF PEFT model) made by build(library, base copy) from one base model."""
    torch.manual_seed(0)
    base = build.base()
    return build(pf, copy.deepcopy(base)), build(ref, copy.deepcopy(base))


def _lora_two_adapters(lib, base):
    model = lib.get_peft_model(base, lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    return model


_lora_two_adapters.base = tiny_llama


def _seq_cls(lib, base):
    return lib.get_peft_model(base, lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))


_seq_cls.base = lambda: tiny_llama(num_labels=3)


def _layer(model, name):
    return dict(model.named_modules())[name]


# the same change made to both models: each leaves some layers disagreeing with the others
def _merge_one(model):
    _layer(model, "base_model.model.model.layers.0.self_attn.q_proj").merge(["default"])


def _disable_one(model):
    _layer(model, "base_model.model.model.layers.1.self_attn.v_proj").enable_adapters(False)


def _freeze_one_param(model):
    _layer(model, "base_model.model.model.layers.0.mlp.down_proj").lora_B["default"].weight.requires_grad_(False)


def _switch_adapter(model):
    model.set_adapter("other")


def _to_meta_device_name(model):  # a second device type for one adapter, without a GPU
    layer = _layer(model, "base_model.model.model.layers.1.self_attn.k_proj")
    layer.lora_A["other"].weight = nn.Parameter(layer.lora_A["other"].weight.to("meta"))


@pytest.mark.parametrize("change", [None, _merge_one, _disable_one, _freeze_one_param, _switch_adapter,
                                    _to_meta_device_name])
def test_lora_model_status_matches_peft(change):
    ours, theirs = _both(_lora_two_adapters)
    if change is not None:
        change(ours)
        change(theirs)
    assert _as_dicts(ours.get_layer_status()) == _as_dicts(theirs.get_layer_status())
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())
    assert dataclasses.asdict(pf.get_model_status(ours)) == dataclasses.asdict(ref.get_model_status(theirs))
    if change in (_merge_one, _disable_one, _freeze_one_param):  # the inconsistency is reported, not hidden
        field = {_merge_one: "merged_adapters", _disable_one: "enabled"}.get(change)
        status = ours.get_model_status()
        assert (status.requires_grad["default"] if field is None else getattr(status, field)) == "irregular"


def test_modules_to_save_wrappers_are_reported_like_peft():
    ours, theirs = _both(_seq_cls)
    layers = _as_dicts(pf.get_layer_status(ours))
    assert layers == _as_dicts(ref.get_layer_status(theirs))
    assert "ModulesToSaveWrapper" in {s["module_type"] for s in layers}
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())


@pytest.mark.parametrize("base", [MLP, tiny_llama])
def test_injected_adapters_outside_a_peft_model(base):
    """A plain nn.Module reports base_model_type "other", a transformers model its class; no adapter model."""
    torch.manual_seed(0)
    plain = base()
    target = ["lin0"] if base is MLP else ["q_proj"]
    ours = pf.inject_adapter_in_model(pf.LoraConfig(r=2, target_modules=target), copy.deepcopy(plain))
    theirs = ref.inject_adapter_in_model(ref.LoraConfig(r=2, target_modules=target), copy.deepcopy(plain))
    status = pf.get_model_status(ours)
    assert dataclasses.asdict(status) == dataclasses.asdict(ref.get_model_status(theirs))
    assert status.adapter_model_type == "None"
    assert status.base_model_type == ("other" if base is MLP else type(plain).__name__)


def test_models_without_adapter_layers_raise_as_peft_does():
    with pytest.raises(ValueError, match="No adapter layers found"):
        pf.get_layer_status(MLP())
    with pytest.raises(ValueError, match="No adapter layers found"):
        pf.get_model_status(MLP())
    prompt = pf.get_peft_model(tiny_llama(), pf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for call in (prompt.get_layer_status, prompt.get_model_status):
        with pytest.raises(TypeError, match="prefix tuning and adaption prompt are not supported"):
            call()
