"""reduce_intruder_dimension (peft_fast.tuners.lora.intruders, PEFT's module path) against HF PEFT on nn.Linear
LoRA, and against its definition on Conv1D and embedding layers, which HF PEFT 0.21 handles in the wrong
orientation."""

import copy

import pytest
import torch

import peft_fast as pf
from peft_fast.tuners.lora.intruders import reduce_intruder_dimension
from models import randomize_adapters, rel_err, tiny_gpt2, tiny_llama

KW = dict(top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75)


def _trained(lib, base, **cfg):
    torch.manual_seed(0)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, lora_alpha=8, **cfg))
    randomize_adapters(model, scale=1.0)  # large adapters: their directions show up among the top singular vectors
    return model


def _deltas(model, adapter):
    return {n: m.get_delta_weight(adapter) for n, m in model.named_modules()
            if hasattr(m, "get_delta_weight") and adapter in getattr(m, "r", {})}


def test_linear_layers_match_hf_peft():
    from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce
    import peft as ref

    torch.manual_seed(0)
    base = tiny_llama()
    theirs = _trained(ref, base, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = _trained(pf, base, target_modules=["q_proj", "v_proj", "down_proj"])
    ours.load_state_dict(theirs.state_dict())
    ours_log, theirs_log = [], []
    peft_reduce(theirs, logging_sink=theirs_log.append, **KW)
    reduce_intruder_dimension(ours, logging_sink=ours_log.append, **KW)
    assert ours_log == theirs_log and any("Intruders:" in line for line in ours_log)
    assert ours.active_adapters == ["intruder_reduced"] and ours.peft_config["intruder_reduced"].r == 4
    mine, peft_deltas = _deltas(ours, "intruder_reduced"), _deltas(theirs, "intruder_reduced")
    assert mine.keys() == peft_deltas.keys() and mine
    for name, delta in mine.items():
        assert rel_err(delta, peft_deltas[name]) < 1e-4, name
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    old = _deltas(ours, "default")
    ours.set_adapter("default")  # the old adapter is untouched
    assert all(torch.equal(old[n], d) for n, d in _deltas(ours, "default").items())


def _definition(base_weight, delta, scaling, r):
    """The reduced adapter's ΔW, computed here from the paper's recipe (out × in orientation)."""
    u_base = torch.linalg.svd(base_weight, full_matrices=False)[0]
    u, s, vh = torch.linalg.svd(base_weight + delta, full_matrices=False)
    idx = torch.where((u.T @ u_base).abs().amax(1)[:KW["top_k"]] < KW["threshold_epsilon"])[0]
    part = (u[:, idx] * s[idx]) @ vh[idx]
    new = (delta - (1 - KW["mitigation_lambda"]) * part) / scaling
    u2, s2, vh2 = torch.linalg.svd(new, full_matrices=False)
    return scaling * (u2[:, :r] * s2[:r]) @ vh2[:r], idx.numel()


@pytest.mark.parametrize("kind", ["conv1d", "embedding"])
def test_conv1d_and_embedding_layers_follow_the_definition(kind):
    torch.manual_seed(0)
    if kind == "conv1d":
        model = _trained(pf, tiny_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True)
    else:
        model = _trained(pf, tiny_llama(), target_modules=["embed_tokens"])
    log = []
    reduce_intruder_dimension(model, logging_sink=log.append, **KW)
    checked = 0
    for name, layer in model.named_modules():
        if not hasattr(layer, "r") or "default" not in layer.r:
            continue
        oriented = layer.get_base_layer().weight.T  # (Conv1D: in × out stored; Embedding: vocab × dim)
        b, a = ((layer.lora_embedding_B, layer.lora_embedding_A) if kind == "embedding"
                else ({k: v.weight for k, v in layer.lora_B.items()}, {k: v.weight for k, v in layer.lora_A.items()}))
        delta = layer.scaling["default"] * b["default"] @ a["default"]
        want, count = _definition(oriented, delta, layer.scaling["default"], 4)
        got = layer.scaling["intruder_reduced"] * b["intruder_reduced"] @ a["intruder_reduced"]
        assert rel_err(got, want if count else delta) < 1e-4, name
        checked += 1
    assert checked and any("Intruders:" in line for line in log)


def test_refusals_leave_the_model_unchanged():
    torch.manual_seed(0)
    dora = _trained(pf, tiny_llama(), target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="does not handle DoRA"):
        reduce_intruder_dimension(dora, logging_sink=None)
    assert list(dora.peft_config) == ["default"]
    with pytest.raises(ValueError, match="No adapter 'nope'"):
        reduce_intruder_dimension(dora, old_adapter_name="nope", logging_sink=None)
    loha = pf.get_peft_model(tiny_llama(), pf.LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not using LoRA"):
        reduce_intruder_dimension(loha, logging_sink=None)
