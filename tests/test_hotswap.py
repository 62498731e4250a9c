"""Hot-swapping LoRA adapters (peft_fast.utils.hotswap, PEFT's peft.utils.hotswap API): the swapped model computes what
a fresh load of the new adapter computes, a compiled model does not recompile, bad swaps leave the model as it was."""

import copy

import pytest
import torch

import peft_fast as pf
from models import inputs_for, tiny_llama
from peft_fast.utils.hotswap import (
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_llama().eval()


def _saved(tmp_path, base, name, r, alpha, seed, targets=("q_proj", "v_proj"), lib=pf, **kw):
    torch.manual_seed(seed)
    config = lib.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **kw)
    model = lib.get_peft_model(copy.deepcopy(base), config)
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return path


def _out(model):
    with torch.no_grad():
        return model(**inputs_for("llama")).logits


def _fresh(base, path):
    return _out(pf.PeftModel.from_pretrained(copy.deepcopy(base), path))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_unchanged(model, before):
    after = _weights(model)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_swap_of_the_same_rank_computes_what_a_fresh_load_computes(tmp_path, base):
    p0, p1 = _saved(tmp_path, base, "a0", 4, 8, 1), _saved(tmp_path, base, "a1", 4, 8, 2)
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), p0)
    out0 = _out(model)
    hotswap_adapter(model, p1, adapter_name="default", torch_device="cpu")
    out1 = _out(model)
    torch.testing.assert_close(out1, _fresh(base, p1), rtol=0, atol=0)
    assert not torch.allclose(out0, out1)  # the adapters differ enough to tell


def test_swaps_to_larger_and_smaller_ranks_and_other_alphas(tmp_path, base):
    paths = [_saved(tmp_path, base, f"a{i}", r, alpha, 10 + i) for i, (r, alpha) in enumerate([(4, 8), (8, 32), (2, 3)])]
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), paths[0])
    for path in paths[1:] + paths[:1]:
        hotswap_adapter(model, path, adapter_name="default", torch_device="cpu")
        torch.testing.assert_close(_out(model), _fresh(base, path), rtol=1e-5, atol=1e-6)


def test_use_rslora_scaling_follows_the_new_rank(tmp_path, base):
    p0, p1 = (_saved(tmp_path, base, f"a{i}", r, 8, i, use_rslora=True) for i, r in ((0, 4), (1, 16)))
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), p0)
    hotswap_adapter(model, p1, adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(_out(model), _fresh(base, p1), rtol=1e-5, atol=1e-6)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 16**0.5) and layer.r["default"] == 16


def test_layers_the_new_adapter_leaves_out_stop_contributing(tmp_path, base):
    p0 = _saved(tmp_path, base, "a0", 4, 8, 1)
    only_q = _saved(tmp_path, base, "q", 4, 8, 2, targets=("q_proj",))
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), p0)
    hotswap_adapter(model, only_q, adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(_out(model), _fresh(base, only_q), rtol=1e-5, atol=1e-6)
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert not v.lora_B["default"].weight.any() and not v.lora_A["default"].weight.any()


def test_compiled_model_swaps_without_recompiling(tmp_path, base):
    from torch._dynamo.testing import CompileCounter

    paths = [_saved(tmp_path, base, f"a{i}", r, alpha, 20 + i) for i, (r, alpha) in enumerate([(4, 8), (8, 32), (2, 3)])]
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), paths[0])
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    assert model.peft_config["default"].r == 8
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.scaling["default"], torch.Tensor) and layer.lora_A["default"].weight.shape[0] == 8
    torch.testing.assert_close(_out(model), _fresh(base, paths[0]), rtol=1e-5, atol=1e-6)  # padding changes nothing
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(_out(compiled), _fresh(base, paths[0]), rtol=1e-5, atol=1e-6)
    frames = counter.frame_count
    assert frames > 0
    for path in paths[1:]:
        hotswap_adapter(compiled, path, adapter_name="default", torch_device="cpu")
        torch.testing.assert_close(_out(compiled), _fresh(base, path), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == frames, "a hot swap recompiled the model"
    with pytest.raises(ValueError, match="padded to the largest rank"):  # past the padding: refused, not recompiled
        hotswap_adapter(compiled, _saved(tmp_path, base, "big", 16, 8, 9), adapter_name="default", torch_device="cpu")
    torch._dynamo.reset()


def test_incompatible_swaps_raise_and_leave_the_model_as_it_was(tmp_path, base):
    p0 = _saved(tmp_path, base, "a0", 4, 8, 1)
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), p0)
    before = _weights(model)
    with pytest.raises(ValueError, match="lora_dropout"):
        hotswap_adapter(model, _saved(tmp_path, base, "drop", 4, 8, 2, lora_dropout=0.1), "default", "cpu")
    with pytest.raises(ValueError, match="use_rslora"):
        hotswap_adapter(model, _saved(tmp_path, base, "rs", 4, 8, 2, use_rslora=True), "default", "cpu")
    with pytest.raises(RuntimeError, match="unexpected keys found: .*k_proj"):
        hotswap_adapter(model, _saved(tmp_path, base, "k", 4, 8, 2, targets=("q_proj", "k_proj")), "default", "cpu")
    with pytest.raises(ValueError, match="no loaded adapter named 'other'"):
        hotswap_adapter(model, p0, "other", "cpu")
    _assert_unchanged(model, before)
    # a weight of a shape that cannot go in is found before anything is written
    state = {k: v for k, v in pf.get_peft_model_state_dict(model).items()}
    state = {k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight"): v
             for k, v in state.items()}
    bad = dict(state)
    first = sorted(bad)[-1]
    bad[first] = torch.randn(3, 3)
    with pytest.raises(ValueError, match="Incompatible shapes"):
        hotswap_adapter_from_state_dict(model, bad, "default", model.peft_config["default"])
    _assert_unchanged(model, before)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, p0, "default", "cpu")


def test_check_hotswap_configs_compatible():
    check_hotswap_configs_compatible(pf.LoraConfig(r=4), pf.LoraConfig(r=64, lora_alpha=3))
    with pytest.raises(ValueError, match="alpha_pattern"):
        check_hotswap_configs_compatible(pf.LoraConfig(), pf.LoraConfig(alpha_pattern={"q_proj": 2}))
    with pytest.raises(ValueError, match="use_dora"):
        check_hotswap_configs_compatible(pf.LoraConfig(), pf.LoraConfig(use_dora=True))
    with pytest.raises(ValueError, match="Incompatible PEFT types"):
        check_hotswap_configs_compatible(pf.LoraConfig(), pf.LoHaConfig())


def test_prepare_refuses_what_it_cannot_do(tmp_path, base):
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), _saved(tmp_path, base, "a0", 4, 8, 1))
    before = _weights(model)
    with pytest.raises(ValueError, match="rank 4 is larger than target_rank 2"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    _assert_unchanged(model, before)  # no layer was padded half-way
    with pytest.raises(ValueError, match="check_compiles should be one of"):
        prepare_model_for_compiled_hotswap(model, check_compiled="sometimes")
    with pytest.raises(ValueError, match="No adapter layers found"):
        prepare_model_for_compiled_hotswap(torch.nn.Linear(2, 2))
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="before\\* compiling"):
        prepare_model_for_compiled_hotswap(compiled)
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")


def test_tensor_scalings_take_the_torch_path_with_the_same_numbers(tmp_path, base, force_backend, monkeypatch):
    from peft_fast.ops import dispatch

    monkeypatch.setattr(dispatch, "_warned", set())  # the warning is once per process: this test must see its own
    model = pf.PeftModel.from_pretrained(copy.deepcopy(base), _saved(tmp_path, base, "a0", 4, 8, 1))
    expected = _out(model)
    prepare_model_for_compiled_hotswap(model)
    force_backend("cuda")  # the fused path (its CPU build in this suite) hands tensor scalings to torch, saying why
    with pytest.warns(UserWarning, match="scaling is a tensor"):
        torch.testing.assert_close(_out(model), expected, rtol=1e-5, atol=1e-6)


def test_same_outputs_as_hf_peft_hotswap(tmp_path, base):
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter as hf_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as hf_prepare

    paths = [_saved(tmp_path, base, f"a{i}", r, alpha, 30 + i) for i, (r, alpha) in enumerate([(4, 8), (8, 32)])]
    ours = pf.PeftModel.from_pretrained(copy.deepcopy(base), paths[0])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0])
    prepare_model_for_compiled_hotswap(ours, target_rank=8)
    hf_prepare(theirs, target_rank=8)
    hotswap_adapter(ours, paths[1], adapter_name="default", torch_device="cpu")
    hf_hotswap(theirs, paths[1], adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=1e-5, atol=1e-6)
