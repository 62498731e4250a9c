"""BD-LoRA (use_bdlora) against HF PEFT: the same block-diagonal factors from the same seed, the same outputs and
gradients, merges and files both ways; patterns that match both or neither refused."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import randomize_adapters, rel_err, tiny_llama

BD = dict(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "v_proj", "up_proj"],
          nblocks=2)
CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    base = tiny_llama().to(dtype)
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        config = lib.LoraConfig(**CFG, use_bdlora=lib.tuners.lora.config.BdLoraConfig(**BD))
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    return base, models


def test_bdlora_matches_peft(tmp_path):
    base, (theirs, ours) = _pair()
    state, want_state = ours.state_dict(), theirs.state_dict()
    assert list(state) == list(want_state)
    for key, value in want_state.items():
        assert value.shape == state[key].shape and torch.equal(value, state[key]), key
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert tuple(q.lora_B["default"].weight.shape) == (q.out_features, 4 // 2)  # (B block-diagonal: blocks only)
    o = ours.base_model.model.model.layers[0].self_attn.o_proj
    assert tuple(o.lora_A["default"].weight.shape) == (4, o.in_features // 2)
    randomize_adapters(theirs)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.tensor([[1, 5, 9, 13, 2], [3, 4, 5, 6, 7]])
    for model in (ours, theirs):
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all(rel_err(g, dict(theirs.named_parameters())[n].grad) < 1e-5 for n, g in grads.items())
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert rel_err(ours(input_ids=ids).logits, want) < 1e-6
        # A as a dense matrix: its two blocks on the diagonal, zeros elsewhere; ΔW = s·B·that
        dense_a, half = o.lora_A["default"].dense_weight(), o.in_features // 2
        assert dense_a[:2, :half].abs().amax() > 0 and dense_a[:2, half:].abs().amax() == 0
        assert dense_a[2:, :half].abs().amax() == 0
        want_delta = o.lora_B["default"].weight @ dense_a * o.scaling["default"]
        assert torch.allclose(o.get_delta_weight("default"), want_delta, atol=1e-6)
        ours.save_pretrained(str(tmp_path / "ours"))
        theirs.save_pretrained(str(tmp_path / "theirs"))
        for source, lib in ((tmp_path / "theirs", pf), (tmp_path / "ours", ref)):
            loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(source))
            assert rel_err(loaded(input_ids=ids).logits, want) < 1e-6, lib.__name__
        merged = ours.merge_and_unload()
        assert rel_err(merged(input_ids=ids).logits, want) < 1e-5


def test_bdlora_refusals():
    with pytest.raises(ValueError, match="overlapping modules"):
        pf.tuners.lora.config.BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["q_proj"])
    strict = pf.tuners.lora.config.BdLoraConfig(target_modules_bd_a=["o_proj"], nblocks=2)
    model = tiny_llama()
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match="matches neither A nor B"):
        pf.get_peft_model(model, pf.LoraConfig(target_modules=["o_proj", "q_proj"], use_bdlora=strict))
    assert [type(m).__name__ for m in model.modules()] == before
    with pytest.raises(ValueError, match="not divisible by 3"):
        pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=4, target_modules=["o_proj"], use_bdlora=pf.tuners.lora.config
                                                      .BdLoraConfig(target_modules_bd_a=["o_proj"], nblocks=3)))
