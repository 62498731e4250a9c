"""LoRA-GA initialization (preprocess_loraga, init_lora_weights="lora_ga", LoraGAConfig) against HF PEFT and its
definition: the averaged gradients, the adapters and residual weights bit for bit PEFT's for every direction and
scale, the cache, the conversion on save, and the refusals (which leave the model as it was)."""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import quantize_linears, save_trained_and_converted, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.filterwarnings("ignore")  # (PEFT's and transformers' warnings of tiny models)


def _ids(seed=3):
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))


def _steps(model, ids):
    """A train_step of two backward passes (two half batches)."""
    def step():
        for i in range(2):
            model(input_ids=ids[2 * i: 2 * i + 2], labels=ids[2 * i: 2 * i + 2]).loss.backward()
    return step


def _lora_ga(lib, base, direction="ArB2r", scale="stable", dtype=torch.float32, **kwargs):
    model = copy.deepcopy(base).to(dtype)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                            lora_ga_config=lib.LoraGAConfig(direction=direction, scale=scale), **kwargs)
    lib.preprocess_loraga(model, config, _steps(model, _ids()))
    torch.manual_seed(5)  # (svd_lowrank and the "random" direction draw from the global generator, as in PEFT)
    return lib.get_peft_model(model, config)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale"),
                                             ("random", "unit"), ("ArB2r", "weight_svd"), ("random", "stable")])
def test_lora_ga_matches_peft(direction, scale):
    torch.manual_seed(0)
    base = tiny_llama()
    want, got = _lora_ga(ref, base, direction, scale), _lora_ga(pf, base, direction, scale)
    pw, pg = dict(want.named_parameters()), dict(got.named_parameters())
    assert pw.keys() == pg.keys()
    for name in pw:
        assert torch.equal(pg[name], pw[name]), name
    ids = _ids(7)
    with torch.no_grad():  # the residual weights keep the model's function at the start
        torch.testing.assert_close(got(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        layer = got.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.lora_A["default"].weight.abs().sum() > 0 and layer.lora_B["default"].weight.abs().sum() > 0


def test_bf16_model_matches_peft_and_gpt2_conv1d_runs():
    torch.manual_seed(0)
    base = tiny_llama()
    want, got = _lora_ga(ref, base, dtype=torch.bfloat16), _lora_ga(pf, base, dtype=torch.bfloat16)
    for (nw, w), (ng, g) in zip(want.named_parameters(), got.named_parameters()):
        assert nw == ng and w.dtype == g.dtype and torch.equal(w, g), nw
    gpt2 = tiny_gpt2()
    config = pf.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="lora_ga", fan_in_fan_out=True,
                           lora_ga_config=pf.LoraGAConfig())
    ids = _ids()
    pf.preprocess_loraga(gpt2, config, lambda: gpt2(input_ids=ids, labels=ids).loss.backward())
    reference = copy.deepcopy(gpt2).eval()
    model = pf.get_peft_model(gpt2, config).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_gradient_is_the_mean_over_backward_passes_and_the_adapter_its_singular_vectors():
    torch.manual_seed(0)
    base = tiny_llama()
    ids = _ids()
    grads = []
    for i in range(2):  # each half batch's gradient of q_proj's weight, by autograd directly
        model = copy.deepcopy(base)
        loss = model(input_ids=ids[2 * i: 2 * i + 2], labels=ids[2 * i: 2 * i + 2]).loss
        grads.append(torch.autograd.grad(loss, model.model.layers[0].self_attn.q_proj.weight)[0])
    model = copy.deepcopy(base).train(False)
    config = pf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                           lora_ga_config=pf.LoraGAConfig(direction="ArB2r", scale="unit"))
    frozen = model.model.embed_tokens.weight.requires_grad_(False)
    pf.preprocess_loraga(model, config, _steps(model, ids))
    q = model.model.layers[0].self_attn.q_proj
    mean = (grads[0] + grads[1]) / 2
    torch.testing.assert_close(q._peft_loraga_grad, mean, rtol=1e-5, atol=1e-7)
    assert not model.training and q.weight.grad is None and not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    weight = q.weight.detach().clone()
    peft_model = pf.get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    u, sv, vh = torch.linalg.svd(mean.double())
    # ArB2r: A = the gradient's first r right singular vectors, B = the next r left ones times their values
    # (svd_lowrank's are the exact ones here: rank-4·r subspace iteration of a small matrix), signs as they come
    for j in range(4):
        assert abs(torch.dot(a[j].double(), vh[j]).abs() - 1) < 1e-4
        assert abs(torch.dot(b[:, j].double() / sv[4 + j], u[:, 4 + j]).abs() - 1) < 1e-4
    torch.testing.assert_close(layer.base_layer.weight + s * b @ a, weight, rtol=1e-5, atol=1e-6)
    assert not hasattr(layer.base_layer, "_peft_loraga_grad")


def test_cache_file_is_written_then_read_instead_of_training(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    cache = str(tmp_path / "sub" / "grads.pt")
    config = pf.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                           lora_ga_config=pf.LoraGAConfig())
    first = copy.deepcopy(base)
    pf.preprocess_loraga(first, config, _steps(first, _ids()), cache_file=cache)
    second = copy.deepcopy(base)

    def never():
        raise AssertionError("train_step ran although the cache exists")
    pf.preprocess_loraga(second, config, never, cache_file=cache)
    for (n1, m1), (n2, m2) in zip(first.named_modules(), second.named_modules()):
        if hasattr(m1, "_peft_loraga_grad"):
            assert torch.equal(m1._peft_loraga_grad, m2._peft_loraga_grad), n1
    other = pf.LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights="lora_ga",
                          lora_ga_config=pf.LoraGAConfig())
    with pytest.raises(ValueError, match="has no gradient for"):
        pf.preprocess_loraga(copy.deepcopy(base), other, never, cache_file=cache)


def test_conversion_on_save_gives_a_plain_lora_adapter_on_the_original_base(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    model = _lora_ga(pf, base).eval()
    converted = save_trained_and_converted(model, str(tmp_path))
    ids = _ids(9)
    for lib in (pf, ref):
        plain = lib.PeftModel.from_pretrained(copy.deepcopy(base), converted).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_layers_without_a_gradient_get_the_default_init_and_refusals_change_nothing():
    torch.manual_seed(0)
    base = tiny_llama()
    config = pf.LoraConfig(r=4, target_modules=TARGETS + ["embed_tokens"], init_lora_weights="lora_ga",
                           lora_ga_config=pf.LoraGAConfig())
    model = copy.deepcopy(base)
    pf.preprocess_loraga(model, config, _steps(model, _ids()))
    peft_model = pf.get_peft_model(model, config)  # (the embedding: no gradient, default init as in PEFT)
    emb = peft_model.base_model.model.model.embed_tokens
    assert not emb.lora_embedding_A["default"].any()

    with pytest.raises(ValueError, match="lora_ga_config"):
        pf.preprocess_loraga(copy.deepcopy(base), pf.LoraConfig(r=4, target_modules=TARGETS), lambda: None)
    with pytest.raises(ValueError, match="direction"):
        pf.LoraGAConfig(direction="sideways")
    with pytest.raises(ValueError, match="scale"):
        pf.LoraGAConfig(scale="huge")
    model = copy.deepcopy(base)
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    good = pf.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=pf.LoraGAConfig())

    def broken():
        model(input_ids=_ids()).logits.sum().backward()
        raise RuntimeError("out of data")
    model.eval()
    with pytest.raises(RuntimeError, match="out of data"):
        pf.preprocess_loraga(model, good, broken)
    assert not model.training
    for name, param in model.named_parameters():
        assert param.requires_grad == before[name][0] and param.grad is None and torch.equal(param, before[name][1])
        assert not hasattr(model.get_submodule(name.rsplit(".", 1)[0]), "_peft_loraga_grad")
    quantized = quantize_linears(copy.deepcopy(base), compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="quantized"):
        pf.preprocess_loraga(quantized, good, lambda: None)
    with pytest.raises(ValueError, match="No supported layers"):
        pf.preprocess_loraga(copy.deepcopy(base), pf.LoraConfig(
            r=4, target_modules=["nothing_here"], init_lora_weights="lora_ga", lora_ga_config=pf.LoraGAConfig()),
            lambda: None)


def test_config_round_trip(tmp_path):
    config = pf.LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"direction": "ArBr", "stable_gamma": 4})
    assert config.lora_ga_config == pf.LoraGAConfig(direction="ArBr", stable_gamma=4)
    config.save_pretrained(tmp_path)
    assert ref.LoraConfig.from_pretrained(tmp_path).lora_ga_config == ref.LoraGAConfig(direction="ArBr", stable_gamma=4)
    ref.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=ref.LoraGAConfig(scale="unit")).save_pretrained(
        tmp_path / "ref")
    assert pf.LoraConfig.from_pretrained(tmp_path / "ref").lora_ga_config == pf.LoraGAConfig(scale="unit")
