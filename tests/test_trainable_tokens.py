"""Trainable tokens (LoraConfig.trainable_token_indices, TrainableTokensConfig): a few embedding rows train, layers
tied to the embedding follow them; HF PEFT is the oracle (outputs, gradients, trainable names, saved files)."""

import os
import warnings

import peft as ref
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peft_fast as pf
from peft_fast.tuners.trainable_tokens import TrainableTokensLayer
from peft_fast.utils.other import TrainableTokensWrapper

TOKENS = [1, 3, 5]


def llama(tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0,
    ))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def ids():
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    x[0, :3] = torch.tensor(TOKENS)
    return x


def set_rows(model):
    """Give every adapter's rows distinct values (the default init equals the base rows: a no-op)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) + hash(name) % 7 / 10)


def config(lib, kind, **kw):
    if kind == "lora":
        return lib.LoraConfig(target_modules=["q_proj", "c_attn"], trainable_token_indices=TOKENS, **kw)
    return lib.TrainableTokensConfig(token_indices=TOKENS, **kw)


def run(lib, make, cfg, tmp_path):
    model = lib.get_peft_model(make(), cfg)
    set_rows(model)
    out = model(ids()).logits
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    folder = tmp_path / lib.__name__
    model.save_pretrained(folder)
    return model, out.detach(), grads, load_file(folder / "adapter_model.safetensors"), folder


@pytest.mark.parametrize("make", [lambda: llama(True), lambda: llama(False), gpt2], ids=["tied", "untied", "gpt2"])
@pytest.mark.parametrize("kind", ["lora", "tokens"])
def test_same_outputs_gradients_and_files_as_peft(make, kind, tmp_path):
    kw = {"init_lora_weights": False} if kind == "lora" else {}
    _, out_ref, grads_ref, file_ref, _ = run(ref, make, config(ref, kind, **kw), tmp_path)
    model, out, grads, file, _ = run(pf, make, config(pf, kind, **kw), tmp_path)
    torch.testing.assert_close(out, out_ref)
    assert sorted(grads) == sorted(grads_ref)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6)
    assert sorted(file) == sorted(file_ref)
    for key in file:
        assert torch.equal(file[key], file_ref[key])
    assert any("trainable_tokens_delta" in k for k in file)
    assert not any("embed_tokens.weight" in k or "wte.weight" in k for k in file), "no whole embedding matrix"


@pytest.mark.parametrize("kind", ["lora", "tokens"])
def test_adapter_files_load_both_ways(kind, tmp_path):
    kw = {"init_lora_weights": False} if kind == "lora" else {}
    _, out_ref, _, _, folder_ref = run(ref, llama, config(ref, kind, **kw), tmp_path)
    _, out, _, _, folder = run(pf, llama, config(pf, kind, **kw), tmp_path)
    loaded = pf.PeftModel.from_pretrained(llama(), folder_ref)
    torch.testing.assert_close(loaded(ids()).logits, out_ref)
    back = ref.PeftModel.from_pretrained(llama(), folder)
    torch.testing.assert_close(back(ids()).logits, out)


def test_tied_lm_head_follows_the_embedding_rows_and_only_the_embedding_saves_them():
    model = pf.get_peft_model(llama(), pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    inner = model.base_model.model
    embed, head = inner.model.embed_tokens, inner.lm_head
    assert isinstance(embed, TrainableTokensWrapper) and isinstance(head, TrainableTokensWrapper)
    assert head.token_adapter.tied_adapter is embed.token_adapter
    assert head.token_adapter.trainable_tokens_delta["default"] is embed.token_adapter.trainable_tokens_delta["default"]
    set_rows(model)
    rows = embed.token_adapter.trainable_tokens_delta["default"]
    hidden = torch.randn(4, 16)
    expected = hidden @ embed.weight.t()  # the embedding's weight with the rows in place
    torch.testing.assert_close(head(hidden), expected)
    torch.testing.assert_close(expected[:, TOKENS], hidden @ rows.t())
    # one trainable tensor for the rows, however many layers share it
    assert sum("trainable_tokens_delta" in n for n, p in model.named_parameters() if p.requires_grad) == 1


def test_merge_and_unload_gives_the_plain_model_with_the_rows_and_the_tie_kept():
    model = pf.get_peft_model(llama(), pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    set_rows(model)
    expected = model(ids()).logits.detach()
    plain = model.merge_and_unload()
    assert type(plain.model.embed_tokens) is nn.Embedding and type(plain.lm_head) is nn.Linear
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(plain(ids()).logits, expected)


def test_merge_unmerge_and_disable_adapter():
    base = llama()
    base_out = base(ids()).logits.detach()
    base_weight = base.model.embed_tokens.weight.detach().clone()
    model = pf.get_peft_model(base, pf.TrainableTokensConfig(token_indices=TOKENS))
    set_rows(model)
    adapted = model(ids()).logits.detach()
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids()).logits, base_out)
    model.merge_adapter()
    torch.testing.assert_close(model(ids()).logits, adapted)
    model.unmerge_adapter()
    torch.testing.assert_close(model(ids()).logits, adapted)
    embed = model.base_model.model.model.embed_tokens
    with model.disable_adapter():
        torch.testing.assert_close(model(ids()).logits, base_out)
    assert torch.equal(embed.base_layer.weight, base_weight)


def test_two_adapters_switch_delete_and_mixed_batch():
    model = pf.get_peft_model(llama(False), pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2],
                                                          init_lora_weights=False))
    model.add_adapter("other", pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 4],
                                             init_lora_weights=False))
    model.add_adapter("plain", pf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    set_rows(model)
    x = torch.tensor([[1, 2, 3, 4, 5]] * 3)
    outs = {}
    for name in ("default", "other", "plain"):
        model.set_adapter(name)
        outs[name] = model(x).logits.detach()
    embed = model.base_model.model.model.embed_tokens
    assert embed.active_adapters == [] and embed.token_adapter.active_adapters == []  # "plain" trains no tokens
    assert not torch.allclose(outs["default"], outs["other"])
    model.eval()
    mixed = model(x, adapter_names=["other", "default", "plain"]).logits
    for i, name in enumerate(["other", "default", "plain"]):
        torch.testing.assert_close(mixed[i], outs[name][i])
    model.set_adapter("default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta.default" in n for n in trainable)
    assert not any("trainable_tokens_delta.other" in n for n in trainable)
    model.delete_adapter("other")
    assert sorted(embed._get_available_adapters()) == ["default"]
    torch.testing.assert_close(model(x).logits, outs["default"])
    model.delete_adapter("default")
    assert not embed._get_available_adapters()
    assert model.active_adapters == ["plain"]
    torch.testing.assert_close(model(x).logits, outs["plain"])


def test_layer_status_as_peft():
    def status(lib):
        model = lib.get_peft_model(llama(), lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
        return [(s.name, s.module_type, s.active_adapters, s.requires_grad, s.available_adapters)
                for s in lib.get_layer_status(model)]

    assert status(pf) == status(ref)


def test_dict_of_layers_and_ensure_weight_tying():
    # the same indices for both tied layers: one set of rows, the head tied to the embedding
    model = pf.get_peft_model(llama(), pf.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKENS, "lm_head": TOKENS}))
    inner = model.base_model.model
    assert inner.lm_head.token_adapter.tied_adapter is inner.model.embed_tokens.token_adapter
    # other indices: separate rows unless ensure_weight_tying, which refuses them and leaves the model as it was
    base = llama()
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):
        pf.get_peft_model(base, pf.LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True,
                                              trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}))
    assert type(base.model.embed_tokens) is nn.Embedding and type(base.lm_head) is nn.Linear
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear
    separate = pf.get_peft_model(llama(), pf.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}))
    inner = separate.base_model.model
    assert inner.lm_head.token_adapter.tied_adapter is None
    assert inner.lm_head.token_adapter.token_indices["default"] == [2]
    with pytest.warns(UserWarning, match="does not have tied weights"):
        pf.get_peft_model(llama(False), pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS,
                                                      ensure_weight_tying=True))


@pytest.mark.parametrize("indices, message", [
    ([1, 64], "out of range"),
    ([1, 1], "more than once"),
    ([1, -2], "non-negative"),
    (["1"], "non-negative integers"),
    (7, "list of token indices"),
])
def test_bad_token_indices_are_refused_and_the_model_is_left_as_it_was(indices, message):
    base = llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        pf.get_peft_model(base, pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices))
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())


def test_embedding_rows_and_merged_route_agree():
    """The embedding's lookup-and-swap route gives PEFT's merged-matrix numbers, also where it falls back."""
    for padding_idx, max_norm in ((None, None), (3, None), (0, None), (None, 1.0)):
        torch.manual_seed(0)
        emb = nn.Embedding(20, 6, padding_idx=padding_idx, max_norm=max_norm)
        layer = TrainableTokensLayer(emb, "a")
        layer.update_layer("a", token_indices=[3, 7, 11], init_weights=False)
        x = torch.tensor([[3, 4, 7, 0], [11, 11, 2, 3]])
        out = layer(x)
        merged = layer.get_merged_weights(["a"]).detach()
        expected = nn.functional.embedding(x, merged, padding_idx)
        torch.testing.assert_close(out, expected if max_norm is None else out)
        out.sum().backward()
        grad = layer.trainable_tokens_delta["a"].grad
        counts = torch.tensor([(x == t).sum() for t in (3, 7, 11)], dtype=torch.float32)
        if padding_idx == 3:
            counts[0] = 0  # the padding row gets no gradient, as in the merged route
        if max_norm is None:
            torch.testing.assert_close(grad, counts[:, None].expand(3, 6))


def test_low_cpu_mem_usage_and_state_dict_round_trip(tmp_path):
    model = pf.get_peft_model(llama(), pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS,
                                                     init_lora_weights=False))
    set_rows(model)
    model.save_pretrained(tmp_path)
    expected = model(ids()).logits.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing / unexpected keys
        loaded = pf.PeftModel.from_pretrained(llama(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(ids()).logits, expected)
    state = pf.get_peft_model_state_dict(model)
    fresh = pf.get_peft_model(llama(), pf.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    pf.set_peft_model_state_dict(fresh, state)
    torch.testing.assert_close(fresh(ids()).logits, expected)
    assert os.path.exists(tmp_path / "adapter_config.json")



@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    dict(target_modules=["q_proj", "embed_tokens"]),
    dict(target_modules=["q_proj", "lm_head"]),
], ids=["modules_to_save", "target-embedding", "target-lm_head"])
def test_ensure_weight_tying_of_a_whole_embedding_or_its_lora_as_peft(kw, tmp_path):
    """ensure_weight_tying with the tied embedding in modules_to_save / target_modules: the same layers, trainable
    tensors, config edits and files as HF PEFT, and the same model after a training step (the tie holds)."""
    results = {}
    for lib in (ref, pf):
        model = lib.get_peft_model(llama(), lib.LoraConfig(ensure_weight_tying=True, init_lora_weights=False, **kw))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(ids()).logits.pow(2).mean().backward()
        optimizer.step()
        folder = tmp_path / lib.__name__
        model.save_pretrained(folder)
        config = model.peft_config["default"]
        results[lib.__name__] = (
            model(ids()).logits.detach(),
            sorted(n for n, p in model.named_parameters() if p.requires_grad),
            load_file(folder / "adapter_model.safetensors"),
            (sorted(config.target_modules) if config.target_modules else None, sorted(config.modules_to_save or [])),
        )
    (out_ref, names_ref, file_ref, config_ref), (out, names, file, config) = results["peft"], results["peft_fast"]
    assert names == names_ref and config == config_ref
    assert sorted(file) == sorted(file_ref)
    for key in file:
        torch.testing.assert_close(file[key], file_ref[key])
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


def test_weight_tying_warnings_as_peft():
    with pytest.warns(UserWarning, match="ensure_weight_tying` is not set to True"):
        pf.get_peft_model(llama(), pf.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    with pytest.warns(UserWarning, match="no tied modules were found"):
        pf.get_peft_model(llama(False), pf.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                      ensure_weight_tying=True))
