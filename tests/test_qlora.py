"""LoRA on bitsandbytes 4-bit / 8-bit layers (QLoRA) on the CPU, against HF PEFT on the same quantized base.

Merging is checked against its definition rather than against PEFT: bitsandbytes 0.50.2's C++ CPU 4-bit
dequantizer reads the wrong block's absmax in several cases (fp32 with double quantization, blocksize ≥ 256, some
small tensors such as 32×32: its own quantize → dequantize error reaches 0.37 instead of 0.09), and both PEFT's
merge and bitsandbytes' CPU forward go through it; peft_fast dequantizes with its own code. The forward tests are
unaffected: both libraries call the same bitsandbytes base layer.
"""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from peft_fast import quantization as Q
from peft_fast.tuners.lora import bnb as pf_bnb
from models import quantize_linears, rel_err, tiny_llama

QUANT_CASES = [
    dict(bits=4, quant_type="nf4"),
    dict(bits=4, quant_type="fp4", compress_statistics=True),
    dict(bits=4, quant_type="nf4", compute_dtype=torch.bfloat16, compress_statistics=True),
    dict(bits=8),
]
IDS = ["nf4", "fp4-double", "nf4-bf16-double", "int8"]


def _base(seed=0, **quant):
    torch.manual_seed(seed)
    return quantize_linears(tiny_llama(), **quant)


def _pair(base, **cfg):
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **cfg)
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    for model in models:  # the same small non-zero B, so the adapters do something realistic
        for name, param in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    param.copy_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return models


def _ids(seed=2):
    return torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(seed))


def _logits_and_grads(models, ids, seed=None):
    """Each model's logits and parameter gradients after one loss.backward() (seed: set before each forward, so that
    dropout draws the same masks in both)."""
    results = []
    for model in models:
        if seed is not None:
            torch.manual_seed(seed)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.parametrize("quant", QUANT_CASES, ids=IDS)
def test_same_outputs_and_grads_as_peft(quant):
    ref_model, pf_model = _pair(_base(**quant))
    layer = pf_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is (pf_bnb.Linear4bit if quant["bits"] == 4 else pf_bnb.Linear8bitLt)
    ref_state, pf_state = ref_model.state_dict(), pf_model.state_dict()
    assert list(ref_state) == list(pf_state)
    ids = _ids()
    (logits_r, grads_r), (logits_p, grads_p) = _logits_and_grads((ref_model, pf_model), ids)
    assert rel_err(logits_p, logits_r) < 1e-6
    assert grads_r.keys() == grads_p.keys() and grads_r
    for key in grads_r:
        assert rel_err(grads_p[key], grads_r[key]) < 1e-5, key
    assert pf_model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()


def test_bnb_layers_are_chosen_without_the_loaded_in_flag():
    base = _base(bits=4)
    del base.is_loaded_in_4bit  # built from bnb modules by hand
    model = pf.get_peft_model(base, pf.LoraConfig(target_modules=["q_proj"]))
    assert type(model.base_model.model.model.layers[1].self_attn.q_proj) is pf_bnb.Linear4bit


def _independent_delta(layer) -> torch.Tensor:
    """s · B A from the adapter weights themselves (fp32), after checking the layer's own get_delta_weight against
    it, so that the merge oracles below do not rest on the code under test."""
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    delta = layer.scaling["default"] * (b @ a)
    assert rel_err(layer.get_delta_weight("default").float(), delta) < 1e-6
    return delta


def _requantized(values, like):
    state = like.quant_state
    return Q.quantize_4bit(values, blocksize=state.blocksize, quant_type=state.quant_type,
                           compress_statistics=state.nested)[0]


@pytest.mark.parametrize("quant", QUANT_CASES[:3], ids=IDS[:3])
def test_4bit_merge_requantizes_the_exact_sum(quant):
    """merge = quantize(dequantize(W) + s·BA), unmerge = quantize(dequantize(merged) − s·BA), both bit-exact.
    Mutation tried: an unmerge that forgets the scaling (passed the old `< 0.2` check, fails here)."""
    _, model = _pair(_base(**quant))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    weight = layer.get_base_layer().weight
    before = Q.dequantize_4bit(weight.data, weight.quant_state)
    _independent_delta(layer)
    expected = _requantized(before + layer.get_delta_weight("default"), weight)
    with pytest.warns(UserWarning, match="rounding errors"):
        layer.merge()
    merged = layer.get_base_layer().weight
    assert type(merged).__name__ == "Params4bit" and merged.dtype == torch.uint8
    assert torch.equal(merged.data, expected)
    merged_values = Q.dequantize_4bit(merged.data, merged.quant_state)
    expected_back = _requantized(merged_values - layer.get_delta_weight("default"), merged)
    with pytest.warns(UserWarning, match="rounding errors"):
        layer.unmerge()
    after = layer.get_base_layer().weight
    assert torch.equal(after.data, expected_back)


def test_merge_and_unload_requantizes_each_exact_sum():
    """Every merged layer is quantize(dequantize(W) + s·BA) bit for bit. Mutations tried: merging 0.7·ΔW or
    1.3·ΔW (passed the old `< 0.12` tolerance)."""
    _, model = _pair(_base(bits=4, quant_type="nf4"))
    layers = {n: m for n, m in model.base_model.model.named_modules() if type(m) is pf_bnb.Linear4bit}
    expected = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        _independent_delta(layer)
        values = Q.dequantize_4bit(weight.data, weight.quant_state) + layer.get_delta_weight("default")
        expected[name] = _requantized(values, weight)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged_model = model.merge_and_unload(progressbar=False, safe_merge=True)
    assert len(expected) == 14
    for name, target in expected.items():
        merged = merged_model.get_submodule(name)
        assert type(merged).__name__ == "Linear4bit"
        assert torch.equal(merged.weight.data, target), name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_8bit_merge_matches_peft(use_dora):  # (int8: bitsandbytes dequantizes right on the CPU)
    ref_model, pf_model = _pair(_base(bits=8), use_dora=use_dora)
    ids = _ids()
    with torch.no_grad():
        a = ref_model.merge_and_unload()(input_ids=ids).logits
        b = pf_model.merge_and_unload()(input_ids=ids).logits
    assert rel_err(b, a) < (1e-5 if use_dora else 1e-6)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("quant", [QUANT_CASES[0], QUANT_CASES[3]], ids=["nf4", "int8"])
def test_adapter_files_move_both_ways_on_the_quantized_base(quant, use_dora, tmp_path, peft_dora_dequantizes_right):
    base = _base(**quant)
    ref_model, pf_model = _pair(base, use_dora=use_dora)
    ref_model.save_pretrained(tmp_path / "ref")
    pf_model.save_pretrained(tmp_path / "pf")
    ids = _ids()
    loaded_pf = pf.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref")
    loaded_ref = ref.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pf")
    ref_model.eval()  # bitsandbytes' 8-bit layers compute differently in training mode
    with torch.no_grad():
        expected = ref_model(input_ids=ids).logits
        tol = 1e-5 if use_dora else 1e-6
        assert rel_err(loaded_pf(input_ids=ids).logits, expected) < tol
        assert rel_err(loaded_ref(input_ids=ids).logits, expected) < tol


@pytest.mark.parametrize("checkpointing", [False, True])
def test_short_qlora_finetune_tracks_peft(checkpointing):
    base = _base(bits=4, quant_type="nf4", compress_statistics=True)
    losses = []
    for lib in (ref, pf):
        model = lib.prepare_model_for_kbit_training(copy.deepcopy(base), use_gradient_checkpointing=checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        model = lib.get_peft_model(model, lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False, task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for step in range(6):
            ids = _ids(seed=10)  # one batch: the adapters can only fit it
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0]
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-4 * abs(a)


@pytest.fixture
def peft_dora_dequantizes_right(monkeypatch):
    """HF PEFT's DoRA with a right 4-bit dequantizer: it calls bitsandbytes', whose CPU code is wrong on these small
    weights (module docstring: 0.39 relative error on the tiny model's 32×32 projections); the CUDA one is right and
    the same as peft_fast's (tests/test_quantization.py), which this puts in its place. The rest is PEFT's own."""
    from peft.tuners.lora import dora as ref_dora

    original = ref_dora.dequantize_module_weight

    def dequantize(module):
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            return original(module)
        return Q.dequantize_4bit(weight.data, weight.quant_state)

    monkeypatch.setattr(ref_dora, "dequantize_module_weight", dequantize)


@pytest.mark.parametrize("quant", QUANT_CASES, ids=IDS)
def test_dora_on_quantized_layers_matches_peft(quant, peft_dora_dequantizes_right):
    """QDoRA: DoRA's magnitude over the dequantized base weight; logits and every gradient (magnitudes included)
    as HF PEFT's, with B non-zero so that each layer's norm differs from its magnitude."""
    ref_model, pf_model = _pair(_base(**quant), use_dora=True)
    layer = pf_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.lora_magnitude_vector["default"]) is pf_bnb.DoraQuantLinearLayer
    assert list(ref_model.state_dict()) == list(pf_model.state_dict())
    ids = _ids()
    (logits_r, grads_r), (logits_p, grads_p) = _logits_and_grads((ref_model, pf_model), ids)
    assert rel_err(logits_p, logits_r) < 1e-5
    assert grads_r.keys() == grads_p.keys() and any("lora_magnitude_vector" in k for k in grads_r)
    for key in grads_r:
        assert rel_err(grads_p[key], grads_r[key]) < 1e-4, key
    # the DoRA term matters here: without its rescaling the logits move
    with pf_model.disable_adapter(), torch.no_grad():
        assert rel_err(pf_model(input_ids=ids).logits, logits_p) > 1e-3


@pytest.mark.parametrize("quant", [QUANT_CASES[0], QUANT_CASES[3]], ids=["nf4", "int8"])
def test_dora_with_dropout_on_quantized_layers_matches_peft(quant, peft_dora_dequantizes_right):
    """With dropout in training, DoRA recomputes the base output from the dropped x and the dequantized weight."""
    ref_model, pf_model = _pair(_base(**quant), use_dora=True, lora_dropout=0.3)
    ids = _ids()
    (logits_r, grads_r), (logits_p, grads_p) = _logits_and_grads((ref_model, pf_model), ids, seed=5)
    assert rel_err(logits_p, logits_r) < 1e-5
    for key in grads_r:
        assert rel_err(grads_p[key], grads_r[key]) < 1e-4, key
    torch.manual_seed(6)  # other masks give other logits: the dropout is in the compared path
    assert rel_err(pf_model(input_ids=ids).logits.detach(), logits_p) > 1e-4


def test_4bit_dora_merge_requantizes_the_rescaled_sum():
    """merge = quantize(m / ‖W + ΔW‖ · (W + ΔW)) row-wise with W = dequantize(packed), unmerge = quantize(merged /
    that factor − ΔW), bit-exact, the factor computed here from the magnitude and the dequantized weight."""
    _, model = _pair(_base(bits=4, quant_type="nf4"), use_dora=True)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    weight = layer.get_base_layer().weight
    before = Q.dequantize_4bit(weight.data, weight.quant_state)
    delta = _independent_delta(layer)
    magnitude = layer.lora_magnitude_vector["default"].weight.detach()
    factor = (magnitude / torch.linalg.norm(before.float() + delta, dim=1)).view(-1, 1)
    assert (factor - 1).abs().max() > 1e-4  # (a factor of 1 would not tell a forgotten rescale)
    expected = _requantized(factor * (before + delta), weight)
    with pytest.warns(UserWarning, match="rounding errors"):
        layer.merge()
    merged = layer.get_base_layer().weight
    assert torch.equal(merged.data, expected)
    expected_back = _requantized(Q.dequantize_4bit(merged.data, merged.quant_state) / factor - delta, merged)
    with pytest.warns(UserWarning, match="rounding errors"):
        layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight.data, expected_back)
    assert not layer.merged and not layer._caches


@pytest.mark.parametrize("gc_kwargs", [None, {"use_reentrant": False}])
def test_prepare_model_for_kbit_training_matches_peft_on_a_4bit_model(gc_kwargs):
    torch.manual_seed(0)
    base = quantize_linears(tiny_llama().to(torch.bfloat16), bits=4, compute_dtype=torch.bfloat16)
    prepared = [lib.prepare_model_for_kbit_training(copy.deepcopy(base), gradient_checkpointing_kwargs=gc_kwargs)
                for lib in (ref, pf)]
    (ref_model, pf_model) = prepared
    ref_params, pf_params = dict(ref_model.named_parameters()), dict(pf_model.named_parameters())
    assert ref_params.keys() == pf_params.keys()
    for name, param in ref_params.items():
        assert (pf_params[name].dtype, pf_params[name].requires_grad) == (param.dtype, param.requires_grad), name
    assert pf_params["model.norm.weight"].dtype == torch.float32  # norms upcast, 4-bit weights untouched
    assert pf_params["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert pf_model.is_gradient_checkpointing and ref_model.is_gradient_checkpointing
    ids = _ids()
    captured = []
    for model in prepared:  # whether the input embeddings require grad (reentrant checkpointing needs it)
        handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: captured.append(o.requires_grad))
        model(input_ids=ids)
        handle.remove()
    assert captured[0] == captured[1]
    if gc_kwargs is None:
        assert captured[1]
