"""Prefix tuning, prompt tuning and p-tuning against HF PEFT on tiny models built from configs.

Same seed → same prompt-encoder weights; same weights → same outputs, losses, gradients and generations; adapter
files load both ways; trainable-parameter counts as PEFT prints them; bad input leaves the model unchanged.
"""

import copy

import peft as ref
import pytest
import torch

import peft_fast as pf
from models import rel_err, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

PREFIX = dict(peft_type="PREFIX_TUNING", num_virtual_tokens=5)
PREFIX_PROJ = dict(peft_type="PREFIX_TUNING", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24)
PROMPT = dict(peft_type="PROMPT_TUNING", num_virtual_tokens=6)
PROMPT_VOCAB = dict(peft_type="PROMPT_TUNING", num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
P_MLP = dict(peft_type="P_TUNING", num_virtual_tokens=4, encoder_hidden_size=16)
P_LSTM = dict(peft_type="P_TUNING", num_virtual_tokens=4, encoder_hidden_size=16,
              encoder_reparameterization_type="LSTM")


def _pair(builder, task_type, cfg):
    """The same base model wrapped by HF PEFT and by peft_fast from the same seed."""
    torch.manual_seed(0)
    base = builder()
    models = []
    for lib in (ref, pf):
        torch.manual_seed(1)
        config = lib.get_peft_config({**cfg, "task_type": task_type})
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    return models


def _ids(batch=3, seq=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    return ids, mask


def _same_state(ref_model, pf_model):
    ref_state, pf_state = ref_model.state_dict(), pf_model.state_dict()
    assert list(ref_state) == list(pf_state)
    for key in ref_state:
        assert torch.equal(ref_state[key], pf_state[key]), key


CASES = [
    (tiny_llama, "llama", "CAUSAL_LM", PREFIX),
    (tiny_llama, "llama", "CAUSAL_LM", PREFIX_PROJ),
    (tiny_llama, "llama", "CAUSAL_LM", PROMPT),
    (tiny_llama, "llama", "CAUSAL_LM", PROMPT_VOCAB),
    (tiny_llama, "llama", "CAUSAL_LM", P_MLP),
    (tiny_llama, "llama", "CAUSAL_LM", P_LSTM),
    (tiny_gpt2, "gpt2", "CAUSAL_LM", PREFIX),
    (lambda: tiny_bert("seq_cls"), "bert", "SEQ_CLS", PREFIX),
    (lambda: tiny_bert("seq_cls"), "bert", "SEQ_CLS", P_MLP),
    (lambda: tiny_bert("token_cls"), "bert", "TOKEN_CLS", PREFIX),
    (lambda: tiny_bert("token_cls"), "bert", "TOKEN_CLS", PREFIX_PROJ),
    (lambda: tiny_bert("qa"), "bert", "QUESTION_ANS", PROMPT),
    (lambda: tiny_bert("qa"), "bert", "QUESTION_ANS", PREFIX),
    (tiny_t5, "t5", "SEQ_2_SEQ_LM", PREFIX),
    (tiny_t5, "t5", "SEQ_2_SEQ_LM", PROMPT),
]


def _task_kwargs(name, task_type):
    ids, mask = _ids()
    if task_type == "CAUSAL_LM":
        return dict(input_ids=ids, attention_mask=mask, labels=ids)
    if task_type == "SEQ_CLS":
        return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    if task_type == "TOKEN_CLS":
        return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 3, ids.shape))
    if task_type == "QUESTION_ANS":
        return dict(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([1, 2, 3]),
                    end_positions=torch.tensor([3, 4, 5]))
    labels = torch.randint(1, 64, (3, 4), generator=torch.Generator().manual_seed(5))
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _logits(out):
    return out.logits if hasattr(out, "logits") else torch.cat([out.start_logits, out.end_logits], -1)


@pytest.mark.parametrize("builder,name,task_type,cfg", CASES,
                         ids=[f"{c[1]}-{c[2]}-{c[3]['peft_type']}{'-proj' if c[3].get('prefix_projection') else ''}"
                              f"{'-' + c[3].get('encoder_reparameterization_type', '') if c[3]['peft_type'] == 'P_TUNING' else ''}"
                              for c in CASES])
def test_same_weights_outputs_and_grads_as_peft(builder, name, task_type, cfg):
    ref_model, pf_model = _pair(builder, task_type, cfg)
    _same_state(ref_model, pf_model)
    assert pf_model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()
    kwargs = _task_kwargs(name, task_type)
    results = []
    for model in (ref_model, pf_model):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(42)  # the same dropout masks in the base model
        out = model(**kwargs)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            logits = _logits(model(**kwargs))
        results.append((out.loss.detach(), logits, grads))
    (loss_r, logits_r, g_r), (loss_p, logits_p, g_p) = results
    assert torch.allclose(loss_p, loss_r, rtol=1e-6, atol=1e-7)
    assert rel_err(logits_p, logits_r) < 1e-6
    assert g_r.keys() == g_p.keys() and g_r
    for key in g_r:
        assert rel_err(g_p[key], g_r[key]) < 1e-5, key


@pytest.mark.parametrize("cfg", [PREFIX, PROMPT, P_MLP], ids=["prefix", "prompt", "p-tuning"])
def test_causal_lm_generation_matches_peft(cfg):
    ref_model, pf_model = _pair(tiny_llama, "CAUSAL_LM", cfg)
    ids, mask = _ids(batch=2, seq=6)
    outs = []
    for model in (ref_model, pf_model):
        model.eval()
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       pad_token_id=0))
    assert torch.equal(outs[0], outs[1])
    # generation leaves the base model's own prepare_inputs_for_generation in place
    assert "prepare_inputs_for_generation" not in pf_model.base_model.__dict__


@pytest.mark.parametrize("cfg", [PREFIX, PROMPT], ids=["prefix", "prompt"])
def test_seq2seq_generation_matches_peft(cfg):
    ref_model, pf_model = _pair(tiny_t5, "SEQ_2_SEQ_LM", cfg)
    ids, mask = _ids(batch=2, seq=6)
    outs = []
    for model in (ref_model, pf_model):
        model.eval()
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_seed_example_counts_bert_base_prefix_tuning():
    """The seed's prefix tuning example: BERT-base shape, 20 virtual tokens, 2 labels → 370,178 trainable."""
    from transformers import BertConfig, BertForSequenceClassification

    config = pf.get_peft_config({
        "peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "inference_mode": False, "num_virtual_tokens": 20,
        "token_dim": 768, "num_transformer_submodules": 1, "num_attention_heads": 12, "num_layers": 12,
        "encoder_hidden_size": 768, "prefix_projection": False,
    })
    assert isinstance(config, pf.PrefixTuningConfig)
    model = pf.get_peft_model(BertForSequenceClassification(BertConfig(num_labels=2)), config)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 20 * 12 * 2 * 768 + 768 * 2 + 2 == 370_178


@pytest.mark.parametrize("config_dict", [
    {"peft_type": "PREFIX_TUNING", "task_type": "TOKEN_CLS", "inference_mode": False, "num_virtual_tokens": 20,
     "token_dim": 32, "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2,
     "encoder_hidden_size": 32, "prefix_projection": False},
    {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "inference_mode": False, "num_virtual_tokens": 20,
     "token_dim": 16, "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 2,
     "encoder_hidden_size": 16, "prefix_projection": False},
    {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8},
    {"peft_type": "P_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 8, "encoder_hidden_size": 64},
])
def test_config_dicts_give_the_same_configs_and_counts(config_dict):
    builder = {"TOKEN_CLS": lambda: tiny_bert("token_cls"), "SEQ_CLS": lambda: tiny_bert("seq_cls"),
               "CAUSAL_LM": tiny_llama}[config_dict["task_type"]]
    ref_model, pf_model = _pair(builder, config_dict["task_type"], config_dict)
    assert pf_model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()
    assert pf_model.peft_config["default"].to_dict().keys() >= {
        k for k in ref_model.peft_config["default"].to_dict() if k != "peft_version"}
    for attr in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(pf_model.peft_config["default"], attr) == getattr(ref_model.peft_config["default"], attr)
    ids, mask = _ids()
    ref_model.eval(), pf_model.eval()
    with torch.no_grad():
        assert rel_err(_logits(pf_model(input_ids=ids, attention_mask=mask)),
                       _logits(ref_model(input_ids=ids, attention_mask=mask))) < 1e-6


def test_attributes_and_prompt_helpers():
    """get_prompt's values, not only its shape: the virtual-token embeddings repeated per row, and the prefix cache
    holding HF PEFT's key/value tensors layer by layer (a get_prompt that permuted heads or swapped keys and values
    kept the shapes)."""
    ref_prompt, model = _pair(tiny_llama, "CAUSAL_LM", PROMPT)
    assert isinstance(model.prompt_encoder["default"], pf.PromptEmbedding)
    assert torch.equal(model.prompt_tokens["default"], torch.arange(6))
    assert model.word_embeddings is model.base_model.model.embed_tokens
    assert model.transformer_backbone_name == "model"
    prompt = model.get_prompt(batch_size=2)
    weight = model.prompt_encoder["default"].embedding.weight
    assert prompt.shape == (2, 6, 32)
    assert torch.equal(prompt[0], weight) and torch.equal(prompt[1], weight)
    assert torch.equal(prompt, ref_prompt.get_prompt(batch_size=2))
    assert torch.equal(model.get_prompt_embedding_to_save("default"), weight)
    ref_prefix, prefix_model = _pair(tiny_llama, "CAUSAL_LM", PREFIX)
    with torch.no_grad():  # distinct values everywhere, so that any permutation shows
        for p in ref_prefix.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    prefix_model.load_state_dict(ref_prefix.state_dict())
    cache, ref_cache = prefix_model.get_prompt(batch_size=2), ref_prefix.get_prompt(batch_size=2)
    # grouped-query attention: the prefix holds the 2 key/value heads of head_dim 8
    assert cache.get_seq_length() == 5 and cache.layers[0].keys.shape == (2, 2, 5, 8)
    assert len(cache.layers) == len(ref_cache.layers) == 2
    for mine, theirs in zip(cache.layers, ref_cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert not torch.equal(cache.layers[0].keys, cache.layers[0].values)


@pytest.mark.parametrize("builder,task_type,cfg", [
    (tiny_llama, "CAUSAL_LM", PREFIX), (tiny_llama, "CAUSAL_LM", P_LSTM), (tiny_t5, "SEQ_2_SEQ_LM", PROMPT),
    (lambda: tiny_bert("seq_cls"), "SEQ_CLS", PREFIX),
], ids=["llama-prefix", "llama-p-lstm", "t5-prompt", "bert-seqcls-prefix"])
def test_files_load_both_ways(builder, task_type, cfg, tmp_path):
    from safetensors.torch import load_file

    ref_model, pf_model = _pair(builder, task_type, cfg)
    with torch.no_grad():  # trained-looking weights, different in the two libraries
        for p in ref_model.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        for n, p in ref_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    ref_model.save_pretrained(tmp_path / "ref")
    pf_model.load_state_dict(ref_model.state_dict())
    pf_model.save_pretrained(tmp_path / "pf")
    a, b = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(tmp_path / "pf" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and "prompt_embeddings" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids, mask = _ids()
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if task_type == "SEQ_2_SEQ_LM":
        kwargs["decoder_input_ids"] = ids[:, :4]
    torch.manual_seed(0)
    base = builder()
    loaded_pf = pf.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref")
    loaded_ref = ref.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pf")
    assert type(loaded_pf).__name__ == type(loaded_ref).__name__
    assert loaded_pf.peft_config["default"].inference_mode
    ref_model.eval()
    with torch.no_grad():
        expected = _logits(ref_model(**kwargs))
        assert rel_err(_logits(loaded_pf(**kwargs)), expected) < 1e-6
        assert rel_err(_logits(loaded_ref(**kwargs)), expected) < 1e-6


def test_disable_adapter_gives_the_base_model():
    _, model = _pair(tiny_llama, "CAUSAL_LM", PROMPT)
    ids, mask = _ids()
    model.eval()
    torch.manual_seed(0)
    base = tiny_llama().eval()
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                       pad_token_id=0)
        enabled = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(disabled, base(input_ids=ids, attention_mask=mask).logits)
        assert torch.equal(generated, base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                                    do_sample=False, pad_token_id=0))
    assert enabled.shape[1] == ids.shape[1] + 6  # the prompt is back


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def test_bad_input_leaves_the_model_unchanged(tmp_path):
    _, model = _pair(lambda: tiny_bert("seq_cls"), "SEQ_CLS", PREFIX)
    model.save_pretrained(tmp_path / "ok")
    state, flags = _state(model)
    # a file whose prefix does not fit its own config (token_dim 16 saved, 32 configured)
    other = pf.get_peft_model(tiny_bert("seq_cls"), pf.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5,
                                                                         token_dim=16, num_attention_heads=4))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="prompt_embeddings of shape"):
        model.load_adapter(tmp_path / "other", adapter_name="second")
    assert "second" not in model.peft_config and "second" not in model.prompt_encoder
    # an adapter of another method cannot join
    with pytest.raises(ValueError, match="different peft types"):
        model.add_adapter("lora", pf.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("missing")
    new_state, new_flags = _state(model)
    assert new_flags == flags and list(new_state) == list(state)
    assert all(torch.equal(state[k], new_state[k]) for k in state)
    # a trainable load of a prompt-learning adapter is refused, as in PEFT
    with pytest.raises(ValueError, match="trainable"):
        pf.PeftModel.from_pretrained(tiny_bert("seq_cls"), tmp_path / "ok", is_trainable=True)
    # prefix tuning and gradient checkpointing do not go together
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pf.get_peft_model(base, pf.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    # a prompt whose width is not the model's embedding width
    with pytest.raises(ValueError, match="token_dim 16 does not match"):
        pf.get_peft_model(tiny_llama(), pf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=16))
    with pytest.raises(ValueError, match="divisible"):
        pf.get_peft_model(tiny_bert("seq_cls"), pf.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                                      token_dim=30, num_attention_heads=4))
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        pf.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="MLP"):
        pf.PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="GRU")


def test_mixed_model_refuses_prompt_learning():
    with pytest.raises(ValueError):
        pf.get_peft_model(tiny_llama(), pf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), mixed=True)


@pytest.mark.parametrize("cfg", [PREFIX, PROMPT], ids=["prefix", "prompt"])
def test_feature_extraction_matches_peft(cfg):
    ref_model, pf_model = _pair(lambda: tiny_bert("feature"), "FEATURE_EXTRACTION", cfg)
    ids, mask = _ids()
    outs = []
    for model in (ref_model, pf_model):
        model.eval()
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert outs[0].shape == outs[1].shape
    assert rel_err(outs[1], outs[0]) < 1e-6


def test_prompt_tuning_text_init_from_a_local_tokenizer(tmp_path):
    """TEXT init: the virtual tokens start as the word embeddings of the init text (repeated to length)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "sentiment", "of", "this", "review"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    cfg = dict(peft_type="PROMPT_TUNING", num_virtual_tokens=7, prompt_tuning_init="TEXT",
               prompt_tuning_init_text="classify the sentiment of this review", tokenizer_name_or_path=str(tmp_path / "tok"))
    ref_model, pf_model = _pair(tiny_llama, "CAUSAL_LM", cfg)
    _same_state(ref_model, pf_model)
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 1])  # the six words, repeated and cut to 7
    words = pf_model.word_embeddings.weight[ids]
    assert torch.equal(pf_model.prompt_encoder["default"].embedding.weight, words)


def _chat_tokenizer(with_template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "you", "are", "a", "helpful", "assistant", "answer", "briefly", "system", ":"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if with_template:
        tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    return tokenizer


@pytest.mark.parametrize("with_template", [True, False])
def test_prefix_initialized_from_text_matches_peft(with_template):
    """initialize_kv_prefix_from_text / _from_past_key_values / prompt_embeddings_from_past_key_values as PEFT: the
    same prefix (the base model's own keys and values of the text's first tokens, through the chat template where
    the tokenizer has one) and then the same outputs; a prefix that does not fit, another adapter type or
    prefix_projection refused with the adapter left as it was."""
    ref_model, pf_model = _pair(tiny_llama, "CAUSAL_LM", dict(PREFIX, num_virtual_tokens=4))
    tokenizer = _chat_tokenizer(with_template)
    text = "you are a helpful assistant answer briefly"
    got = pf.initialize_kv_prefix_from_text(pf_model, tokenizer, text=text)
    want = ref.initialize_kv_prefix_from_text(ref_model, tokenizer, text=text)
    assert got.shape == (4, pf_model.prompt_encoder["default"].embedding.weight.shape[1])
    assert rel_err(got, want) < 1e-6 and got.abs().amax() > 0
    assert torch.equal(pf_model.prompt_encoder["default"].embedding.weight, got)
    plain = pf.initialize_kv_prefix_from_text(pf_model, tokenizer, text=text, use_chat_template=False)
    assert torch.equal(plain, got) != with_template  # (the template puts "system :" first)
    pf.initialize_kv_prefix_from_text(pf_model, tokenizer, text=text)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        assert rel_err(pf_model(input_ids=ids).logits, ref_model(input_ids=ids).logits) < 1e-5

    # the cache of a prefill, legacy tuples or a Cache, gives the same prefix as PEFT's helper
    with torch.no_grad():
        cache = pf_model.get_base_model()(input_ids=ids[:1], use_cache=True).past_key_values
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    ours = pf.prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=3)
    assert torch.equal(ours, pf.prompt_embeddings_from_past_key_values(legacy, num_virtual_tokens=3))
    assert torch.equal(ours, ref.prompt_embeddings_from_past_key_values(legacy, num_virtual_tokens=3))

    before = pf_model.prompt_encoder["default"].embedding.weight.clone()
    with pytest.raises(ValueError, match="Need at least 5 cached tokens"):
        pf.initialize_kv_prefix_from_past_key_values(pf_model, past_key_values=legacy, num_virtual_tokens=5)
    with pytest.raises(ValueError, match="Invalid `prompt_embeddings` shape"):
        pf.initialize_kv_prefix_from_past_key_values(pf_model, past_key_values=legacy, num_virtual_tokens=3)
    with pytest.raises(ValueError, match="batch 1"):
        pf.prompt_embeddings_from_past_key_values(tuple((k.repeat(2, 1, 1, 1), v) for k, v in legacy),
                                                  num_virtual_tokens=2)
    assert torch.equal(pf_model.prompt_encoder["default"].embedding.weight, before)
    _, prompt = _pair(tiny_llama, "CAUSAL_LM", PROMPT)
    with pytest.raises(ValueError, match="must be a PREFIX_TUNING adapter"):
        pf.initialize_kv_prefix_from_text(prompt, tokenizer, text=text)
    _, projected = _pair(tiny_llama, "CAUSAL_LM", PREFIX_PROJ)
    with pytest.raises(ValueError, match="prefix_projection=True"):
        pf.initialize_kv_prefix_from_past_key_values(projected, past_key_values=legacy)
