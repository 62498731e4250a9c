"""Prompt learning inside PeftModel: prefix tuning, prompt tuning and p-tuning (PEFT's behaviour, file formats).

`PromptLearningMixin` gives PeftModel what these methods need: setting up the prompt encoder next to the frozen
base model, `get_prompt` (virtual-token embeddings, or a transformers KV cache holding the prefix), and the
forward / generate paths of each task, which prepend the virtual tokens (or the prefix) and extend attention
masks and labels by num_virtual_tokens.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from .utils.peft_types import PeftType, TaskType

PREFIX_TYPES = (PeftType.PREFIX_TUNING,)
EMBEDDING_TYPES = (PeftType.PROMPT_TUNING, PeftType.P_TUNING)
_HYBRID_CACHE_MODELS = ("gemma2", "gemma3_text", "gemma4")


# The keyword under which a transformers model takes its KV cache: `cache` from transformers 5.24 on (where
# `past_key_values` is a deprecated alias, removed in 5.40), `past_key_values` before.
CACHE_KWARGS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> Optional[str]:
    params = inspect.signature(forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), None)


def cache_kwarg(module: nn.Module, default: Optional[str] = "past_key_values") -> Optional[str]:
    """"cache" or "past_key_values": the name `module.forward` takes its KV cache under; `default` when its
    signature names neither (a **kwargs forward passes it on)."""
    return _cache_kwarg_of(type(module).forward) or default


def _cache_from(model_kwargs: dict):
    """(key, cache) of the KV cache in generation model kwargs, under whichever name transformers used."""
    for name in CACHE_KWARGS:
        if model_kwargs.get(name) is not None:
            return name, model_kwargs[name]
    return None, None


def _prepare_prompt_learning_config(peft_config, model_config):
    """Fill num_layers, token_dim, num_attention_heads (and encoder_hidden_size) from the model's config; for
    prefix tuning on grouped-query attention the prefix holds key/value heads only."""
    attrs = model_config
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if "text_config" in config and config["text_config"] is not None:
        config = config["text_config"] if isinstance(config["text_config"], dict) else config["text_config"].to_dict()

    def first(*names):
        for name in names:
            if name in config and config[name] is not None:
                return config[name]
        return None

    if peft_config.num_layers is None:
        num_layers = getattr(attrs, "num_hidden_layers", None) if not isinstance(attrs, dict) else None
        num_layers = num_layers if num_layers is not None else first("num_hidden_layers", "num_layers", "n_layer")
        if num_layers is None:
            raise ValueError("Please specify `num_layers` in `peft_config`")
        peft_config.num_layers = num_layers
    if peft_config.token_dim is None:
        token_dim = first("hidden_size", "n_embd", "d_model")
        if token_dim is None:
            raise ValueError("Please specify `token_dim` in `peft_config`")
        peft_config.token_dim = token_dim
    if peft_config.num_attention_heads is None:
        heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        if heads is None:
            raise ValueError("Please specify `num_attention_heads` in `peft_config`")
        peft_config.num_attention_heads = heads
    if peft_config.peft_type in PREFIX_TYPES and "num_key_value_heads" in config:
        head_dim = config.get("head_dim") or peft_config.token_dim // peft_config.num_attention_heads
        kv_heads = config["num_key_value_heads"]
        peft_config.token_dim = head_dim * kv_heads
        peft_config.num_attention_heads = kv_heads
    if getattr(peft_config, "encoder_hidden_size", None) is None:
        peft_config.encoder_hidden_size = peft_config.token_dim
    return peft_config


def _get_batch_size(input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor]) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to provide either input_ids or inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


def _with_prefix(mask: Optional[torch.Tensor], num_virtual_tokens: int) -> Optional[torch.Tensor]:
    """The attention mask extended by num_virtual_tokens ones in front (float ones, as PEFT: torch.cat then
    promotes an integer mask to float)."""
    if mask is None:
        return None
    return torch.cat((torch.ones(mask.shape[0], num_virtual_tokens).to(mask.device), mask), dim=1)


def _return_dict_default(config) -> bool:
    return getattr(config, "return_dict", True) and not getattr(config, "torchscript", False)


class PromptLearningMixin:
    """Prompt-learning methods of PeftModel (the tuner-free path: base_model is the transformers model itself)."""

    # ------------------------------------------------------------------ set-up
    def _add_prompt_learning_adapter(self, adapter_name: str, peft_config) -> None:
        from .utils.other import _set_trainable

        self.peft_config[adapter_name] = peft_config
        _prepare_prompt_learning_config(peft_config, self.base_model.config)
        self._setup_prompt_encoder(adapter_name)
        if peft_config.modules_to_save:
            _set_trainable(self.base_model, adapter_name, peft_config.modules_to_save,
                           inference_mode=peft_config.inference_mode)

    def _setup_prompt_encoder(self, adapter_name: str) -> None:
        from .peft_model import PEFT_TYPE_TO_TUNER_MAPPING

        config = self.peft_config[adapter_name]
        if not hasattr(self, "prompt_encoder"):
            self.prompt_encoder = nn.ModuleDict({})
            self.prompt_tokens = {}
        model_type = getattr(getattr(self.base_model, "config", None), "model_type", "") or ""
        if config.peft_type in PREFIX_TYPES and any(t in model_type for t in _HYBRID_CACHE_MODELS):
            raise ValueError(f"Prefix tuning of {model_type} models (hybrid KV caches) is not supported by peft_fast.")
        if config.peft_type in PREFIX_TYPES and any(
            getattr(m, "gradient_checkpointing", False) for m in self.base_model.modules()
        ):
            raise ValueError(f"{config.peft_type.value} does not work with gradient checkpointing.")

        backbone = None
        for name, module in self.base_model.named_children():
            module.requires_grad_(False)
            if backbone is None and _is_pretrained_model(module):
                backbone, self.transformer_backbone_name = module, name
        if backbone is None:
            backbone = self.base_model
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
        self.word_embeddings = self._find_word_embeddings(backbone)
        _check_prompt_dims(config, self.word_embeddings)

        encoder_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
        if config.peft_type == PeftType.PROMPT_TUNING:
            encoder = encoder_cls(config, self.word_embeddings)
        else:
            encoder = encoder_cls(config)
        self.prompt_encoder.update(nn.ModuleDict({adapter_name: encoder.to(_device_of(self.base_model))}))
        self.prompt_tokens[adapter_name] = torch.arange(
            config.num_virtual_tokens * config.num_transformer_submodules
        ).long()

    def _find_word_embeddings(self, backbone: nn.Module) -> Optional[nn.Module]:
        try:  # BERT-like models name them
            return self.base_model.get_submodule("embeddings.word_embeddings")
        except AttributeError:
            pass
        config = self.base_model.config
        vocab_size = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
        for name, param in backbone.named_parameters():
            if param.shape[0] == vocab_size:
                return backbone.get_submodule(name.replace(".weight", ""))
        return None

    # ------------------------------------------------------------------ prompts
    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The encoded virtual tokens of `adapter_name` (what adapter files store as `prompt_embeddings`)."""
        encoder = self.prompt_encoder[adapter_name]
        config = self.peft_config[adapter_name]
        tokens = self.prompt_tokens[adapter_name].unsqueeze(0).to(encoder.embedding.weight.device)
        if config.peft_type in PREFIX_TYPES:
            tokens = tokens[:, : config.num_virtual_tokens]
        return encoder(tokens)[0].detach().cpu()

    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None,
                   max_cache_len: Optional[int] = None):
        """Virtual-token embeddings (batch × tokens × dim), or for prefix tuning a transformers Cache holding the
        prefix keys and values of every layer."""
        config = self.active_peft_config
        encoder = self.prompt_encoder[self.active_adapter]
        tokens = self.prompt_tokens[self.active_adapter].unsqueeze(0).expand(batch_size, -1)
        tokens = tokens.to(encoder.embedding.weight.device)
        if config.peft_type not in PREFIX_TYPES:
            if config.inference_mode:
                prompts = encoder.embedding.weight
            else:  # encode one row and repeat it (cheaper than encoding batch_size identical rows)
                prompts = encoder(tokens[:1])
            return prompts.repeat(batch_size, 1, 1)
        tokens = tokens[:, : config.num_virtual_tokens]
        if config.inference_mode:
            kv = encoder.embedding.weight.repeat(batch_size, 1, 1)
        else:
            kv = encoder(tokens)
        if self.base_model_torch_dtype is not None:
            kv = kv.to(self.base_model_torch_dtype)
        head_dim = config.token_dim // config.num_attention_heads
        kv = kv.view(batch_size, config.num_virtual_tokens, config.num_layers * 2, config.num_attention_heads, head_dim)
        if config.num_transformer_submodules == 2:
            kv = torch.cat([kv, kv], dim=2)
        # per layer: [2 (or 4 for encoder-decoder), batch, heads, virtual tokens, head_dim]
        per_layer = kv.permute([2, 0, 3, 1, 4]).split(config.num_transformer_submodules * 2)
        return _prefix_cache(per_layer, config.num_transformer_submodules)

    def _adjust_prompt_learning_kwargs(self, peft_config, *, kwargs: dict, remove_token_type_ids: bool = True):
        if kwargs.get("position_ids") is not None:
            if peft_config.peft_type in PREFIX_TYPES:  # positions continue after the prefix in the cache
                kwargs["position_ids"] = kwargs["position_ids"] + peft_config.num_virtual_tokens
            else:
                warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
                kwargs["position_ids"] = None
        if remove_token_type_ids and kwargs.get("token_type_ids") is not None:
            warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
            kwargs["token_type_ids"] = None

    def _prepend_prompts(self, input_ids, inputs_embeds, batch_size, task_ids=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch_size=batch_size, task_ids=task_ids).to(inputs_embeds.dtype)
        return torch.cat((prompts, inputs_embeds), dim=1)

    # ------------------------------------------------------------------ forwards
    def _prompt_forward_causal_lm(self, input_ids, attention_mask, inputs_embeds, labels, output_attentions,
                                  output_hidden_states, return_dict, task_ids, kwargs):
        config = self.active_peft_config
        batch_size = _get_batch_size(input_ids, inputs_embeds)
        attention_mask = _with_prefix(attention_mask, config.num_virtual_tokens)
        self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
        kwargs.update(attention_mask=attention_mask, labels=labels, output_attentions=output_attentions,
                      output_hidden_states=output_hidden_states, return_dict=return_dict)
        if config.peft_type in PREFIX_TYPES:
            kwargs[cache_kwarg(self.base_model)] = self.get_prompt(batch_size)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if labels is not None:
            prefix_labels = torch.full((batch_size, config.num_virtual_tokens), -100).to(labels.device)
            kwargs["labels"] = torch.cat((prefix_labels, labels), dim=1)
        inputs_embeds = self._prepend_prompts(input_ids, inputs_embeds, batch_size, task_ids)
        return self.base_model(inputs_embeds=inputs_embeds, **kwargs)

    def _prompt_forward_encoder(self, head: str, input_ids, attention_mask, inputs_embeds, head_kwargs: dict,
                                output_attentions, output_hidden_states, return_dict, task_ids, kwargs):
        """Sequence / token classification and QA: virtual tokens in front of the encoder's input."""
        config = self.active_peft_config
        return_dict = return_dict if return_dict is not None else _return_dict_default(self.base_model.config)
        batch_size = _get_batch_size(input_ids, inputs_embeds)
        attention_mask = _with_prefix(attention_mask, config.num_virtual_tokens)
        self._adjust_prompt_learning_kwargs(config, kwargs=kwargs, remove_token_type_ids=False)
        kwargs.update(attention_mask=attention_mask, output_attentions=output_attentions,
                      output_hidden_states=output_hidden_states, return_dict=return_dict, **head_kwargs)
        if config.peft_type in PREFIX_TYPES:
            return self._prefix_tuning_forward(head, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if kwargs.get("token_type_ids") is not None:
            zeros = torch.zeros(batch_size, config.num_virtual_tokens).to(self.word_embeddings.weight.device)
            kwargs["token_type_ids"] = torch.cat((zeros, kwargs["token_type_ids"]), dim=1).long()
        inputs_embeds = self._prepend_prompts(input_ids, inputs_embeds, batch_size,
                                              task_ids if head != "qa" else None)
        return self.base_model(inputs_embeds=inputs_embeds, **kwargs)

    def _prefix_tuning_forward(self, head: str, input_ids=None, attention_mask=None, inputs_embeds=None,
                               output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        """The prefix as the KV cache; models whose task head takes no cache get the backbone called directly and
        the head (dropout + classifier / qa_outputs) and loss applied here, as PEFT does."""
        head_args = {k: kwargs.pop(k) for k in ("labels", "start_positions", "end_positions") if k in kwargs}
        batch_size = _get_batch_size(input_ids, inputs_embeds)
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                      return_dict=return_dict)
        name = cache_kwarg(self.base_model, default=None)
        if name is not None:
            return self.base_model(**head_args, **kwargs, **{name: self.get_prompt(batch_size)})
        backbone = self.base_model.get_submodule(self.transformer_backbone_name)
        name = cache_kwarg(backbone, default=None)
        if name is None:
            raise ValueError("Model does not support past key values which are required for prefix tuning.")
        outputs = backbone(**kwargs, **{name: self.get_prompt(batch_size)})
        return _apply_head(self, head, outputs, head_args, return_dict)

    def _prompt_forward_feature_extraction(self, input_ids, attention_mask, inputs_embeds, output_attentions,
                                           output_hidden_states, return_dict, kwargs):
        config = self.active_peft_config
        batch_size = _get_batch_size(input_ids, inputs_embeds)
        attention_mask = _with_prefix(attention_mask, config.num_virtual_tokens)
        self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
        kwargs.update(attention_mask=attention_mask, output_attentions=output_attentions,
                      output_hidden_states=output_hidden_states, return_dict=return_dict)
        if config.peft_type in PREFIX_TYPES:
            kwargs[cache_kwarg(self.base_model)] = self.get_prompt(batch_size)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        inputs_embeds = self._prepend_prompts(input_ids, inputs_embeds, batch_size)
        return self.base_model(inputs_embeds=inputs_embeds, **kwargs)

    def _prompt_forward_seq2seq(self, input_ids, attention_mask, inputs_embeds, decoder_input_ids,
                                decoder_attention_mask, decoder_inputs_embeds, labels, output_attentions,
                                output_hidden_states, return_dict, task_ids, kwargs):
        config = self.active_peft_config
        batch_size = _get_batch_size(input_ids, inputs_embeds)
        if config.peft_type not in EMBEDDING_TYPES:
            decoder_attention_mask = _with_prefix(decoder_attention_mask, config.num_virtual_tokens)
        self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
        kwargs.update(attention_mask=attention_mask, decoder_attention_mask=decoder_attention_mask, labels=labels,
                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                      return_dict=return_dict)
        if config.peft_type in PREFIX_TYPES:
            kwargs[cache_kwarg(self.base_model)] = self.get_prompt(batch_size)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                   decoder_input_ids=decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds,
                                   **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        kwargs["attention_mask"] = _with_prefix(attention_mask, config.num_virtual_tokens)
        prompts = self.get_prompt(batch_size=batch_size).to(inputs_embeds.dtype)
        inputs_embeds = torch.cat((prompts[:, : config.num_virtual_tokens], inputs_embeds), dim=1)
        return self.base_model(inputs_embeds=inputs_embeds, decoder_input_ids=decoder_input_ids,
                               decoder_inputs_embeds=decoder_inputs_embeds, **kwargs)

    # ------------------------------------------------------------------ generation
    def _prompt_prepare_inputs_for_generation_causal(self, *args, task_ids=None, **kwargs):
        """Wraps the base model's prepare_inputs_for_generation while a prompt-learning CausalLM generates: the
        first step gets the prefix cache or the prompt embeddings; every step gets the longer attention mask."""
        config = self.active_peft_config
        model_kwargs = self._base_prepare_inputs(*args, **kwargs)
        is_prefill = model_kwargs.get("cache_position") is not None and model_kwargs["cache_position"][0] == 0
        from transformers import Cache, DynamicCache

        cache_key, cache = _cache_from(model_kwargs)
        cache_key = cache_key or cache_kwarg(self.base_model)
        if cache is not None:
            seq_len = cache[0][0].shape[-2] if isinstance(cache, (tuple, list)) else cache.get_seq_length()
            if seq_len >= model_kwargs["input_ids"].shape[1]:
                model_kwargs["input_ids"] = model_kwargs["input_ids"][:, -1:]
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is not None:
            if isinstance(attention_mask, dict):
                if len(attention_mask) != 1:
                    raise ValueError(f"Expected a single attention mask, got {len(attention_mask)} instead.")
                attention_mask = next(iter(attention_mask.values()))
            if attention_mask.dim() == 4:
                raise ValueError("prompt learning generation needs a 2-D attention mask; got a 4-D one.")
            model_kwargs["attention_mask"] = _with_prefix(attention_mask, config.num_virtual_tokens)
        self._adjust_prompt_learning_kwargs(config, kwargs=model_kwargs)
        needs_prompt = cache is None or (isinstance(cache, Cache) and not cache.get_seq_length())
        if needs_prompt and config.peft_type in PREFIX_TYPES:
            is_dynamic = not isinstance(cache, Cache) or isinstance(cache, DynamicCache)
            model_kwargs[cache_key] = self.get_prompt(
                batch_size=model_kwargs["input_ids"].shape[0], max_cache_len=-1 if is_dynamic else cache.max_cache_len
            )
        elif needs_prompt:
            inputs_embeds = self.word_embeddings(model_kwargs["input_ids"])
            prompts = self.get_prompt(batch_size=model_kwargs["input_ids"].shape[0], task_ids=task_ids)
            model_kwargs["inputs_embeds"] = torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)
            model_kwargs["input_ids"] = None
        if is_prefill and config.peft_type in PREFIX_TYPES:
            model_kwargs["cache_position"] += config.num_virtual_tokens  # in place, as PEFT does
        elif config.peft_type not in PREFIX_TYPES:
            model_kwargs.pop("cache_position", None)  # the model derives it from the longer inputs_embeds
        return model_kwargs

    def _prompt_prepare_inputs_for_generation_seq2seq(self, *args, task_ids=None, **kwargs):
        config = self.active_peft_config
        model_kwargs = self._base_prepare_inputs(*args, **kwargs)
        if config.peft_type in PREFIX_TYPES:
            from transformers import Cache

            cache_key, cache = _cache_from(model_kwargs)
            first = kwargs.get("is_first_iteration")
            if first is None:
                first = cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)
            if first:
                key = cache_key or cache_kwarg(self.base_model)
                model_kwargs[key] = self.get_prompt(model_kwargs["decoder_input_ids"].shape[0])
        return model_kwargs

    def _prompt_generate_seq2seq(self, kwargs: dict):
        config = self.active_peft_config
        if "input_ids" not in kwargs:
            raise ValueError("input_ids must be provided for Peft model generation")
        self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
        if config.peft_type in PREFIX_TYPES:
            return self.base_model.generate(**kwargs)
        kwargs = copy.copy(kwargs)
        if "encoder_outputs" in kwargs:
            del kwargs["encoder_outputs"]
            warnings.warn("`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.")
        input_ids = kwargs.pop("input_ids")
        inputs_embeds = self.word_embeddings(input_ids)
        batch_size = inputs_embeds.shape[0]
        prompts = self.get_prompt(batch_size=batch_size, task_ids=kwargs.pop("task_ids", None))
        kwargs["inputs_embeds"] = torch.cat(
            (prompts[:, : config.num_virtual_tokens].to(inputs_embeds.dtype), inputs_embeds), dim=1
        )
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = _with_prefix(kwargs["attention_mask"], config.num_virtual_tokens)
        return self.base_model.generate(**kwargs)


def _prefix_cache(per_layer: tuple[torch.Tensor, ...], num_transformer_submodules: int):
    """A transformers Cache pre-filled with the prefix: DynamicCache for decoders; for encoder-decoders an
    EncoderDecoderCache whose cross-attention part starts empty (the encoder output is not known yet)."""
    from transformers import DynamicCache, EncoderDecoderCache

    if num_transformer_submodules == 1:
        return DynamicCache(per_layer)
    self_attention = DynamicCache([layer[:2] for layer in per_layer])
    cache = EncoderDecoderCache(self_attention, DynamicCache())
    cache.is_updated = {i: False for i in range(len(per_layer))}
    return cache


def _check_prompt_dims(config, word_embeddings: Optional[nn.Module]) -> None:
    """Refuse a config that could only fail later, inside the model's forward, with a shape error."""
    if config.peft_type in PREFIX_TYPES and config.token_dim % config.num_attention_heads:
        raise ValueError(
            f"token_dim {config.token_dim} is not divisible by num_attention_heads {config.num_attention_heads}."
        )
    width = getattr(word_embeddings, "embedding_dim", None)
    if config.peft_type in EMBEDDING_TYPES and width is not None and config.token_dim != width:
        raise ValueError(
            f"token_dim {config.token_dim} does not match the model's word embedding size {width}: the virtual "
            "tokens are concatenated with the input embeddings."
        )


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _is_pretrained_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, PreTrainedModel)


def _apply_head(model, head: str, outputs, head_args: dict, return_dict: bool):
    """Task head and loss on top of the backbone's outputs (for models whose head takes no KV cache)."""
    from transformers.modeling_outputs import (
        QuestionAnsweringModelOutput,
        SequenceClassifierOutput,
        TokenClassifierOutput,
    )

    base = model.base_model
    if head == "seq_cls":
        features = outputs[1] if len(outputs) > 1 else outputs[0]  # the pooled output
    else:
        features = outputs[0]
    if "dropout" in dict(base.named_children()):
        features = base.dropout(features)
    logits = base.get_submodule(model.cls_layer_name)(features)
    if head == "qa":
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = _qa_loss(start_logits, end_logits, head_args.get("start_positions"), head_args.get("end_positions"))
        if not return_dict:
            out = (start_logits, end_logits) + tuple(outputs[2:])
            return ((loss,) + out) if loss is not None else out
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    labels = head_args.get("labels")
    loss = None
    if labels is not None:
        loss = _seq_cls_loss(model, logits, labels) if head == "seq_cls" else CrossEntropyLoss()(
            logits.view(-1, model.num_labels), labels.view(-1))
    if not return_dict:
        out = (logits,) + tuple(outputs[2:])
        return ((loss,) + out) if loss is not None else out
    cls = SequenceClassifierOutput if head == "seq_cls" else TokenClassifierOutput
    return cls(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _seq_cls_loss(model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    config, num_labels = model.base_model.config, model.base_model.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return MSELoss()(logits.squeeze(), labels.squeeze()) if num_labels == 1 else MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    return BCEWithLogitsLoss()(logits, labels)


def _qa_loss(start_logits, end_logits, start_positions, end_positions) -> Optional[torch.Tensor]:
    if start_positions is None or end_positions is None:
        return None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.size(1)
    loss_fct = CrossEntropyLoss(ignore_index=ignored)
    start_loss = loss_fct(start_logits, start_positions.clamp(0, ignored))
    end_loss = loss_fct(end_logits, end_positions.clamp(0, ignored))
    return (start_loss + end_loss) / 2


__all__ = ["PromptLearningMixin", "_prepare_prompt_learning_config"]
