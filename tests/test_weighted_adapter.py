"""LoraModel.add_weighted_adapter against HF PEFT (same adapters, same seed → the same new adapter and outputs), and
what each combination type means."""

import copy

import pytest
import torch

import peft_fast as pf
from models import inputs_for, tiny_gpt2, tiny_llama
from peft_fast.utils import merge_utils

ALL_TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
             "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"]


def _two_adapters(lib, base, ranks=(4, 4), targets=(("q_proj", "v_proj"), ("q_proj", "v_proj")), **kw):
    torch.manual_seed(0)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=list(
        targets[0]), init_lora_weights=False, **kw))
    torch.manual_seed(1)
    model.add_adapter("b", lib.LoraConfig(r=ranks[1], lora_alpha=6, target_modules=list(targets[1]),
                                          init_lora_weights=False, **kw))
    return model.eval()


def _logits(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(**inputs_for("llama")).logits


def _state(model, adapter):
    return {k: v for k, v in pf.get_peft_model_state_dict(model, adapter_name=adapter).items()}


@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_same_adapter_and_outputs_as_hf_peft(combination_type):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    kw = dict(svd_rank=6) if combination_type.endswith("svd") else {}
    if combination_type not in ("svd", "linear", "cat"):
        kw["density"] = 0.5
    results = {}
    for name, lib in (("ours", pf), ("peft", peft)):
        model = _two_adapters(lib, base)
        torch.manual_seed(123)  # the DARE types draw random masks
        model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kw)
        state = (pf.get_peft_model_state_dict if lib is pf else peft.get_peft_model_state_dict)(model, adapter_name="mix")
        results[name] = (state, _logits(model, "mix"), model.peft_config["mix"])
    ours, theirs = results["ours"], results["peft"]
    assert sorted(ours[0]) == sorted(theirs[0])
    for key in ours[0]:
        torch.testing.assert_close(ours[0][key], theirs[0][key], rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5)
    assert ours[2].r == theirs[2].r and set(ours[2].target_modules) == set(theirs[2].target_modules)


def _delta(model, layer_path, adapter):
    layer = model.get_submodule(layer_path)
    return layer.get_delta_weight(adapter)


def test_cat_and_full_rank_svd_are_the_exact_weighted_sum():
    base = tiny_llama()
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    for kind, kw in (("cat", {}), ("svd", {"svd_rank": 8})):
        model = _two_adapters(pf, base, ranks=(4, 2))
        model.add_weighted_adapter(["default", "b"], [0.5, 2.0], kind, combination_type=kind, **kw)
        expected = 0.5 * _delta(model, path, "default") + 2.0 * _delta(model, path, "b")
        torch.testing.assert_close(_delta(model, path, kind), expected, rtol=1e-4, atol=1e-5)
        assert model.peft_config[kind].r == (6 if kind == "cat" else 8)


def test_rslora_adapters_combine_with_scaling_one():
    base = tiny_llama()
    model = _two_adapters(pf, base, use_rslora=True)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "sum", combination_type="cat")
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(path)
    assert layer.scaling["sum"] == pytest.approx(1.0)
    torch.testing.assert_close(_delta(model, path, "sum"), _delta(model, path, "default") + _delta(model, path, "b"),
                               rtol=1e-4, atol=1e-5)


def test_adapters_on_different_layers_combine_where_each_is():
    base = tiny_llama()
    model = _two_adapters(pf, base, targets=(("q_proj",), ("v_proj",)))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "both", combination_type="cat")
    assert model.peft_config["both"].target_modules == {"q_proj", "v_proj"}
    q, v = (f"base_model.model.model.layers.0.self_attn.{m}" for m in ("q_proj", "v_proj"))
    torch.testing.assert_close(_delta(model, q, "both"), _delta(model, q, "default"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_delta(model, v, "both"), _delta(model, v, "b"), rtol=1e-5, atol=1e-6)


def test_conv1d_fan_in_fan_out_svd():
    torch.manual_seed(0)
    model = pf.get_peft_model(tiny_gpt2(), pf.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                          init_lora_weights=False))
    model.add_adapter("b", pf.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "s", combination_type="svd", svd_rank=8)
    path = "base_model.model.transformer.h.0.attn.c_attn"
    torch.testing.assert_close(_delta(model, path, "s"), _delta(model, path, "default") + _delta(model, path, "b"),
                               rtol=1e-4, atol=1e-5)


def test_bad_requests_raise_and_leave_the_model_as_it_was():
    base = tiny_llama()
    model = _two_adapters(pf, base, ranks=(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs = dict(model.peft_config)
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.add_weighted_adapter(["default", "nope"], [1, 1], "x")
    with pytest.raises(ValueError, match="same r value"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="Invalid combination_type"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="average")
    with pytest.raises(ValueError, match="2 weights for 1 adapters|1 weights for 2 adapters"):
        model.add_weighted_adapter(["default", "b"], [1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="needs `density`"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="ties_svd")
    with pytest.raises(RuntimeError):  # an SVD asked for a rank beyond the layer's: fails, and is taken back
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="svd", svd_rank=10_000)
    assert dict(model.peft_config) == configs
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_new_adapter_is_frozen_not_active_and_saves_loads_in_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = _two_adapters(pf, base)
    model.set_adapter("default")
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="svd")
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    model.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mix")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs_for("llama")).logits, _logits(model, "mix"), rtol=1e-5, atol=1e-6)


def test_merge_utils_semantics():
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    b = torch.tensor([[-1.0, 1.0], [1.0, -4.0]])
    w = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(merge_utils.task_arithmetic([a, b], w), a + b)
    # magnitude pruning keeps the largest half of each tensor
    torch.testing.assert_close(merge_utils.magnitude_based_pruning(a, 0.5), torch.tensor([[0.0, -2.0], [3.0, 0.0]]))
    # TIES: elected sign per element from the sum, mean of the values agreeing with it
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        got = merge_utils.ties([a, b], w, density=1.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, -2.0], [2.0, -4.0]]))
    torch.manual_seed(0)
    kept = merge_utils.random_pruning(torch.ones(10_000), 0.3, rescale=True)
    assert abs(kept.mean().item() - 1.0) < 0.05
    assert set(kept.unique().tolist()) == {0.0, torch.tensor(1 / 0.3).item()}
    with pytest.raises(ValueError, match="Density should be >= 0"):
        merge_utils.prune(a, -0.1, "magnitude")
