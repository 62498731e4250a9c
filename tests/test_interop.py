"""Adapter directories move both ways between HF PEFT and peft_fast: same files, same outputs."""

import contextlib
import copy
import json
import os

import peft as ref
import pytest
import torch
from safetensors.torch import load_file

import peft_fast as pf
from models import EmbConv, inputs_for, output_tensor, randomize_adapters, rel_err, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "llama-multi": (
        tiny_llama,
        "llama",
        [("default", dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
         ("second", dict(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM", use_rslora=True))],
    ),
    "llama-embed": (
        tiny_llama,
        "llama",
        [("default", dict(r=4, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM"))],
    ),
    "gpt2-dora": (
        tiny_gpt2,
        "gpt2",
        [("default", dict(r=4, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True, task_type="CAUSAL_LM"))],
    ),
    "bert-seqcls": (
        lambda: tiny_bert("seq_cls"),
        "bert",
        [("default", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
         ("b", dict(r=8, target_modules=["key"], task_type="SEQ_CLS", modules_to_save=["classifier"]))],
    ),
    "embconv": (
        EmbConv,
        "embconv",
        [("default", dict(r=4, target_modules=["emb", "conv1d", "conv2d"], modules_to_save=["lin"], use_dora=True))],
    ),
}


def _build(lib, base, adapters):
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**copy.deepcopy(adapters[0][1])), adapter_name=adapters[0][0])
    for name, cfg in adapters[1:]:
        model.add_adapter(name, lib.LoraConfig(**copy.deepcopy(cfg)))
    randomize_adapters(model, seed=31)
    return model.eval()


def _outputs(model, name, adapters):
    outs = {}
    with torch.no_grad():
        for adapter, _ in adapters:
            model.set_adapter(adapter)
            torch.manual_seed(0)
            outs[adapter] = output_tensor(model(**inputs_for(name)))
    return outs


def _load(lib, base, path, adapters):
    first = adapters[0][0]
    model = lib.PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=first)
    for name, _ in adapters[1:]:
        model.load_adapter(os.path.join(path, name), adapter_name=name)
    return model.eval()


def _files(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), path)
            if f.endswith(".safetensors"):
                out[rel] = load_file(os.path.join(root, f))
            elif f.endswith(".json"):
                with open(os.path.join(root, f)) as fh:
                    out[rel] = json.load(fh)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_files_and_outputs_both_ways(case, tmp_path):
    builder, name, adapters = CASES[case]
    torch.manual_seed(0)
    base = builder()
    ref_model = _build(ref, base, adapters)
    pf_model = _build(pf, base, adapters)
    pf_model.load_state_dict(ref_model.state_dict())  # same weights in both
    expected = _outputs(ref_model, name, adapters)

    ref_dir, pf_dir = str(tmp_path / "ref"), str(tmp_path / "pf")
    ref_model.save_pretrained(ref_dir)
    pf_model.save_pretrained(pf_dir)

    ref_files, pf_files = _files(ref_dir), _files(pf_dir)
    assert sorted(ref_files) == sorted(pf_files)
    for rel, ref_content in ref_files.items():
        if rel.endswith(".safetensors"):
            assert sorted(pf_files[rel]) == sorted(ref_content), rel
            for key, tensor in ref_content.items():
                assert torch.equal(pf_files[rel][key], tensor), (rel, key)
        else:
            assert sorted(pf_files[rel]) == sorted(ref_content), rel
            for key in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora",
                        "modules_to_save", "fan_in_fan_out", "inference_mode", "auto_mapping", "base_model_name_or_path"):
                a, b = pf_files[rel][key], ref_content[key]
                if isinstance(b, list):  # PEFT writes sets in iteration order; peft_fast sorts them
                    a, b = sorted(a), sorted(b)
                assert a == b, (rel, key)

    # HF PEFT's files load into peft_fast, and peft_fast's into HF PEFT, with the same outputs
    loaded_pf = _load(pf, base, ref_dir, adapters)
    loaded_ref = _load(ref, base, pf_dir, adapters)
    for loaded in (loaded_pf, loaded_ref):
        got = _outputs(loaded, name, adapters)
        for adapter in expected:
            assert rel_err(got[adapter], expected[adapter]) < 1e-6, adapter


def test_selected_adapters_and_bin_format(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    adapters = CASES["llama-multi"][2]
    model = _build(pf, base, adapters)
    model.save_pretrained(str(tmp_path), selected_adapters=["second"], safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "second"]
    assert sorted(os.listdir(tmp_path / "second")) == ["adapter_config.json", "adapter_model.bin"]
    loaded = ref.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "second"), adapter_name="second")
    model.set_adapter("second")
    x = inputs_for("llama")
    with torch.no_grad():
        assert rel_err(output_tensor(loaded.eval()(**x)), output_tensor(model(**x))) < 1e-6
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(str(tmp_path / "x"), selected_adapters=["nope"])


def test_is_trainable_and_config_round_trip(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    model = _build(pf, base, CASES["llama-multi"][2][:1])
    model.save_pretrained(str(tmp_path))
    frozen = pf.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert isinstance(frozen, pf.PeftModelForCausalLM)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert frozen.peft_config["default"].inference_mode is True
    trainable = pf.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    cfg = pf.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(cfg, pf.LoraConfig) and cfg.target_modules == {"q_proj", "v_proj"}
    assert pf.LoraConfig.from_pretrained(str(tmp_path)).r == 4


def test_newer_peft_config_keys_warn_and_load(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    model = _build(pf, base, CASES["llama-multi"][2][:1])
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["some_future_option"] = 42
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_option"):
        loaded = pf.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = inputs_for("llama")
    with torch.no_grad():
        assert rel_err(output_tensor(loaded(**x)), output_tensor(model.eval()(**x))) < 1e-6


def test_runtime_config_is_never_saved_and_reaches_the_layers_as_peft_s(tmp_path):
    """LoraRuntimeConfig as PEFT has it: left out of to_dict and adapter_config.json, a saved one dropped with a
    warning, PeftModel.from_pretrained(ephemeral_gpu_offload=...) setting it, and the layers of a new adapter taking
    it (ephemeral_gpu_offload, as PEFT's LoraLayer holds it). Without a GPU DoRA's magnitude is what it is without
    the setting (it says so once a layer)."""
    runtime = pf.LoraRuntimeConfig(ephemeral_gpu_offload=True)
    assert pf.tuners.LoraRuntimeConfig is pf.tuners.lora.LoraRuntimeConfig is pf.LoraRuntimeConfig
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", use_dora=True)
    assert pf.LoraConfig(**cfg, runtime_config=runtime).to_dict() == pf.LoraConfig(**cfg).to_dict()
    ours, theirs = pf.LoraConfig(**cfg).to_dict(), ref.LoraConfig(**cfg).to_dict()
    assert "runtime_config" not in ours and "runtime_config" not in theirs
    torch.manual_seed(0)
    base = tiny_llama()
    torch.manual_seed(1)
    plain = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(**cfg))
    torch.manual_seed(1)
    no_gpu = not torch.cuda.is_available()
    ctx = pytest.warns(UserWarning, match="no CUDA device") if no_gpu else contextlib.nullcontext()
    with ctx:
        offloaded = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(**cfg, runtime_config=runtime))
    layers = [m for m in offloaded.modules() if isinstance(m, pf.tuners.lora.LoraLayer)]
    assert layers and all(m.ephemeral_gpu_offload for m in layers)
    assert not any(m.ephemeral_gpu_offload for m in plain.modules() if isinstance(m, pf.tuners.lora.LoraLayer))
    for (name, a), (_, b) in zip(plain.state_dict().items(), offloaded.state_dict().items()):
        assert a.device == b.device and torch.equal(a, b), name  # (the magnitude back on the CPU, the same numbers)
    offloaded.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "runtime_config" not in saved
    loaded = pf.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), ephemeral_gpu_offload=False)
    assert loaded.peft_config["default"].runtime_config.ephemeral_gpu_offload is False
    saved["runtime_config"] = {"ephemeral_gpu_offload": True}  # (a file written by hand, or by an old PEFT)
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="runtime_config"):
        cfg_loaded = pf.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg_loaded.runtime_config.ephemeral_gpu_offload is False
    with pytest.warns(UserWarning, match="runtime_config"):
        ref_loaded = ref.PeftConfig.from_pretrained(str(tmp_path))
    assert ref_loaded.runtime_config.ephemeral_gpu_offload is False
