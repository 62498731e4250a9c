"""LoraConfig(layer_replication=...): the layer stack rebuilt from ranges of its layers, copies sharing the base
weights, each with its own adapters (outputs and gradients against HF PEFT: tests/test_differential.py)."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from peft_fast.tuners.tuners_utils import replicate_layers
from peft_fast.utils.error import NoMatchingPeftModuleError
from models import randomize_adapters, tiny_gpt2, tiny_llama


def _tiny_qwen2(layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_replicated_layers_share_the_base_weights_and_have_their_own_adapters():
    torch.manual_seed(0)
    base = tiny_llama()
    originals = list(base.model.layers)
    model = pf.get_peft_model(base, pf.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [0, 1]]))
    layers = model.base_model.model.model.layers
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    for new, old in zip(layers, [originals[0], originals[1], originals[0]]):
        assert new is not old
        assert new.self_attn.q_proj.base_layer.weight is old.self_attn.q_proj.weight
        assert new.mlp.down_proj.weight is old.mlp.down_proj.weight
    assert layers[0].self_attn.q_proj.lora_A["default"] is not layers[2].self_attn.q_proj.lora_A["default"]
    assert sum(p.numel() for p in model.parameters()) == (sum(p.numel() for p in base.parameters()))


def test_replicated_adapter_files_load_both_ways(tmp_path):
    config = dict(r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    for saver, loader in ((pf, ref), (ref, pf)):
        trained = saver.get_peft_model(copy.deepcopy(base), saver.LoraConfig(**config))
        randomize_adapters(trained)
        trained.save_pretrained(tmp_path / saver.__name__)
        loaded = loader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / saver.__name__)
        assert len(loaded.base_model.model.model.layers) == 3
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_a_replicated_qwen2_generates_as_the_same_model_built_deeper():
    # Qwen2 picks each layer's attention mask from config.layer_types, which follows the new stack (HF PEFT 0.21
    # leaves it at the old length, and its replicated Qwen2 fails with an IndexError in forward)
    torch.manual_seed(0)
    base = _tiny_qwen2()
    deeper = _tiny_qwen2(layers=4)
    state = {k: v for k, v in base.state_dict().items() if ".layers." not in k}
    for new, old in enumerate([0, 1, 0, 1]):
        prefix = f"model.layers.{old}."
        state.update({k.replace(prefix, f"model.layers.{new}."): v for k, v in base.state_dict().items()
                      if k.startswith(prefix)})
    deeper.load_state_dict(state)
    model = pf.get_peft_model(base, pf.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [0, 2]]))
    assert model.config.layer_types == ["full_attention"] * 4
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, deeper(input_ids=ids).logits)
        ours = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(ours, deeper.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def test_a_replicated_model_cannot_be_merged_but_can_be_unloaded():
    torch.manual_seed(0)
    model = pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=2, target_modules=["q_proj"],
                                                          layer_replication=[[0, 2], [1, 2]]))
    with pytest.raises(ValueError, match="Cannot merge LORA layers when base model layers are replicated"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="Cannot merge LORA layers when base model layers are replicated"):
        model.merge_adapter()
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "merged_adapters"))
    plain = model.unload()
    assert len(plain.model.layers) == 3 and type(plain.model.layers[2].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("layer_map", [[[0, 3]], [[1, 1]], [[-1, 2]], [[0, 2, 4]], [["0", "2"]]])
def test_a_bad_layer_map_raises_and_leaves_the_model(layer_map):
    torch.manual_seed(0)
    base = tiny_llama()
    layers, state = base.model.layers, copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=r"layer_replication needs \[start, end\) pairs with 0 <= start < end <= 2"):
        pf.get_peft_model(base, pf.LoraConfig(target_modules=["q_proj"], layer_replication=layer_map))
    assert base.model.layers is layers and base.config.num_hidden_layers == 2
    assert base.state_dict().keys() == state.keys()


def test_a_failed_injection_puts_the_original_layers_back():
    torch.manual_seed(0)
    base = _tiny_qwen2()
    layers = base.model.layers
    with pytest.raises(NoMatchingPeftModuleError):
        pf.get_peft_model(base, pf.LoraConfig(target_modules=["nope"], layer_replication=[[0, 2], [0, 2]]))
    assert base.model.layers is layers
    assert base.config.num_hidden_layers == 2 and base.config.layer_types == ["full_attention"] * 2


def test_replicate_layers_finds_no_stack_in_gpt2():
    with pytest.raises(ValueError, match="Could not locate the layers attribute"):
        replicate_layers(tiny_gpt2(), [[0, 1]])
