"""LoRA on bare parameters (LoraConfig.target_parameters), e.g. a mixture-of-experts layer's stacked expert weights:
HF PEFT is the oracle (outputs, gradients, saved files and config), and the adapter layer behaves as one (merge,
unload, disable, several adapters, bad input refused with the model unchanged)."""

import json
import warnings

import peft as ref
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peft_fast as pf
from peft_fast.tuners.lora.param_wrapper import ParamWrapper

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    ))


class Stack(nn.Module):
    """Experts stored (experts, in, out), marked transposed as some MoE layers mark theirs."""

    is_transposed = True

    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(3, 8, 12) / 3)

    def forward(self, x, route):
        return torch.einsum("bi,bio->bo", x, self.up[route])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.stack = Stack()
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        route = torch.arange(len(x)) % 3
        return self.head(self.stack(self.inp(x), route))


def net():
    torch.manual_seed(0)
    return Net()


def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def run(lib, make, tmp_path, **kw):
    model = make()
    torch.manual_seed(5)
    peft_model = lib.get_peft_model(model, lib.LoraConfig(init_lora_weights=False, r=2, **kw))
    x = ids() if make is mixtral else torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    out = peft_model(x)
    out = out.logits if hasattr(out, "logits") else out
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    folder = tmp_path / lib.__name__
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    return peft_model, out.detach(), grads, load_file(folder / "adapter_model.safetensors"), config, x


@pytest.mark.parametrize("make, kw", [
    (mixtral, dict(target_modules=[], target_parameters=EXPERT_PARAMS)),
    (mixtral, dict(target_modules=["q_proj"], target_parameters=["experts.down_proj"], lora_alpha=5, use_rslora=True)),
    (net, dict(target_modules=["inp"], target_parameters=["stack.up", "head.weight"])),
], ids=["mixtral-experts", "mixtral-mixed", "transposed-and-2d"])
def test_same_outputs_gradients_files_and_config_as_peft(make, kw, tmp_path):
    _, out_ref, grads_ref, file_ref, config_ref, _ = run(ref, make, tmp_path, **kw)
    model, out, grads, file, config, _ = run(pf, make, tmp_path, **kw)
    assert any(isinstance(m, ParamWrapper) for m in model.modules())
    torch.testing.assert_close(out, out_ref)
    assert sorted(grads) == sorted(grads_ref)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)
    assert sorted(file) == sorted(file_ref)
    assert all(torch.equal(file[k], file_ref[k]) for k in file)
    config.pop("peft_version"), config_ref.pop("peft_version")
    # (PEFT turns target_parameters into a set on the way: its file lists them in hash order)
    assert sorted(config.pop("target_parameters")) == sorted(config_ref.pop("target_parameters"))
    assert config == config_ref


def test_files_load_both_ways(tmp_path):
    kw = dict(target_modules=[], target_parameters=EXPERT_PARAMS)
    _, out_ref, _, _, _, x = run(ref, mixtral, tmp_path, **kw)
    _, out, _, _, _, _ = run(pf, mixtral, tmp_path, **kw)
    torch.testing.assert_close(pf.PeftModel.from_pretrained(mixtral(), tmp_path / "peft")(x).logits, out_ref)
    torch.testing.assert_close(ref.PeftModel.from_pretrained(mixtral(), tmp_path / "peft_fast")(x).logits, out)


def test_merge_unmerge_unload_and_disable(tmp_path):
    model, out, _, _, _, x = run(pf, net, tmp_path, target_modules=[], target_parameters=["stack.up", "head.weight"])
    base_up = model.base_model.model.stack.get_base_layer().up.detach().clone()
    with model.disable_adapter():
        base_out = model(x)
    assert not torch.allclose(base_out, out)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.stack.get_base_layer().up, base_up)
    torch.testing.assert_close(model(x), out)
    plain = model.merge_and_unload()
    assert type(plain.stack) is Stack and type(plain.head) is nn.Linear  # both nested wrappers gone
    torch.testing.assert_close(plain(x), out)


def test_two_adapters_share_the_wrappers():
    model = pf.get_peft_model(mixtral(), pf.LoraConfig(target_modules=[], target_parameters=EXPERT_PARAMS,
                                                       init_lora_weights=False))
    model.add_adapter("other", pf.LoraConfig(target_modules=[], target_parameters=EXPERT_PARAMS, r=4,
                                             init_lora_weights=False))
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamWrapper) and isinstance(experts.base_layer, ParamWrapper)
    assert not isinstance(experts.base_layer.base_layer, ParamWrapper)  # one wrapper per parameter, not per adapter
    assert sorted(experts.lora_A) == ["default", "other"]
    x = ids()
    first = model(x).logits.detach()
    model.set_adapter("other")
    second = model(x).logits.detach()
    assert not torch.allclose(first, second)
    model.delete_adapter("other")
    torch.testing.assert_close(model(x).logits, first)
    model.eval()
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model(x, adapter_names=["default", "default"])


@pytest.mark.parametrize("kw, error, message", [
    (dict(lora_dropout=0.1), ValueError, "lora_dropout"),
    (dict(use_dora=True), ValueError, "use_dora"),
    (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights"),
    (dict(target_parameters=["experts.nothing"]), pf.NoMatchingPeftModuleError, "matched no parameter"),
    (dict(target_modules=["q_proj"], target_parameters=["q_proj.weight"]), ValueError, "not a valid target"),
])
def test_refused_configs_leave_the_model_as_it_was(kw, error, message):
    model = mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"target_modules": [], "target_parameters": EXPERT_PARAMS, **kw}
    with pytest.raises(error, match=message):
        pf.get_peft_model(model, pf.LoraConfig(**kw))
    assert not any(isinstance(m, pf.BaseTunerLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_parameters_unmatched_beside_matched_modules_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pf.get_peft_model(mixtral(), pf.LoraConfig(target_modules=["q_proj"], target_parameters=["nothing.weight"]))
    assert any("no parameter was matched" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="target_parameters"):
        pf.LoraConfig(target_parameters="experts.gate_up_proj")


def test_a_failed_load_of_a_second_adapter_leaves_every_wrapper_as_it_was(tmp_path):
    """Nested parameter wrappers, trainable tokens and LoRA layers of a half-loaded adapter all go again."""
    from safetensors.torch import save_file

    kw = dict(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS, trainable_token_indices=[1, 2])
    saved = pf.get_peft_model(mixtral(), pf.LoraConfig(init_lora_weights=False, **kw))
    saved.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key] = torch.zeros(3, 3)  # a wrong shape: the load fails after the adapter was made
    save_file(state, tmp_path / "adapter_model.safetensors")
    model = pf.get_peft_model(mixtral(), pf.LoraConfig(target_modules=["k_proj"]))
    before = sorted(model.state_dict())
    structure = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match="wrong shape"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert sorted(model.state_dict()) == before
    assert [type(m).__name__ for m in model.modules()] == structure
    assert list(model.peft_config) == ["default"]
