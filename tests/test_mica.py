"""MiCA (init_lora_weights="mica": B from the base weight's minor left singular vectors, A zero, B frozen) against
HF PEFT and its definition: the same weights and trainable set, the same training, B staying frozen through adapter
switching and loading, files both ways, and the refusals."""

import copy

import peft as ref
import pytest
import torch
from torch import nn

import peft_fast as pf
from models import tiny_llama

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


pytestmark = pytest.mark.filterwarnings("ignore")  # (PEFT's and transformers' warnings of tiny models)


def _ids(seed=1):
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))


def _mica(lib, base, dtype=torch.float32, **kwargs):
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="mica", **kwargs)
    return lib.get_peft_model(copy.deepcopy(base).to(dtype), config)


def _trainable(model):
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def test_mica_matches_peft_and_trains_a_alone():
    torch.manual_seed(0)
    base = tiny_llama()
    want, got = _mica(ref, base), _mica(pf, base)
    pw, pg = dict(want.named_parameters()), dict(got.named_parameters())
    assert pw.keys() == pg.keys() and all(torch.equal(pg[n], pw[n]) for n in pw)
    assert _trainable(got) == _trainable(want)
    assert _trainable(got) and not any("lora_B" in n or "lora_embedding_B" in n for n in _trainable(got))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, base(input_ids=ids).logits)  # B·A = 0, W untouched
    frozen = {n: p.detach().clone() for n, p in got.named_parameters() if "_B" in n}
    for model in (want, got):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for name, param in got.named_parameters():
        assert torch.equal(param, dict(want.named_parameters())[name]), name
        if name in frozen:
            assert torch.equal(param, frozen[name]) and param.grad is None, name
    assert dict(got.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].any()


def test_b_spans_the_minor_left_singular_directions():
    torch.manual_seed(0)
    base = tiny_llama()
    model = _mica(pf, base)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    w = layer.base_layer.weight.detach()  # out × in
    b = layer.lora_B["default"].weight.detach()
    sv = torch.linalg.svdvals(w)
    assert torch.allclose(b.T @ b, torch.eye(4), atol=1e-5)  # orthonormal columns
    # ‖Wᵀ b_j‖ are the r smallest singular values
    torch.testing.assert_close(torch.sort((w.T @ b).norm(dim=0)).values, torch.sort(sv[-4:]).values, rtol=1e-4,
                               atol=1e-6)
    assert not layer.lora_A["default"].weight.any()
    emb = model.base_model.model.model.embed_tokens
    eb = emb.lora_embedding_B["default"].detach()  # dim × r, from the embedding's transposed weight (dim × vocab)
    esv = torch.linalg.svdvals(emb.base_layer.weight.detach().T)
    torch.testing.assert_close(torch.sort((emb.base_layer.weight.detach() @ eb).norm(dim=0)).values,
                               torch.sort(esv[-4:]).values, rtol=1e-4, atol=1e-6)


def test_bf16_model_keeps_b_frozen_after_the_fp32_cast():
    """On a bf16 model the adapters are kept in fp32 (autocast_adapter_dtype). HF PEFT 0.21 makes the embedding's
    B trainable again in that cast; peft_fast keeps it frozen. The linear layers' weights equal PEFT's."""
    torch.manual_seed(0)
    base = tiny_llama()
    want, got = _mica(ref, base, torch.bfloat16), _mica(pf, base, torch.bfloat16)
    pw = dict(want.named_parameters())
    for name, param in got.named_parameters():
        assert param.dtype == pw[name].dtype and torch.equal(param, pw[name]), name
    assert _trainable(got) == [n for n in _trainable(want) if "lora_embedding_B" not in n]


def test_b_stays_frozen_through_switching_and_loading(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    model = _mica(pf, base)
    expected = _trainable(model)
    model.add_adapter("other", pf.LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("other")
    model.set_adapter("default")
    assert _trainable(model) == expected
    with model.disable_adapter():
        pass
    assert _trainable(model) == expected
    model.base_model.enable_adapter_layers()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_requires_grad("default", True)
    assert not layer.lora_B["default"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    model.delete_adapter("other")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_embedding_A" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "pf")
    ids = _ids(3)
    for lib, folder in ((ref, tmp_path / "pf"), (pf, tmp_path / "pf")):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
        assert _trainable(loaded) == expected
    want = _mica(ref, base)
    want.save_pretrained(tmp_path / "ref")
    loaded = pf.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref", is_trainable=True)
    assert _trainable(loaded) == expected


def test_refusals_leave_the_model_as_it_was():
    torch.manual_seed(0)
    base = tiny_llama()
    with pytest.raises(ValueError, match="DoRA or aLoRA"):
        pf.LoraConfig(init_lora_weights="mica", use_dora=True)
    model = copy.deepcopy(base)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="MiCA requires `r` <= min"):
        pf.get_peft_model(model, pf.LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="mica"))
    assert all(type(m) is not pf.tuners.lora.Linear for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="not supported for conv layers"):
        pf.get_peft_model(conv, pf.LoraConfig(r=2, target_modules=["0"], init_lora_weights="mica"))
