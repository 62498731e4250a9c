"""LoRA on torch's nn.MultiheadAttention: PEFT's layers, keys and files, and the arithmetic of W + ΔW on both the
stacked q/k/v projection and out_proj (checked against an attention module with the deltas added by hand: HF PEFT
0.21.2 adds out_proj's delta twice in its forward, see the last test)."""

import peft as ref
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peft_fast as pf
from peft_fast.tuners.lora.multihead_attention import MultiheadAttention


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def net():
    torch.manual_seed(0)
    return Net()


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))


def adapted(lib, **kw):
    model = net()
    torch.manual_seed(1)
    return lib.get_peft_model(model, lib.LoraConfig(target_modules=["attn"], init_lora_weights=False, r=2, **kw))


def by_hand(files: dict, scale: float, out_proj_times: int = 1) -> Net:
    """The base model with the saved adapter's deltas added to its weights directly."""
    model = net()
    key = "base_model.model.attn.{}lora_{}.weight"
    with torch.no_grad():
        model.attn.in_proj_weight += scale * files[key.format("", "B")] @ files[key.format("", "A")]
        delta = scale * files[key.format("base_layer.out_proj.", "B")] @ files[key.format("base_layer.out_proj.", "A")]
        model.attn.out_proj.weight += out_proj_times * delta
    return model


def test_forward_and_gradients_are_those_of_the_weights_with_the_deltas(tmp_path):
    model = adapted(pf)
    assert isinstance(model.base_model.model.attn, MultiheadAttention)
    out = model(X)
    model.save_pretrained(tmp_path)
    files = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(out, by_hand(files, 8 / 2)(X))
    out.pow(2).sum().backward()
    # gradient of the adapter = gradient of the weight it adds to, through ΔW = s·B·A
    leaf = net()
    weight = nn.Parameter(by_hand(files, 4.0).attn.in_proj_weight.detach().clone())
    leaf.attn.in_proj_weight = weight
    leaf.attn.out_proj.weight = nn.Parameter(by_hand(files, 4.0).attn.out_proj.weight.detach().clone())
    leaf(X).pow(2).sum().backward()
    lora_b = model.base_model.model.attn.lora_B["default"].weight
    lora_a = model.base_model.model.attn.lora_A["default"].weight
    torch.testing.assert_close(lora_b.grad, 4.0 * weight.grad @ lora_a.detach().t(), rtol=1e-3, atol=1e-4)


def test_same_layers_keys_and_files_as_peft(tmp_path):
    ours, theirs = adapted(pf), adapted(ref)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # same init under the same seed
    loaded = pf.PeftModel.from_pretrained(net(), tmp_path / "theirs")
    torch.testing.assert_close(loaded(X), ours(X))


def test_merge_unmerge_unload_disable_and_inference_mode():
    model = adapted(pf)
    out = model(X).detach()
    with model.disable_adapter():
        torch.testing.assert_close(model(X), net()(X))
    model.merge_adapter()
    torch.testing.assert_close(model(X), out)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.attn.base_layer.in_proj_weight, net().attn.in_proj_weight)
    torch.testing.assert_close(model(X), out)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)  # torch's own inference fast path, on the effective weights
    plain = model.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj).__name__ == \
        "NonDynamicallyQuantizableLinear"
    torch.testing.assert_close(plain(X), out)


def test_transformer_encoder_layer_fast_path_sees_the_adapter():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    torch.manual_seed(1)
    model = pf.get_peft_model(layer, pf.LoraConfig(target_modules=["self_attn"], init_lora_weights=False))
    model.eval()
    slow = model(X).detach()
    with torch.no_grad():  # TransformerEncoderLayer reads self_attn.in_proj_weight / out_proj.weight itself here
        fast = model(X)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(model(X), slow)


def test_refused_configs_and_deletion_leave_the_attention_module_as_it_was():
    model = net()
    out_proj = model.attn.out_proj
    with pytest.raises(ValueError, match="DoRA"):
        pf.get_peft_model(model, pf.LoraConfig(target_modules=["attn"], use_dora=True))
    assert type(model.attn) is nn.MultiheadAttention and model.attn.out_proj is out_proj
    peft_model = pf.get_peft_model(model, pf.LoraConfig(target_modules=["attn"]))
    peft_model.add_adapter("other", pf.LoraConfig(target_modules=["attn"], r=4))
    attn = peft_model.base_model.model.attn
    assert sorted(attn.base_layer.out_proj.lora_A) == ["default", "other"]
    peft_model.eval()
    with pytest.raises(TypeError, match="mixed adapter batches"):
        attn(X, X, X, adapter_names=["default", "other"])
    peft_model.delete_adapter("other")
    peft_model.delete_adapter("default")
    assert attn.base_layer.out_proj is out_proj  # no adapter left: the module's own out_proj is back


def test_hf_peft_adds_the_out_proj_delta_twice():
    """Why this file checks against weights with the deltas added by hand rather than against HF PEFT's forward:
    PEFT 0.21.2's MultiheadAttention.merge adds out_proj's delta to its weight and then merges out_proj again."""
    theirs = adapted(ref)
    files = {k: v.detach() for k, v in ref.get_peft_model_state_dict(theirs).items()}
    files = {f"base_model.model.{k}" if not k.startswith("base_model") else k: v for k, v in files.items()}
    torch.testing.assert_close(theirs(X), by_hand(files, 4.0, out_proj_times=2)(X))
    torch.testing.assert_close(adapted(pf)(X), by_hand(files, 4.0, out_proj_times=1)(X))


def test_adapters_follow_the_attention_modules_device_and_dtype_as_peft():
    """The layer has no `weight`: its adapters follow in_proj_weight (bf16 here, kept so without autocast), as
    PEFT's follow the module's weights; before, they stayed where nn.Linear made them (fp32, and on the CPU)."""
    dtypes = {}
    for lib in (ref, pf):
        model = lib.get_peft_model(net().to(torch.bfloat16), lib.LoraConfig(target_modules=["attn"]),
                                   autocast_adapter_dtype=False)
        dtypes[lib.__name__] = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes["peft_fast"] == dtypes["peft"]
    assert set(dtypes["peft_fast"].values()) == {torch.bfloat16}
