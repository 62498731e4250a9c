"""LoHa, LoKr and PeftMixedModel against HF PEFT: same seed → same weights, same outputs, gradients, merges, files."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import MLP, EmbConv, rel_err, tiny_llama

LINEAR = ["lin0", "lin1"]
CONVS = ["conv1d", "conv2d", "lin"]
CASES = [
    ("LoHaConfig", MLP, dict(target_modules=LINEAR, init_weights=False)),
    ("LoHaConfig", EmbConv, dict(target_modules=CONVS, init_weights=False, r=4)),
    ("LoHaConfig", EmbConv, dict(target_modules=CONVS, init_weights=False, r=4, use_effective_conv2d=True)),
    ("LoHaConfig", MLP, dict(target_modules=LINEAR, init_weights=False, rank_pattern={"lin1": 3},
                             alpha_pattern={"lin0": 5}, rank_dropout=0.3, module_dropout=0.2)),
    ("LoKrConfig", MLP, dict(target_modules=LINEAR, init_weights=False, r=2)),
    ("LoKrConfig", MLP, dict(target_modules=LINEAR, init_weights=False, r=2, decompose_both=True,
                             rank_dropout=0.3, rank_dropout_scale=True)),
    ("LoKrConfig", EmbConv, dict(target_modules=CONVS, init_weights=False, r=2)),
    ("LoKrConfig", EmbConv, dict(target_modules=CONVS, init_weights=False, r=2, use_effective_conv2d=True)),
    ("LoKrConfig", MLP, dict(target_modules=LINEAR, init_weights="lycoris", r=16, decompose_factor=4)),
]


# HF PEFT's hand-written backward of the Tucker (effective conv) LoHa weight mixes up the two factors' cores, so its
# gradients are not the gradients of its own forward; peft_fast differentiates the forward (checked below).
_PEFT_GRAD_WRONG = {2}


def _inputs(builder):
    g = torch.Generator().manual_seed(3)
    if builder is MLP:
        return torch.randn(6, 10, generator=g)
    return torch.randint(0, 30, (4, 7), generator=g)


def _pair(builder, config_name, kwargs, mixed=False):
    torch.manual_seed(0)
    base = builder()
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        models.append(lib.get_peft_model(copy.deepcopy(base), getattr(lib, config_name)(**kwargs), mixed=mixed))
    return models


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("config_name,builder,kwargs", CASES,
                         ids=[f"{c[0][:4]}-{c[1].__name__}-{i}" for i, c in enumerate(CASES)])
def test_same_weights_outputs_grads_and_merges_as_peft(config_name, builder, kwargs, request):
    ref_model, pf_model = _pair(builder, config_name, kwargs)
    _same_state(ref_model, pf_model)
    assert pf_model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()
    x = _inputs(builder)
    results = []
    for model in (ref_model, pf_model):
        model.train()
        torch.manual_seed(7)  # rank / module dropout draw from torch's generator, in PEFT's order
        y = model(x)
        y.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            y_eval = model(x)
            model.merge_adapter()
            merged = model(x)
            model.unmerge_adapter()
            unmerged = model(x)
        results.append((y.detach(), grads, y_eval, merged, unmerged))
    (y_r, g_r, e_r, m_r, u_r), (y_p, g_p, e_p, m_p, u_p) = results
    assert rel_err(y_p, y_r) < 1e-6 and rel_err(e_p, e_r) < 1e-6
    assert g_r.keys() == g_p.keys() and g_r
    if CASES.index((config_name, builder, kwargs)) in _PEFT_GRAD_WRONG:
        _check_grads_by_finite_differences(pf_model, x)
    else:
        for key in g_r:
            assert rel_err(g_p[key], g_r[key]) < 1e-5, key
    assert rel_err(m_p, e_r) < 1e-5 and rel_err(u_p, e_r) < 1e-5


def _check_grads_by_finite_differences(model, x):
    """Directional derivative along a random direction of all trainable parameters, in float64."""
    model = copy.deepcopy(model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model(x).square().mean().backward()
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = model(x).square().mean().item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = model(x).square().mean().item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_rank1_effective_conv1d_lokr_runs():
    """HF PEFT crashes here (torch.kron on a size-1 layout); peft_fast's forward equals its merged forward."""
    torch.manual_seed(0)
    model = pf.get_peft_model(EmbConv(), pf.LoKrConfig(target_modules=["conv1d"], r=1, init_weights=False,
                                                       use_effective_conv2d=True))
    x = _inputs(EmbConv)
    y = model(x)
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        model.merge_adapter()
        assert rel_err(model(x), y) < 1e-5


@pytest.mark.parametrize("config_name", ["LoHaConfig", "LoKrConfig"])
def test_default_init_is_a_no_op_and_llama_files_load_both_ways(config_name, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_out = base(input_ids=ids).logits
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        config = getattr(lib, config_name)(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"])
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    ref_model, pf_model = models
    with torch.no_grad():
        assert torch.allclose(pf_model(input_ids=ids).logits, base_out, atol=1e-6)
        for p in ref_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    ref_model.save_pretrained(tmp_path / "ref")
    pf_model.load_state_dict(ref_model.state_dict())
    pf_model.save_pretrained(tmp_path / "pf")
    a, b = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(tmp_path / "pf" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref_cfg = ref.PeftConfig.from_pretrained(tmp_path / "ref").to_dict()
    pf_cfg = pf.PeftConfig.from_pretrained(tmp_path / "pf").to_dict()
    assert set(ref_cfg) - {"peft_version"} <= set(pf_cfg)
    loaded_pf = pf.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref")
    loaded_ref = ref.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pf")
    ref_model.eval()
    with torch.no_grad():
        expected = ref_model(input_ids=ids).logits
        assert not torch.allclose(expected, base_out, atol=1e-4)
        assert rel_err(loaded_pf(input_ids=ids).logits, expected) < 1e-6
        assert rel_err(loaded_ref(input_ids=ids).logits, expected) < 1e-6


def _mixed_pair(builder=MLP, targets=LINEAR):
    torch.manual_seed(0)
    base = builder()
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=targets, init_lora_weights=False),
                                   adapter_name="a_lora", mixed=True)
        model.add_adapter("b_loha", lib.LoHaConfig(target_modules=targets, init_weights=False))
        model.add_adapter("c_lokr", lib.LoKrConfig(target_modules=targets[:1], init_weights=False, r=2))
        models.append(model)
    return base, models


def test_mixed_model_matches_peft_for_every_active_set():
    base, (ref_model, pf_model) = _mixed_pair()
    _same_state(ref_model, pf_model)
    assert isinstance(pf_model, pf.PeftMixedModel)
    x = _inputs(MLP)
    for active in (["a_lora"], ["b_loha", "c_lokr"], ["a_lora", "b_loha", "c_lokr"]):
        outs = []
        for model in (ref_model, pf_model):
            model.set_adapter(active)
            assert model.active_adapters == active
            outs.append(model(x))
            assert model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()
        assert rel_err(outs[1], outs[0]) < 1e-6, active
    with torch.no_grad(), pf_model.disable_adapter():
        assert torch.equal(pf_model(x), base(x))
    # merge_and_unload of two of the three (the others are dropped), as PEFT
    ref_merged = ref_model.merge_and_unload(adapter_names=["a_lora", "c_lokr"])
    pf_merged = pf_model.merge_and_unload(adapter_names=["a_lora", "c_lokr"], progressbar=False, safe_merge=True)
    assert type(pf_merged) is MLP
    with torch.no_grad():
        assert rel_err(pf_merged(x), ref_merged(x)) < 1e-5
        assert not torch.allclose(pf_merged(x), base(x))


def test_mixed_model_unload_and_generate():
    torch.manual_seed(0)
    base = tiny_llama()
    targets = ["q_proj", "v_proj"]
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoHaConfig(target_modules=targets, init_weights=False),
                                   mixed=True)
        model.add_adapter("other", lib.LoraConfig(target_modules=targets, init_lora_weights=False))
        model.set_adapter(["default", "other"])
        models.append(model.eval())
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gens = [m.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0) for m in models]
        assert torch.equal(gens[0], gens[1])
        unloaded = models[1].unload()
        assert torch.equal(unloaded(input_ids=ids).logits, base(input_ids=ids).logits)


def test_mixed_model_loads_files_saved_by_peft_models(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    configs = {
        "lora": ref.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "loha": ref.LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"], init_weights=False),
        "lokr": ref.LoKrConfig(task_type="CAUSAL_LM", target_modules=["v_proj"], init_weights=False, r=2),
    }
    for name, config in configs.items():
        torch.manual_seed(hash(name) % 1000)
        ref.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / name)
    models = []
    for lib in (ref, pf):
        model = lib.PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora", adapter_name="lora")
        model.load_adapter(tmp_path / "loha", adapter_name="loha")
        model.load_adapter(tmp_path / "lokr", adapter_name="lokr")
        model.set_adapter(["lora", "loha", "lokr"])
        models.append(model)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out_ref, out_pf = (m(input_ids=ids).logits for m in models)
        assert rel_err(out_pf, out_ref) < 1e-6
        assert not torch.allclose(out_pf, base(input_ids=ids).logits, atol=1e-4)
    assert models[1].get_nb_trainable_parameters() == models[0].get_nb_trainable_parameters()


def test_mixed_model_bad_input_leaves_it_unchanged(tmp_path):
    _, (_, model) = _mixed_pair()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not compatible"):
        model.add_adapter("prompt", pf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("a_lora", pf.LoraConfig(target_modules=LINEAR))
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter(["a_lora", "missing"])
    with pytest.raises(ValueError, match="not compatible"):
        pf.get_peft_model(tiny_llama(), pf.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), mixed=True)
    prompt_model = pf.get_peft_model(tiny_llama(), pf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    prompt_model.save_pretrained(tmp_path / "prompt")
    with pytest.raises(ValueError, match="not compatible"):
        model.load_adapter(tmp_path / "prompt", adapter_name="p")
    with pytest.raises(NotImplementedError, match="Saving"):
        model.save_pretrained(tmp_path / "mixed")
    assert list(model.peft_config) == ["a_lora", "b_loha", "c_lokr"]
    new_state = model.state_dict()
    assert list(new_state) == list(state) and all(torch.equal(state[k], new_state[k]) for k in state)
