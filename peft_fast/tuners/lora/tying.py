"""LoraConfig.ensure_weight_tying for an input embedding trained through modules_to_save or target_modules, on a
model whose output layer shares the embedding's weight (tie_word_embeddings) — PEFT's behaviour and config edits.

- modules_to_save: the embedding is trained as a copy; the tied layers (lm_head) get a copy that is a Linear over
  the very same weight Parameter, so both stay one matrix (`config.modules_to_tie`).
- target_modules: the embedding gets LoRA; each tied layer gets a LoRA whose A and B are the embedding's B and A
  transposed — views of the same storage (`config.target_modules_to_tie`), as PEFT ties them.
The config is edited as PEFT edits it (the embedding's full name added to modules_to_save / target_modules, the
tied layers' names taken out), so adapter_config.json matches PEFT's. Without ensure_weight_tying, training a tied
layer warns as PEFT does.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from ...utils.constants import EMBEDDING_LAYER_NAMES
from ...utils.other import _get_input_embeddings_name, get_module_names_tied_with_embedding, names_module
from .config import LoraConfig

_NOT_ENSURED = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is not set "
    "to True. This can lead to complications, for example when merging the adapter or converting your model to "
    "formats other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777"
)


def _is_embedding_name(name: str) -> bool:
    return name.split(".")[-1] in EMBEDDING_LAYER_NAMES


def _without_tied(names, tied: set[str]) -> list:
    """`names` minus, for each tied layer, the first name that targets it."""
    names = list(names)
    for key in sorted(tied):
        for name in names:
            if re.match(rf"(^|.*\.){name}($|\..*)", key):
                names.remove(name)
                break
    return names


def prepare_weight_tying(config: LoraConfig, model: nn.Module) -> None:
    """Edit `config` for ensure_weight_tying (see the module docstring), or warn as PEFT does."""
    to_save = list(config.modules_to_save or [])
    embedding_to_save = any(_is_embedding_name(m) for m in to_save)
    target = config.target_modules
    if isinstance(target, str):
        embedding_targeted = any(re.fullmatch(target, name) for name in EMBEDDING_LAYER_NAMES)
    else:
        embedding_targeted = any(_is_embedding_name(m) for m in (target or []))
    tied = set(get_module_names_tied_with_embedding(model))
    if not config.ensure_weight_tying:
        if (embedding_to_save or embedding_targeted) and tied:
            warnings.warn(_NOT_ENSURED)
        return
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model")
        return
    name = _get_input_embeddings_name(model)
    if embedding_to_save:
        config.modules_to_tie = tied
        if name not in to_save:
            to_save.append(name)
        config.modules_to_save = _without_tied(to_save, tied)
    elif embedding_targeted:
        config.target_modules_to_tie = tied
        if isinstance(target, str):  # a regex: the embedding joins it, the tied layers come separately
            config.target_modules = rf"(?:{target}|^{re.escape(name)}$)"
        else:
            config.target_modules = set(_without_tied(set(target) | {name}, tied))
    else:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`")


def is_tied_target(config: LoraConfig, key: str) -> bool:
    tied = getattr(config, "target_modules_to_tie", None) or ()
    return any(names_module(key, name) for name in tied)


def tied_lora_factors(model: nn.Module, adapter_name: str) -> dict:
    """The input embedding's LoRA factors as a tied output layer's: A = Bᵀ_embedding, B = Aᵀ_embedding (views)."""
    embedding = model.get_input_embeddings()
    if adapter_name not in getattr(embedding, "lora_embedding_A", {}):
        raise ValueError("ensure_weight_tying: the input embedding has no LoRA adapter to tie the output layer to.")
    return {"lora_A": embedding.lora_embedding_B[adapter_name].t(),
            "lora_B": embedding.lora_embedding_A[adapter_name].t()}
