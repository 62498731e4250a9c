"""A prefix-tuning adapter started from a real prefix (PEFT's `initialize_kv_prefix_from_text` and its helpers).

Instead of random virtual tokens, the adapter's keys and values are those the frozen model itself computes for the
first `num_virtual_tokens` tokens of some text (a system prompt, a document): training then starts from a prefix
that already means something, and before any training the adapter behaves as that text put in front of every input.
The prefix is stored as prefix tuning stores it, per virtual token layer 0's key, layer 0's value, layer 1's key …,
each num_heads × head_dim (the layout `PromptLearningMixin.get_prompt` reads back into a cache).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...utils.peft_types import PeftType


def _layer_pairs(past_key_values: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) of each layer of a cache: a legacy tuple of per-layer pairs, a transformers Cache (its layers'
    keys and values), or anything iterating over per-layer tuples (an encoder-decoder cache: self-attention first)."""
    if isinstance(past_key_values, (tuple, list)):
        return [(layer[0], layer[1]) for layer in past_key_values]
    layers = getattr(past_key_values, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return [(layer.keys, layer.values) for layer in layers]
    to_legacy = getattr(past_key_values, "to_legacy_cache", None)
    if callable(to_legacy):
        return _layer_pairs(to_legacy())
    if hasattr(past_key_values, "__iter__"):
        pairs = list(past_key_values)
        if pairs and all(isinstance(p, (tuple, list)) and len(p) >= 2 for p in pairs):
            return [(p[0], p[1]) for p in pairs]
    raise TypeError(f"past_key_values of type {type(past_key_values).__name__} is not a cache: expected per-layer "
                    "(key, value) tuples, or a transformers Cache")


def prompt_embeddings_from_past_key_values(past_key_values: Any, *, num_virtual_tokens: int) -> torch.Tensor:
    """The first `num_virtual_tokens` positions of a one-sequence cache (keys and values batch 1 × heads × tokens ×
    head_dim) as the flattened prefix a prefix-tuning adapter holds: num_virtual_tokens × (layers · 2 · heads ·
    head_dim)."""
    pairs = _layer_pairs(past_key_values)
    if not pairs:
        raise ValueError("past_key_values holds no layers.")
    first = pairs[0][0]
    if first.ndim != 4:
        raise ValueError(f"Expected key/value tensors of rank 4 (batch, heads, tokens, head_dim), got {first.ndim}.")
    if first.shape[0] != 1:
        raise ValueError(f"The cache must come from one sequence (batch 1), got batch {first.shape[0]}.")
    heads, head_dim = first.shape[1], first.shape[3]
    for index, (key, value) in enumerate(pairs):
        for name, tensor in (("key", key), ("value", value)):
            if tensor.ndim != 4 or tensor.shape[0] != 1 or tensor.shape[1] != heads or tensor.shape[3] != head_dim:
                raise ValueError(f"Layer {index}'s {name} is {tuple(tensor.shape)}, layer 0's key "
                                 f"{tuple(first.shape)}: the layers' heads and head_dim must agree.")
            if tensor.shape[2] < num_virtual_tokens:
                raise ValueError(f"Need at least {num_virtual_tokens} cached tokens, layer {index} holds "
                                 f"{tensor.shape[2]}.")
    # layers × (key, value) × heads × tokens × head_dim → tokens × layers × (key, value) × heads × head_dim
    stacked = torch.stack([torch.stack((key[0, :, :num_virtual_tokens], value[0, :, :num_virtual_tokens]))
                           for key, value in pairs])
    return stacked.permute(3, 0, 1, 2, 4).reshape(num_virtual_tokens, -1)


def _prefix_adapter(model, adapter_name: Optional[str]):
    """(adapter name, its config), refused unless it is a prefix-tuning adapter without projection."""
    adapter_name = model.active_adapter if adapter_name is None else adapter_name
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter '{adapter_name}' not found; available: {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    if config.peft_type != PeftType.PREFIX_TUNING:
        raise ValueError(f"Adapter '{adapter_name}' must be a PREFIX_TUNING adapter (got "
                         f"{PeftType(config.peft_type).value}).")
    if getattr(config, "prefix_projection", False):
        raise ValueError("Initialization from KV cache is not supported for prefix tuning with "
                         "`prefix_projection=True`.")
    return adapter_name, config


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(model, *, adapter_name: Optional[str] = None, past_key_values: Any,
                                              num_virtual_tokens: Optional[int] = None) -> torch.Tensor:
    """Load the first `num_virtual_tokens` (default: the adapter's) positions of `past_key_values` into prefix-tuning
    adapter `adapter_name` (default: the active one) of PeftModel `model`; returns the prefix loaded. A cache that
    does not fit the adapter raises and leaves it as it was."""
    adapter_name, config = _prefix_adapter(model, adapter_name)
    count = config.num_virtual_tokens if num_virtual_tokens is None else num_virtual_tokens
    prefix = prompt_embeddings_from_past_key_values(past_key_values, num_virtual_tokens=count)
    model.prompt_encoder[adapter_name].load_prompt_embeddings(prefix)
    return prefix


def _token_ids(tokenizer, text: str, use_chat_template: bool, max_length: Optional[int]) -> torch.Tensor:
    """`text` as one row of token ids: as the system message of the tokenizer's chat template where it has one
    (and takes these arguments), else plainly; at most `max_length` of them."""
    ids = None
    if use_chat_template and hasattr(tokenizer, "apply_chat_template"):
        try:
            ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                                add_generation_prompt=False, return_dict=False, return_tensors="pt")
        except (TypeError, ValueError):  # no chat template, or a tokenizer without these arguments
            ids = None
    if ids is None:
        return tokenizer(text, return_tensors="pt", truncation=max_length is not None,
                         max_length=max_length)["input_ids"]
    return ids if max_length is None else ids[:, :max_length]


@torch.no_grad()
def initialize_kv_prefix_from_text(model, tokenizer, *, text: str, adapter_name: Optional[str] = None,
                                   num_virtual_tokens: Optional[int] = None, use_chat_template: bool = True,
                                   max_length: Optional[int] = None) -> torch.Tensor:
    """Run the base model (adapters off) over `text` (the system message of the tokenizer's chat template where
    `use_chat_template` and it has one) and load the first `num_virtual_tokens` positions of its cache into
    prefix-tuning adapter `adapter_name`; returns the prefix loaded. The text must give at least that many tokens."""
    _prefix_adapter(model, adapter_name)  # (refused before the model runs)
    ids = _token_ids(tokenizer, text, use_chat_template, max_length).to(model.device)
    with model.disable_adapter():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return initialize_kv_prefix_from_past_key_values(model, adapter_name=adapter_name,
                                                     past_key_values=out.past_key_values,
                                                     num_virtual_tokens=num_virtual_tokens)
