"""Same model, same adapter weights → same outputs, gradients and parameter counts as the reference HF PEFT."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import EmbConv, MLP, inputs_for, output_tensor, randomize_adapters, rel_err, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

TOL = 1e-6

BUILDERS = {
    "llama": lambda: tiny_llama(),
    "gpt2": tiny_gpt2,
    "bert": lambda: tiny_bert("seq_cls"),
    "t5": tiny_t5,
    "mlp": MLP,
    "embconv": EmbConv,
}

CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"])),
    ("llama", dict(r=4, target_modules="all-linear", use_rslora=True, lora_alpha=16)),
    ("llama", dict(r=4, target_modules=["q_proj", "down_proj"], use_dora=True)),
    ("llama", dict(r=4, target_modules=["embed_tokens", "k_proj"])),
    ("llama", dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers",
                   rank_pattern={"v_proj": 6}, alpha_pattern={"q_proj": 3})),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], use_dora=True, fan_in_fan_out=True)),
    ("bert", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only")),
    ("bert", dict(r=4, target_modules=r".*\.attention\.self\.(query|key)", modules_to_save=["classifier"])),
    ("t5", dict(r=4, target_modules=None, task_type="SEQ_2_SEQ_LM", lora_bias=True)),
    ("mlp", dict(r=3, target_modules=["lin0", "lin1"], lora_bias=True, modules_to_save=["head"])),
    ("mlp", dict(r=3, target_modules=["lin0"], exclude_modules=["lin1"], bias="all", init_lora_weights="gaussian")),
    ("embconv", dict(r=4, target_modules=["emb", "conv1d", "conv2d", "lin"])),
    ("embconv", dict(r=4, target_modules=["emb", "conv1d", "conv2d", "lin"], use_dora=True)),
    ("llama", dict(r=4, target_modules=["q_proj", "down_proj"], layer_replication=[[0, 2], [1, 2]])),
    ("bert", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", layer_replication=[[0, 1], [0, 2]])),
]


def _pair(name, cfg_kwargs, seed=0):
    torch.manual_seed(seed)
    base = BUILDERS[name]()
    ref_model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**copy.deepcopy(cfg_kwargs)))
    pf_model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(**copy.deepcopy(cfg_kwargs)))
    randomize_adapters(ref_model)
    missing, unexpected = pf_model.load_state_dict(ref_model.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref_model, pf_model


def _out(model, name, **kw):
    torch.manual_seed(11)  # same dropout masks in the base model for both libraries
    return output_tensor(model(**inputs_for(name), **kw))


def _merged_and_unmerged_match(ref_model, pf_model, name, y_ref) -> bool:
    """Merge, compare, unmerge, compare; False where PEFT refuses to merge (and so must peft_fast)."""
    try:
        ref_model.base_model.merge_adapter()
    except RuntimeError as exc:  # e.g. lora_bias on a layer without bias: PEFT refuses, so must we
        with pytest.raises(RuntimeError, match="no bias"):
            pf_model.base_model.merge_adapter()
        assert "no bias" in str(exc)
        return False
    pf_model.base_model.merge_adapter()
    assert rel_err(_out(pf_model, name), _out(ref_model, name)) < 1e-5
    assert rel_err(_out(pf_model, name), y_ref) < 1e-4  # merging changes nothing but rounding
    pf_model.base_model.unmerge_adapter()
    ref_model.base_model.unmerge_adapter()
    assert rel_err(_out(pf_model, name), y_ref) < 1e-5
    return True


@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_outputs_grads_and_counts_match_peft(name, cfg):
    ref_model, pf_model = _pair(name, cfg)
    # identical module layout: same state-dict keys, same class names of the adapter layers
    assert list(ref_model.state_dict()) == list(pf_model.state_dict())
    assert type(pf_model).__name__ == type(ref_model).__name__
    assert pf_model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()
    assert [n for n, p in pf_model.named_parameters() if p.requires_grad] == [
        n for n, p in ref_model.named_parameters() if p.requires_grad
    ]

    # train mode (dropout 0): outputs and gradients
    ref_model.train(), pf_model.train()
    y_ref, y_pf = _out(ref_model, name), _out(pf_model, name)
    assert rel_err(y_pf, y_ref) < TOL
    y_ref.square().mean().backward()
    y_pf.square().mean().backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.requires_grad}
    for n, p in pf_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            assert rel_err(p.grad, ref_grads[n]) < 1e-5, n

    # eval, unmerged and merged, and with the adapter disabled
    ref_model.eval(), pf_model.eval()
    with torch.no_grad():
        y_ref = _out(ref_model, name)
        assert rel_err(_out(pf_model, name), y_ref) < TOL
        if cfg.get("layer_replication"):  # HF PEFT merges each copy's ΔW into the one weight the copies share
            with pytest.raises(ValueError, match="replicated"):  # (its own docs say it cannot): refused here
                pf_model.base_model.merge_adapter()
        elif not _merged_and_unmerged_match(ref_model, pf_model, name, y_ref):
            return
        with ref_model.disable_adapter(), pf_model.disable_adapter():
            assert rel_err(_out(pf_model, name), _out(ref_model, name)) < TOL


@pytest.mark.parametrize("name,cfg", [CASES[0], CASES[5], CASES[12]], ids=["llama", "gpt2", "embconv"])
def test_same_seed_gives_same_initial_adapter(name, cfg):
    torch.manual_seed(0)
    base = BUILDERS[name]()
    torch.manual_seed(7)
    ref_model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(init_lora_weights="gaussian", **cfg))
    torch.manual_seed(7)
    pf_model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(init_lora_weights="gaussian", **cfg))
    ref_sd, pf_sd = ref_model.state_dict(), pf_model.state_dict()
    assert list(ref_sd) == list(pf_sd)
    for key in ref_sd:
        assert torch.equal(ref_sd[key], pf_sd[key]), key


def test_several_adapters_active_and_switching():
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"])
    ref_model, pf_model = _pair("llama", cfg)
    for m, lib in ((ref_model, ref), (pf_model, pf)):
        torch.manual_seed(3)
        m.add_adapter("other", lib.LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj", "k_proj"], use_rslora=True))
    randomize_adapters(ref_model, seed=9)
    pf_model.load_state_dict(ref_model.state_dict())
    assert pf_model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()
    ref_model.eval(), pf_model.eval()
    with torch.no_grad():
        for m in (ref_model, pf_model):
            m.set_adapter("other")
        assert rel_err(_out(pf_model, "llama"), _out(ref_model, "llama")) < TOL
        for m in (ref_model, pf_model):
            m.base_model.set_adapter(["default", "other"])
        y_ref = _out(ref_model, "llama")
        assert rel_err(_out(pf_model, "llama"), y_ref) < TOL
        for m in (ref_model, pf_model):
            m.base_model.merge_adapter(["default", "other"])
        assert rel_err(_out(pf_model, "llama"), y_ref) < 1e-4
        merged_pf = pf_model.merge_and_unload()
        merged_ref = ref_model.merge_and_unload()
        assert type(merged_pf.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert list(merged_pf.state_dict()) == list(merged_ref.state_dict())
        assert rel_err(output_tensor(merged_pf(**inputs_for("llama"))), y_ref) < 1e-4


def test_mixed_batch_adapter_names_match_peft():
    """Rows name their adapter, several rows per adapter and on both the Linear and the Embedding path (one row per
    adapter let an op that served only each group's first row pass)."""
    cfg = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    ref_model, pf_model = _pair("llama", cfg)
    for m, lib in ((ref_model, ref), (pf_model, pf)):
        m.add_adapter("b", lib.LoraConfig(r=2, target_modules=["v_proj", "embed_tokens"]))
    randomize_adapters(ref_model, seed=5)
    pf_model.load_state_dict(ref_model.state_dict())
    ref_model.eval(), pf_model.eval()
    names = ["default", "__base__", "b", "b", "default", "__base__"]
    x = inputs_for("llama", batch=len(names))
    with torch.no_grad():
        y_ref = output_tensor(ref_model(**x, adapter_names=names))
        y_pf = output_tensor(pf_model(**x, adapter_names=names))
        assert rel_err(y_pf, y_ref) < TOL
        # each row equals running its adapter alone
        alone = {}
        for adapter in ("default", "b"):
            pf_model.set_adapter(adapter)
            alone[adapter] = output_tensor(pf_model(**x))
        with pf_model.disable_adapter():
            alone["__base__"] = output_tensor(pf_model(**x))
        for i, adapter in enumerate(names):
            assert rel_err(y_pf[i], alone[adapter][i]) < 1e-5, (i, adapter)
        assert rel_err(alone["b"], alone["default"]) > 1e-2  # the adapters differ, so the rows tell them apart


def test_generate_matches_peft_with_and_without_adapter_names():
    ref_model, pf_model = _pair("llama", dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ids = inputs_for("llama")["input_ids"]
    for m in (ref_model, pf_model):
        m.eval()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(pf_model.generate(input_ids=ids, **kw), ref_model.generate(input_ids=ids, **kw))
    names = ["default", "__base__", "default"]
    assert torch.equal(
        pf_model.generate(input_ids=ids, adapter_names=names, **kw),
        ref_model.generate(input_ids=ids, adapter_names=names, **kw),
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_init_matches_peft(init):
    torch.manual_seed(0)
    base = MLP()
    ref_model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(r=3, target_modules=["lin0"], init_lora_weights=init))
    pf_model = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(r=3, target_modules=["lin0"], init_lora_weights=init))
    for key, value in ref_model.state_dict().items():
        assert rel_err(pf_model.state_dict()[key], value) < 1e-5, key
    x = inputs_for("mlp")
    assert rel_err(pf_model(**x), base(**x)) < 1e-5  # PiSSA/OLoRA keep the model's function at init


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonal_init_matches_peft(dtype):
    """init_lora_weights="orthogonal": the same A and B as PEFT's under the same seed (rounded to the base dtype
    first, then to fp32 by autocast_adapter_dtype), neither zero, and B·A = 0 so the model starts as the base."""
    torch.manual_seed(0)
    base = tiny_llama().to(dtype)
    models = []
    for lib in (ref, pf):
        torch.manual_seed(3)
        config = lib.LoraConfig(r=6, target_modules=["q_proj", "down_proj"], init_lora_weights="orthogonal")
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    ref_state, pf_state = (m.state_dict() for m in models)
    assert list(ref_state) == list(pf_state)
    for key, value in ref_state.items():
        assert torch.equal(pf_state[key], value), key
    layer = models[1].base_model.model.model.layers[0].mlp.down_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32 and a.abs().min() > 0 and b.abs().amax() > 1e-3
    assert (b @ a).abs().max() < 1e-2 * b.abs().max() * a.abs().max()
    x = inputs_for("llama")
    with torch.no_grad():
        assert rel_err(output_tensor(models[1](**x)), output_tensor(base(**x))) < 1e-2


def test_orthogonal_init_refuses_an_odd_rank_and_leaves_the_model():
    base = tiny_llama()
    before = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match="rank to be even, got 5"):
        pf.get_peft_model(base, pf.LoraConfig(r=5, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    assert [(n, type(m)) for n, m in base.named_modules()] == before


def test_cast_mixed_precision_and_kbit_prep_match_peft():
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16)
    for lib in (ref, pf):
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False)
        lib.cast_mixed_precision_params(m, torch.float16)
        dtypes = {n: p.dtype for n, p in m.named_parameters()}
        if lib is ref:
            ref_dtypes = dtypes
    assert dtypes == ref_dtypes
    m_ref = ref.prepare_model_for_kbit_training(copy.deepcopy(base), use_gradient_checkpointing=False)
    m_pf = pf.prepare_model_for_kbit_training(copy.deepcopy(base), use_gradient_checkpointing=False)
    assert {n: (p.dtype, p.requires_grad) for n, p in m_pf.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in m_ref.named_parameters()
    }


def test_add_adapter_all_linear_on_a_wrapped_model_matches_peft():
    """A second adapter with target_modules='all-linear' goes onto the already-wrapped linears (their LoRA layers),
    as in PEFT; it used to fail with 'Target modules set() not found'."""
    torch.manual_seed(0)
    base = tiny_llama()
    states, targets = [], []
    for lib in (ref, pf):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_modules="all-linear"))
        model.add_adapter("second", lib.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        states.append({k: v.shape for k, v in model.state_dict().items() if ".second." in k})
        targets.append(sorted(model.peft_config["second"].target_modules))
    assert states[0] == states[1] and len(states[1]) == 28
    assert targets[0] == targets[1]


def test_an_exclude_pattern_that_excludes_nothing_warns_as_peft_does():
    for lib in (ref, pf):
        with pytest.warns(UserWarning, match=r"exclude_modules=\{'nope'\} but no modules were excluded"):
            lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], exclude_modules=["nope"]))


def test_set_requires_grad_and_adapter_flags_match_peft():
    """PeftModel.set_requires_grad (and the tuner's and the module-level function), has_active_enabled_adapter,
    modules_to_save and prepare_model_for_gradient_checkpointing, against PEFT: the same requires_grad of every
    parameter after the same calls, on LoRA layers, a modules_to_save copy and trainable tokens."""
    from peft_fast.tuners.tuners_utils import onload_layer, set_requires_grad

    def build(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(
            tiny_llama(num_labels=3),
            lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                           trainable_token_indices={"embed_tokens": [1, 3]}))
        model.add_adapter("second", lib.LoraConfig(r=2, target_modules=["v_proj", "o_proj"], task_type="SEQ_CLS"))
        return model

    def grads(model):
        return {name: p.requires_grad for name, p in model.named_parameters()}

    ours, theirs = build(pf), build(ref)
    assert grads(ours) == grads(theirs)
    assert ours.modules_to_save == theirs.modules_to_save == {"classifier", "score"}  # (PEFT adds both heads)
    steps = [(["default", "second"], True), ("default", False), ("second", True), (["second"], False),
             ("default", True)]
    for names, flag in steps:
        ours.set_requires_grad(names, requires_grad=flag)
        theirs.set_requires_grad(names, requires_grad=flag)
        assert grads(ours) == grads(theirs), (names, flag)
    assert any(grads(ours)[n] for n in grads(ours) if ".second." in n) is False  # (the steps ended with it off)
    assert set_requires_grad(ours, "second") is None  # the module-level form, as PEFT's tuners_utils one
    ours.base_model.set_requires_grad("second", requires_grad=False)
    assert grads(ours) == grads(theirs)

    with onload_layer(ours.base_model.model.model.layers[0].self_attn.q_proj):  # (still a context manager)
        pass
    assert ours.has_active_enabled_adapter is theirs.has_active_enabled_adapter is True
    with ours.disable_adapter(), theirs.disable_adapter():
        assert ours.has_active_enabled_adapter is False
    assert ours.has_active_enabled_adapter is True
    assert pf.get_peft_model(tiny_llama(), pf.LoraConfig(r=2, target_modules=["q_proj"])).modules_to_save is None

    base = tiny_llama()
    assert ours.prepare_model_for_gradient_checkpointing(base) is None
    embeds = base.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeds.requires_grad  # (enable_input_require_grads: checkpointed blocks over frozen weights get a graph)

    prompt = pf.get_peft_model(tiny_llama(), pf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="not supported for prompt learning"):
        prompt.set_requires_grad("default")
    assert prompt.has_active_enabled_adapter is True
