"""Activated LoRA (LoraConfig(alora_invocation_tokens=...)) against HF PEFT: the adapter acts only from the last
invocation sequence of each row on (training, with dropout, gradient checkpointing, generate, mixed batches)."""

import copy
import warnings

import peft as ref
import pytest
import torch

import peft_fast as pf
from peft_fast.tuners.lora.alora import calculate_alora_offsets
from models import randomize_adapters, rel_err, tiny_gpt2, tiny_llama

INVOKE = [5, 6]
CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
           alora_invocation_tokens=INVOKE)


def _ids():
    """Row 0 invokes at 3, row 1 at 1 and (last) at 7, row 2 never, row 3 at its last two tokens."""
    ids = torch.randint(7, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    for row, start in ((0, 3), (1, 1), (1, 7), (3, 8)):
        ids[row, start:start + 2] = torch.tensor(INVOKE)
    return ids


def _pair(base=None, **cfg):
    torch.manual_seed(0)
    base = tiny_llama() if base is None else base
    models = [lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**{**CFG, **cfg})) for lib in (ref, pf)]
    randomize_adapters(models[0])
    adapters = {k: v for k, v in models[0].state_dict().items() if "lora_" in k}
    assert not models[1].load_state_dict(adapters, strict=False).unexpected_keys
    return base, models


def _logits_and_grads(models, seed=None, **inputs):
    results = []
    for model in models:
        if seed is not None:
            torch.manual_seed(seed)
        out = model(**inputs)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    return results


def _assert_same(results, tol=1e-6):
    (y_ref, g_ref), (y_pf, g_pf) = results
    assert rel_err(y_pf, y_ref) < tol
    assert g_pf.keys() == g_ref.keys() and g_ref
    for name, grad in g_ref.items():
        assert rel_err(g_pf[name], grad) < max(tol, 1e-5), name


def test_offsets_are_peft_s():
    ids = _ids()
    config = {"a": pf.LoraConfig(**CFG), "plain": pf.LoraConfig(r=4, target_modules=["q_proj"])}
    assert calculate_alora_offsets(config, "a", ids) == [7, 3, None, 2]
    assert calculate_alora_offsets(config, "a", ids, ["plain", "a", "__base__", "a"]) == [None, 3, None, 2]
    ref_config = {"a": ref.LoraConfig(**CFG), "plain": ref.LoraConfig(r=4, target_modules=["q_proj"])}
    from peft.tuners.lora.variants import calculate_alora_offsets as peft_offsets

    assert peft_offsets(ref_config, "a", ids) == [7, 3, None, 2]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_logits_and_grads_match_peft_and_the_base_model_before_the_invocation(dropout):
    base, models = _pair(lora_dropout=dropout)
    ids = _ids()
    for model in models:
        model.train()
    results = _logits_and_grads(models, seed=3, input_ids=ids, labels=ids)
    _assert_same(results)
    if dropout == 0:
        logits = results[1][0]
        with torch.no_grad():
            plain = base(input_ids=ids).logits
        assert torch.allclose(logits[2], plain[2], atol=1e-6)  # no invocation: the base model
        assert torch.allclose(logits[0, :3], plain[0, :3], atol=1e-6)  # before the invocation: the base model
        assert torch.allclose(logits[1, :7], plain[1, :7], atol=1e-6)  # (the last invocation counts)
        assert not torch.allclose(logits[0, 3:], plain[0, 3:], atol=1e-3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_offsets_for_the_recomputation(reentrant):
    _, (peft_model, ours) = _pair()
    ids = _ids()
    plain = copy.deepcopy(ours)
    results = []
    for model in (peft_model, ours):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    for model in (plain, ours):
        model.train()
    results = _logits_and_grads([plain, ours], input_ids=ids, labels=ids)
    _assert_same(results)  # checkpointed == not checkpointed
    ours.zero_grad()
    _assert_same(_logits_and_grads([peft_model, ours], input_ids=ids, labels=ids))
    ours(input_ids=ids, labels=ids).loss.backward()  # the hooks went with the backward: another step runs


def test_generate_matches_peft_and_uses_the_prompt_s_offsets():
    _, models = _pair()
    ids = _ids()
    with torch.no_grad():
        outs = [m.eval().generate(input_ids=ids, max_new_tokens=6, do_sample=False) for m in models]
    assert torch.equal(outs[1], outs[0])
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        models[1].generate(input_ids=ids, max_new_tokens=2, num_beams=2)


def test_mixed_batch_with_alora_plain_and_base_rows_matches_peft():
    _, models = _pair()
    for lib, model in zip((ref, pf), models):
        model.add_adapter("plain", lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    randomize_adapters(models[0], seed=5)
    models[1].load_state_dict(models[0].state_dict())
    ids = _ids()
    names = ["default", "plain", "__base__", "default"]
    with torch.no_grad():
        logits = [m.eval()(input_ids=ids, adapter_names=names).logits for m in models]
    assert rel_err(logits[1], logits[0]) < 1e-6


def test_only_inputs_embeds_warns_and_the_adapter_acts_nowhere():
    base, (_, ours) = _pair()
    embeds = base.get_input_embeddings()(_ids())
    with torch.no_grad(), pytest.warns(UserWarning, match="Cannot calculate aLoRA offsets"):
        logits = ours.eval()(inputs_embeds=embeds).logits
        assert torch.allclose(logits, base(inputs_embeds=embeds).logits, atol=1e-6)


def test_adapter_files_load_both_ways(tmp_path):
    base, models = _pair()
    ids = _ids()
    for saver, loader, model in ((pf, ref, models[1]), (ref, pf, models[0])):
        model.save_pretrained(tmp_path / saver.__name__)
        loaded = loader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / saver.__name__)
        assert loaded.peft_config["default"].alora_invocation_tokens == INVOKE
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_merging_an_alora_adapter_is_refused_and_the_model_unchanged():
    _, (_, ours) = _pair()
    state = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="aLoRA adapters cannot be merged"):
        ours.merge_and_unload()
    with pytest.raises(ValueError, match="aLoRA adapters cannot be merged"):
        ours.merge_adapter()
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    assert not any(getattr(m, "merged_adapters", None) for m in ours.modules())


def test_bad_configs_and_layers_are_refused():
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        pf.LoraConfig(task_type="CAUSAL_LM", alora_invocation_tokens=[])
    with pytest.raises(ValueError, match="cannot be combined with DoRA"):
        pf.LoraConfig(task_type="CAUSAL_LM", alora_invocation_tokens=INVOKE, use_dora=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pf.LoraConfig(task_type="SEQ_CLS", alora_invocation_tokens=INVOKE)
    assert any("only supported for CAUSAL_LM" in str(w.message) for w in caught)
    base = tiny_llama()
    before = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match="aLoRA adapts linear layers only, not Embedding"):
        pf.get_peft_model(base, pf.LoraConfig(**{**CFG, "target_modules": ["q_proj", "embed_tokens"]}))
    assert [(n, type(m)) for n, m in base.named_modules()] == before


def test_conv1d_bases_take_alora_as_peft():
    torch.manual_seed(0)
    base = tiny_gpt2()
    _, models = _pair(base, target_modules=["c_attn"], fan_in_fan_out=True)
    ids = _ids()
    for model in models:
        model.train()
    _assert_same(_logits_and_grads(models, seed=3, input_ids=ids, labels=ids))  # (GPT-2's own dropout: one seed)


def test_alora_on_4bit_layers_matches_peft():
    from models import quantize_linears

    torch.manual_seed(0)
    base = quantize_linears(tiny_llama(), bits=4, quant_type="nf4")
    _, models = _pair(base)
    ids = _ids()
    for model in models:
        model.train()
    _assert_same(_logits_and_grads(models, input_ids=ids, labels=ids), tol=1e-5)


def test_the_flat_cuda_paths_leave_alora_layers_to_the_general_path():
    from peft_fast.ops import cuda_lora

    _, (_, ours) = _pair()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.use_alora == {"default": True}
    assert cuda_lora.eager_node_args(layer, torch.randn(2, 3, 32)) is None
