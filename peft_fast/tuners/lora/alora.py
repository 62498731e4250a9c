"""Activated LoRA (aLoRA, https://arxiv.org/abs/2504.12397): `LoraConfig(alora_invocation_tokens=[...])`.

An aLoRA adapter acts only from the last occurrence of its invocation token sequence to the end of each input; the
tokens before it see the base model alone, so a KV cache built by the base model serves the adapter too. The model
finds, per input row, how many tokens from the end the invocation starts (its "offset", None where it is absent: the
adapter then acts nowhere in that row) and hands the offsets to the layers (LoraModel._enable_peft_forward_hooks);
a layer adds the adapter's term to those last tokens only. In generate, the offsets of the prompt hold for every
step, so each newly generated token gets the adapter. Linear layers only (nn.Linear, Conv1D, bitsandbytes), as PEFT.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ...utils.constants import BASE_ADAPTER_NAME


def _last_match_starts(input_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row of input_ids (B × T), where the last occurrence of `tokens` starts, or -1."""
    batch, length = input_ids.shape
    if length < len(tokens):
        return torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
    hits = (input_ids.unfold(1, len(tokens), 1) == tokens).all(-1)  # B × (T − L + 1)
    positions = torch.arange(hits.shape[1], device=input_ids.device)
    return torch.where(hits, positions, -1).amax(-1)


def calculate_alora_offsets(peft_config: dict, active_adapter: str, input_ids: Optional[torch.Tensor],
                            adapter_names: Optional[list[str]] = None) -> list[Optional[int]]:
    """Per input row, how many tokens from the end the last invocation sequence of that row's adapter starts (the
    active adapter, or adapter_names[i]); None where the row's adapter is no aLoRA, is the base model, or its
    invocation sequence is absent. One device→host copy a call."""
    if input_ids is None:
        return []
    batch, length = input_ids.shape
    offsets: list[Optional[int]] = [None] * batch
    rows_of: dict[str, list[int]] = {}
    for i in range(batch):
        name = adapter_names[i] if adapter_names and i < len(adapter_names) else active_adapter
        if name == BASE_ADAPTER_NAME:
            continue
        if name not in peft_config:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for row {i}.")
            continue
        if getattr(peft_config[name], "alora_invocation_tokens", None) is not None:
            rows_of.setdefault(name, []).append(i)
    for name, rows in rows_of.items():
        tokens = torch.tensor(peft_config[name].alora_invocation_tokens, dtype=torch.long, device=input_ids.device)
        starts = _last_match_starts(input_ids[rows], tokens).tolist()
        for i, start in zip(rows, starts):
            offsets[i] = length - start if start >= 0 else None
    return offsets


def is_alora_relevant_in_batch(model: nn.Module, adapter_names: Optional[list[str]] = None) -> bool:
    """Whether the active adapter, or one that adapter_names asks for, is an aLoRA adapter."""
    if getattr(model.active_peft_config, "alora_invocation_tokens", None):
        return True
    for name in adapter_names or ():
        config = model.peft_config.get(name) if name != BASE_ADAPTER_NAME else None
        if config is not None and getattr(config, "alora_invocation_tokens", None):
            return True
    return False


def get_alora_offsets_for_forward(model: nn.Module, input_ids: Optional[torch.Tensor] = None,
                                  inputs_embeds: Optional[torch.Tensor] = None, **kwargs) -> dict:
    """kwargs with `alora_offsets` computed from input_ids where the batch has aLoRA adapters (and none was given)."""
    if not is_alora_relevant_in_batch(model, kwargs.get("adapter_names")) or kwargs.get("alora_offsets") is not None:
        return kwargs
    if input_ids is None and inputs_embeds is not None:
        warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for this "
                      "forward pass.")
    kwargs["alora_offsets"] = (calculate_alora_offsets(model.peft_config, model.active_adapter, input_ids,
                                                       adapter_names=kwargs.get("adapter_names"))
                               if input_ids is not None else None)
    return kwargs


def get_alora_offsets_for_generate(model: nn.Module, *args, **kwargs) -> dict:
    """kwargs with `alora_offsets` computed from the prompt (input_ids, or the first positional tensor) where the
    batch has aLoRA adapters (and none was given); they hold for every generation step."""
    if not is_alora_relevant_in_batch(model, kwargs.get("adapter_names")) or kwargs.get("alora_offsets") is not None:
        return kwargs
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    if input_ids is None:
        warnings.warn("Cannot calculate aLoRA offsets during generate as input_ids are not available. Disabling aLoRA.")
        kwargs["alora_offsets"] = None
        return kwargs
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    kwargs["alora_offsets"] = calculate_alora_offsets(model.peft_config, model.active_adapter, input_ids,
                                                      adapter_names=kwargs.get("adapter_names"))
    return kwargs


def alora_token_mask(offsets: Optional[list], batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """B × T booleans: True on each row's last offsets[i] tokens (none where offsets is None or offsets[i] is None)."""
    if offsets is None:
        return torch.zeros((batch, tokens), dtype=torch.bool, device=device)
    if len(offsets) != batch:
        raise ValueError(f"alora_offsets holds {len(offsets)} values for a batch of {batch} rows")
    counts = torch.tensor([0 if o is None else min(int(o), tokens) for o in offsets], dtype=torch.long, device=device)
    return torch.arange(tokens, device=device) >= (tokens - counts)[:, None]


def add_alora_term(x: torch.Tensor, result: torch.Tensor, term, offsets: Optional[list]) -> torch.Tensor:
    """result with term's s·B·A·drop(x) (an ops.LoraTerm) added at the tokens the offsets activate (x: B × T × in
    or B × in, cast to A's dtype first); the term is computed for those tokens alone and rounded to result's dtype
    as it is added."""
    batch = result.shape[0]
    tokens = result.shape[1] if result.dim() == 3 else 1
    mask = alora_token_mask(offsets, batch, tokens, result.device).reshape(-1)
    x_rows = x.to(term.dtype).reshape(-1, x.shape[-1])
    flat = result.reshape(-1, result.shape[-1])
    delta = term.lora_B(term.lora_A(term.dropout(x_rows[mask]))) * term.scaling
    return flat.index_put((mask,), flat[mask] + delta).view(result.shape)



@contextmanager
def offsets_for_recompute(model: nn.Module, offsets: list):
    """Gradient checkpointing runs a checkpointed layer's forward again during backward, after the forward's hooks
    are gone. While active, each transformers GradientCheckpointingLayer with checkpointing on checkpoints a function
    that hands `offsets` to its LoRA layers while it runs, the first time and when it is recomputed (so each forward's
    own offsets, however many forwards come before a backward)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers have no such layers
        yield
        return
    from .layer import LoraLayer

    swapped = []
    for layer in model.modules():
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if not isinstance(layer, GradientCheckpointingLayer) or not layer.gradient_checkpointing or checkpoint is None:
            continue
        lora_layers = [m for m in layer.modules() if isinstance(m, LoraLayer)]

        def checkpoint_with_offsets(function, *args, _checkpoint=checkpoint, _lora_layers=lora_layers, **kwargs):
            def with_offsets(*a, **k):
                before = [m._alora_offsets_for_recompute for m in _lora_layers]
                for m in _lora_layers:
                    m._alora_offsets_for_recompute = offsets
                try:
                    return function(*a, **k)
                finally:
                    for m, value in zip(_lora_layers, before):
                        m._alora_offsets_for_recompute = value

            return _checkpoint(with_offsets, *args, **kwargs)

        layer._gradient_checkpointing_func = checkpoint_with_offsets
        swapped.append((layer, checkpoint))
    try:
        yield
    finally:
        for layer, checkpoint in swapped:
            layer._gradient_checkpointing_func = checkpoint
