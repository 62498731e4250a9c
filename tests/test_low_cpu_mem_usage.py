"""low_cpu_mem_usage=True (PEFT's meaning): adapter weights are made on the meta device, no memory and no init, and
loading assigns the file's tensors in place (in the dtype and on the device the adapter would have had); a file that
lacks some of them is an error and the model is left as it was."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_fast as pf
from models import inputs_for, tiny_llama

CONFIGS = {
    "lora": dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False),
    "dora": dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True),
}


def llama(dtype=torch.float32):
    torch.manual_seed(0)
    return tiny_llama().to(dtype)


def logits(model):
    with torch.no_grad():
        return model(**inputs_for("llama")).logits


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_injected_on_meta_then_loaded_in_place(kind, tmp_path):
    trained = pf.get_peft_model(llama(), pf.LoraConfig(**CONFIGS[kind]))
    trained.save_pretrained(tmp_path)
    model = pf.inject_adapter_in_model(pf.LoraConfig(**CONFIGS[kind]), llama(), low_cpu_mem_usage=True)
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapter and all(p.device.type == "meta" for p in adapter)
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if "lora_" not in n)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    pf.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.testing.assert_close(logits(model), logits(trained))


def test_from_pretrained_keeps_the_adapter_dtype_and_trains(tmp_path):
    trained = pf.get_peft_model(llama(torch.bfloat16), pf.LoraConfig(**CONFIGS["lora"]))
    trained.save_pretrained(tmp_path)
    loaded = pf.PeftModel.from_pretrained(llama(torch.bfloat16), tmp_path, low_cpu_mem_usage=True, is_trainable=True)
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())  # as without low_cpu_mem_usage
    torch.testing.assert_close(logits(loaded), logits(trained))
    logits(loaded)  # and it runs a training step
    loaded.train()
    loaded(**inputs_for("llama")).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in lora.values())


def test_a_file_missing_weights_is_refused_and_the_model_left_as_it_was(tmp_path):
    trained = pf.get_peft_model(llama(), pf.LoraConfig(**CONFIGS["lora"]))
    trained.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    dropped = sorted(k for k in state if "v_proj" in k)
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "adapter_model.safetensors")
    model = pf.get_peft_model(llama(), pf.LoraConfig(r=2, target_modules=["k_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lacks"):
        model.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert list(model.peft_config) == ["default"]
    assert sorted(model.state_dict()) == sorted(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
