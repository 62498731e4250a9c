"""LoraConfig's `trainable_token_indices`: the embedding rows an adapter trains beside its LoRA layers (PEFT's
handling in `peft.utils.other.set_additional_trainable_modules`), including layers tied to the embedding."""

from __future__ import annotations

import warnings

from torch import nn

from ...utils.other import (
    TrainableTokensWrapper,
    _get_input_embeddings_name,
    _set_trainable,
    get_module_names_tied_with_embedding,
    names_module,
)


def wrap_trainable_tokens(model: nn.Module, peft_config, adapter_name: str, model_config: dict) -> None:
    """Wrap the layers `peft_config.trainable_token_indices` names (a list: the input embedding; a dict: layer name →
    indices) in TrainableTokensWrappers for `adapter_name`. Under tie_word_embeddings the layers sharing the
    embedding's weight follow its rows (a tied wrapper), unless the dict gives them other indices; with
    ensure_weight_tying=True other indices are an error."""
    indices = peft_config.trainable_token_indices
    if isinstance(indices, dict):
        targets = dict(indices)
    else:
        targets = {_get_input_embeddings_name(model) or "embed_tokens": indices}
    for name in targets:
        if name in (peft_config.modules_to_save or []):
            raise ValueError(
                "The embedding layer is already marked to be trained fully, either specify "
                f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but not both.'
            )
    weights_tied = bool(model_config.get("tie_word_embeddings", False))
    ensure = bool(getattr(peft_config, "ensure_weight_tying", False))
    tied_names = get_module_names_tied_with_embedding(model) if weights_tied else []
    embedding_name = _get_input_embeddings_name(model) or ""

    mismatch, skipped = False, set()
    if len(targets) > 1 and tied_names:
        tied_targets = [t for t in targets
                        if names_module(embedding_name, t) or any(names_module(n, t) for n in tied_names)]
        if len(tied_targets) >= 2:
            first = list(targets[tied_targets[0]])
            mismatch = any(list(targets[t]) != first for t in tied_targets[1:])
            if mismatch and ensure:
                conflicting = ", ".join(f"{t}: {targets[t]}" for t in tied_targets)
                raise ValueError(
                    "Cannot ensure weight tying when different token indices are specified for tied layers. "
                    f"Conflicting layers: {conflicting}. Please use the same indices for all tied layers or set "
                    "ensure_weight_tying=False."
                )
            if not mismatch:  # the tied layers are wrapped below, tied to the embedding's adapter
                skipped = {t for t in tied_targets if not names_module(embedding_name, t)}

    for name, token_indices in targets.items():
        if name not in skipped:
            _set_trainable(model, adapter_name, [name], inference_mode=peft_config.inference_mode,
                           wrapper_cls=TrainableTokensWrapper, strict_module_check=True, token_indices=token_indices)

    if ensure and not weights_tied:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if tied_names and isinstance(embedding, TrainableTokensWrapper) and embedding.has_adapter(adapter_name) and \
            (ensure or not mismatch):
        _set_trainable(model, adapter_name, tied_names, inference_mode=peft_config.inference_mode,
                       wrapper_cls=TrainableTokensWrapper, strict_module_check=True,
                       token_indices=embedding.token_adapter.token_indices[adapter_name],
                       tied_adapter=embedding.token_adapter)
