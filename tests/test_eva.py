"""EVA initialization (init_lora_weights="eva", get_eva_state_dict, initialize_lora_eva_weights) and the incremental
PCA under it, against HF PEFT: the same components bit for bit, the same rank redistribution, config and weights,
files both ways; and the refusals, which leave the model as it was."""

import copy
import warnings

import peft as ref
import pytest
import torch
from peft.utils.incremental_pca import IncrementalPCA as RefPCA

import peft_fast as pf
from peft_fast.utils.incremental_pca import IncrementalPCA
from models import tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.filterwarnings("ignore")  # (PEFT's and transformers' warnings of tiny models)


def _data(vocab, batches=6, seed=3):
    """Language-modeling batches with padding (attention_mask) and prompt positions (labels -100) to leave out."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return data


def _eva_model(lib, base, rho=3.0, whiten=False, **kwargs):
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                            eva_config=lib.EvaConfig(rho=rho, tau=0.9, whiten=whiten))
    return lib.get_peft_model(copy.deepcopy(base), config, **kwargs)


def _assert_same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("rho", [1.0, 3.0])
def test_eva_matches_peft(rho):
    torch.manual_seed(0)
    base = tiny_llama()
    data = _data(base.config.vocab_size)
    models, states = [], []
    for lib in (ref, pf):
        model = _eva_model(lib, base, rho=rho)
        states.append(dict(lib.get_eva_state_dict(model, data, show_progress_bar=False)))
        lib.initialize_lora_eva_weights(model, eva_state_dict=dict(states[-1]), show_progress_bar=False)
        models.append(model)
    (want, got), (peft_model, pf_model) = states, models
    assert want.keys() == got.keys() and len(got) == 12
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ranks = {name: w.size(0) for name, w in got.items()}
    if rho > 1:  # (the data makes the redistribution move ranks: a test of it, not of equal ranks)
        assert len(set(ranks.values())) > 1
    else:
        assert set(ranks.values()) == {4}
    want_cfg, got_cfg = peft_model.peft_config["default"], pf_model.peft_config["default"]
    assert got_cfg.rank_pattern == want_cfg.rank_pattern
    assert got_cfg.alpha_pattern == want_cfg.alpha_pattern
    assert got_cfg.target_modules == set(want_cfg.target_modules)
    _assert_same_params(pf_model, peft_model)
    # A holds the components; B is zero, so the model's output is the base model's
    for name, w in got.items():
        layer = pf_model.get_submodule(name)
        assert torch.equal(layer.lora_A["default"].weight, w.float())
        assert not layer.lora_B["default"].weight.any()
        assert layer.scaling["default"] == pytest.approx(2.0)  # alpha scaled with the rank: alpha / r unchanged
    batch = data[0]
    with torch.no_grad():
        assert torch.equal(pf_model(**batch).logits, base(**batch).logits)


def test_initialize_from_the_dataloader_equals_from_the_state_dict_and_the_files_load_both_ways(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    data = _data(base.config.vocab_size)
    direct = pf.initialize_lora_eva_weights(_eva_model(pf, base), data, show_progress_bar=False)
    peft_model = _eva_model(ref, base)
    ref.initialize_lora_eva_weights(peft_model, data, show_progress_bar=False)
    _assert_same_params(direct, peft_model)
    for lib_from, lib_to, model in ((pf, ref, direct), (ref, pf, peft_model)):
        with torch.no_grad():  # (B trained away from zero: the saved adapter changes the output)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        folder = tmp_path / lib_from.__name__
        model.save_pretrained(folder)
        loaded = lib_to.PeftModel.from_pretrained(copy.deepcopy(base), folder)
        batch = data[1]
        with torch.no_grad():
            assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)
        assert loaded.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
        assert any(loaded.peft_config["default"].rank_pattern.values())


def test_a_layer_given_no_component_goes_back_to_its_base_layer_as_in_peft():
    torch.manual_seed(0)
    base = tiny_llama()
    data = _data(base.config.vocab_size)
    state = pf.get_eva_state_dict(_eva_model(pf, base), data, show_progress_bar=False)
    dropped = next(name for name in state if name.endswith("layers.1.mlp.up_proj"))
    state[dropped] = state[dropped][:0]
    grown = next(name for name in state if name.endswith("layers.0.self_attn.o_proj"))
    state[grown] = torch.randn(6, state[grown].size(1))
    models = []
    for lib in (ref, pf):
        model = _eva_model(lib, base)
        lib.initialize_lora_eva_weights(model, eva_state_dict=dict(state), show_progress_bar=False)
        models.append(model)
    peft_model, pf_model = models
    assert type(pf_model.get_submodule(dropped)) is torch.nn.Linear
    assert pf_model.get_submodule(grown).r["default"] == 6
    assert pf_model.peft_config["default"].target_modules == set(peft_model.peft_config["default"].target_modules)
    assert pf_model.peft_config["default"].rank_pattern == peft_model.peft_config["default"].rank_pattern
    assert pf_model.peft_config["default"].alpha_pattern == peft_model.peft_config["default"].alpha_pattern
    _assert_same_params(pf_model, peft_model)


def test_state_dict_of_a_plain_model_and_its_names():
    """On a model without adapters (peft_config given) the components are the same, by the base model's names;
    peft_fast also loads them by those names (PEFT needs them renamed to the PeftModel's)."""
    torch.manual_seed(0)
    base = tiny_llama()
    data = _data(base.config.vocab_size)
    config = pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                           eva_config=pf.EvaConfig(rho=3.0, tau=0.9))
    plain = pf.get_eva_state_dict(copy.deepcopy(base), data, peft_config=config, show_progress_bar=False)
    want = ref.get_eva_state_dict(copy.deepcopy(base), data, peft_config=ref.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
        eva_config=ref.EvaConfig(rho=3.0, tau=0.9)), show_progress_bar=False)
    assert plain.keys() == want.keys() and all(k.startswith("model.layers.") for k in plain)
    for name in want:
        assert torch.equal(plain[name], want[name]), name
    by_base_names = pf.initialize_lora_eva_weights(_eva_model(pf, base), eva_state_dict=plain)
    by_peft_names = pf.initialize_lora_eva_weights(
        _eva_model(pf, base), eva_state_dict={"base_model.model." + k: v for k, v in plain.items()})
    _assert_same_params(by_base_names, by_peft_names)


def test_whitened_components_are_divided_once_by_the_root_singular_values():
    """whiten=True: each layer's rows are its PCA's components over √S. Layers sharing one input (q, k, v) share a
    PCA; HF PEFT 0.21 divides those components in place once per sharing layer, and the rows it hands out are views
    of them, so its q, k and v rows all come out divided three times. peft_fast divides each layer's rows once; the
    layers with their own input equal PEFT's."""
    torch.manual_seed(0)
    base = tiny_llama()
    data = _data(base.config.vocab_size)
    plain = pf.get_eva_state_dict(_eva_model(pf, base), data, show_progress_bar=False)
    white = pf.get_eva_state_dict(_eva_model(pf, base, whiten=True), data, show_progress_bar=False)
    want = ref.get_eva_state_dict(_eva_model(ref, base, whiten=True), data, show_progress_bar=False)
    assert white.keys() == plain.keys()
    for name in white:
        rows = plain[name]
        norms = rows.norm(dim=1)  # unit rows, so 1 / norm of the whitened rows is √S
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        factor = white[name].norm(dim=1)
        assert torch.allclose(white[name], rows * factor[:, None], atol=1e-6), name
        if name.endswith(("o_proj", "up_proj", "down_proj")):
            assert torch.equal(white[name], want[name]), name
    k_name = next(n for n in white if n.endswith("layers.0.self_attn.k_proj"))
    q_name = k_name.replace("k_proj", "q_proj")
    assert torch.allclose(white[k_name], white[q_name][: white[k_name].size(0)])


def test_low_cpu_mem_usage_and_hooks_and_training_mode():
    torch.manual_seed(0)
    base = tiny_llama()
    data = _data(base.config.vocab_size)
    meta = _eva_model(pf, base, low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for n, p in meta.named_parameters() if "lora_A" in n)
    meta.train()
    pf.initialize_lora_eva_weights(meta, data, show_progress_bar=False)
    assert meta.training
    assert not any(p.device.type == "meta" for p in meta.parameters())
    assert not any(m._forward_hooks for m in meta.modules())
    eager = pf.initialize_lora_eva_weights(_eva_model(pf, base), data, show_progress_bar=False)
    _assert_same_params(meta, eager)


def test_refusals_leave_the_model_as_it_was():
    torch.manual_seed(0)
    base = tiny_llama()
    data = _data(base.config.vocab_size)
    with pytest.raises(ValueError, match="rho"):
        pf.EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau"):
        pf.EvaConfig(tau=1.5)
    plain = pf.get_peft_model(copy.deepcopy(base), pf.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        pf.initialize_lora_eva_weights(plain, data)
    with pytest.raises(ValueError, match="must be a PeftModel"):
        pf.initialize_lora_eva_weights(copy.deepcopy(base), data)
    model = _eva_model(pf, base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="dataloader is required"):
        pf.initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="dataloader is empty"):
        pf.initialize_lora_eva_weights(model, [])
    state = pf.get_eva_state_dict(model, data, show_progress_bar=False)
    bad = dict(state)
    last = sorted(bad)[-1]
    bad[last] = torch.randn(4, 7)
    with pytest.raises(ValueError, match=r"must be a \(rank × "):
        pf.initialize_lora_eva_weights(model, eva_state_dict=bad)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert model.peft_config["default"].rank_pattern == {}
    assert not any(m._forward_hooks for m in model.modules())


def test_config_round_trip_and_warnings(tmp_path):
    with pytest.warns(UserWarning, match="Using default EVA config"):
        config = pf.LoraConfig(init_lora_weights="eva")
    assert config.eva_config == pf.EvaConfig()
    with pytest.warns(UserWarning, match="will be ignored"):
        pf.LoraConfig(eva_config=pf.EvaConfig())
    config = pf.LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5, "whiten": True})
    assert config.eva_config == pf.EvaConfig(rho=1.5, whiten=True)
    config.save_pretrained(tmp_path)
    assert ref.LoraConfig.from_pretrained(tmp_path).eva_config == ref.EvaConfig(rho=1.5, whiten=True)
    ref.LoraConfig(init_lora_weights="eva", eva_config=ref.EvaConfig(tau=0.5)).save_pretrained(tmp_path / "ref")
    assert pf.LoraConfig.from_pretrained(tmp_path / "ref").eva_config == pf.EvaConfig(tau=0.5)


def test_incremental_pca_matches_peft_and_the_batch_pca():
    torch.manual_seed(0)
    mix = torch.randn(24, 24)
    batches = [torch.randn(60, 24) @ mix + 2.0 for _ in range(4)]
    for kwargs in ({"n_components": 6}, {"n_components": 6, "lowrank": True, "lowrank_seed": 42}):
        want, got = RefPCA(**kwargs), IncrementalPCA(**kwargs)
        for x in batches:
            want.partial_fit(x)
            got.partial_fit(x)
        for attr in ("components_", "singular_values_", "mean_", "var_", "explained_variance_",
                     "explained_variance_ratio_", "noise_variance_", "n_samples_seen_"):
            assert torch.equal(getattr(got, attr), getattr(want, attr)), (kwargs, attr)
    # against the PCA of all rows at once, on data of rank 6 (which 6 components hold whole): the same mean,
    # variance, singular values and components
    low_rank = [torch.randn(60, 6, dtype=torch.float64) @ mix[:6].double() + 2.0 for _ in range(4)]
    everything = torch.cat(low_rank)
    got = IncrementalPCA(n_components=6)
    for x in low_rank:
        got.partial_fit(x.double())
    centred = everything - everything.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    assert torch.allclose(got.mean_, everything.mean(0))
    assert torch.allclose(got.var_, everything.var(0, unbiased=False))
    assert torch.allclose(got.singular_values_, s[:6], rtol=1e-6)
    assert torch.allclose(got.components_.abs(), vh[:6].abs(), atol=1e-6)
    assert torch.allclose(got.transform(everything), centred @ got.components_.T, atol=1e-8)
    with pytest.raises(ValueError, match="n_components=30 invalid"):
        IncrementalPCA(n_components=30).partial_fit(torch.randn(40, 24))


def _eva_rank(rank, world, init_file, out_dir):
    """One rank of test_distributed_inputs_are_gathered: its half of every batch's rows."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        base = tiny_llama()
        half = [{k: v[2 * rank: 2 * rank + 2] for k, v in batch.items()} for batch in _data(base.config.vocab_size)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = pf.get_eva_state_dict(_eva_model(pf, base), half, show_progress_bar=False)
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_inputs_are_gathered_from_every_rank(tmp_path):
    """Under torch.distributed each layer's rows are gathered from all ranks (in rank order) before the PCA step:
    two ranks with half of each batch each give, on both ranks, the components of one process with the whole
    batches."""
    import torch.multiprocessing as mp

    mp.spawn(_eva_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    base = tiny_llama()
    want = pf.get_eva_state_dict(_eva_model(pf, base), _data(base.config.vocab_size), show_progress_bar=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (rank, name)


def test_gpt2_conv1d_layers_with_every_row_match_peft():
    """Conv1D layers (fan_in_fan_out), no model-input preparation (every row of every layer input counts)."""
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, base.config.vocab_size, (4, 12), generator=g)} for _ in range(5)]
    models, states = [], []
    for lib in (ref, pf):
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                                init_lora_weights="eva", eva_config=lib.EvaConfig(rho=2.0, tau=0.9))
        model = lib.get_peft_model(copy.deepcopy(base), config)
        state = lib.get_eva_state_dict(model, data, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                       show_progress_bar=False)
        states.append(dict(state))
        lib.initialize_lora_eva_weights(model, eva_state_dict=state)
        models.append(model)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[1][k], states[0][k]) for k in states[0])
    assert len({w.size(0) for w in states[1].values()}) > 1  # ranks moved
    _assert_same_params(models[1], models[0])
    assert models[1].peft_config["default"].rank_pattern == models[0].peft_config["default"].rank_pattern
    with pytest.raises(ValueError, match="were not found in the model"):
        pf.get_eva_state_dict(_eva_model(pf, tiny_llama()), _data(64), prepare_layer_inputs_fn={"nope": None},
                              show_progress_bar=False)


def test_many_targets_are_written_as_their_shortest_suffixes_as_in_peft():
    """From 20 adapted modules on, target_modules is rewritten as the shortest name suffixes that pick them out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(5)]
    configs = []
    for lib in (ref, pf):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="eva",
            eva_config=lib.EvaConfig(rho=2.0, tau=0.9)))
        lib.initialize_lora_eva_weights(model, data, show_progress_bar=False)
        configs.append(model.peft_config["default"])
    assert configs[1].target_modules == set(configs[0].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert configs[1].rank_pattern == configs[0].rank_pattern
