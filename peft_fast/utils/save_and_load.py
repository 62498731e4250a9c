"""Adapter state dicts and weight files in HF PEFT's format (keys carry no adapter name on disk)."""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch

from .constants import EMBEDDING_LAYER_NAMES, INCLUDE_LINEAR_LAYERS_SHORTHAND, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .atomic_save import recover_interrupted_save
from .other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, infer_device
from .peft_types import PeftType

_MODEL_PREFIX = "base_model.model."
# In-memory adapter containers whose next key segment is the adapter name.
_ADAPTER_CONTAINERS = (
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_diag",
    "lora_velora_embed",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "trainable_tokens_delta",
)
_DORA_IN_MEMORY = "lora_magnitude_vector.weight"
_DORA_ON_DISK = "lora_magnitude_vector"


def _adapter_key_pattern(adapter_name: str) -> re.Pattern:
    containers = "|".join(_ADAPTER_CONTAINERS)
    return re.compile(rf"(^|\.)({containers})\.{re.escape(adapter_name)}(\.|$)")


def _remove_adapter_name(key: str, adapter_name: str) -> str:
    key = _adapter_key_pattern(adapter_name).sub(r"\1\2\3", key)
    if key.endswith(_DORA_IN_MEMORY):
        key = key[: -len(_DORA_IN_MEMORY)] + _DORA_ON_DISK
    return key


def _insert_adapter_name(key: str, adapter_name: str) -> str:
    if key.endswith(_DORA_ON_DISK):
        return f"{key}.{adapter_name}.weight"
    containers = "|".join(_ADAPTER_CONTAINERS)
    match = re.search(rf"(^|\.)({containers})(\.|$)", key)
    if match is None:
        return key
    head, tail = key[: match.end(2)], key[match.end(2) :]
    return f"{head}.{adapter_name}{tail}"


def _belongs_to_adapter(key: str, adapter_name: str) -> bool:
    return _adapter_key_pattern(adapter_name).search(key) is not None


def _embedding_is_targeted(model, config) -> bool:
    target_modules = getattr(config, "target_modules", None)
    if isinstance(target_modules, str) and target_modules != INCLUDE_LINEAR_LAYERS_SHORTHAND:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return any(
            re.fullmatch(target_modules, name)
            for name, _ in base.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES)
        )
    if target_modules:
        return any(name in target_modules for name in EMBEDDING_LAYER_NAMES)
    return False


def _embedding_state(model, state_dict: dict, embedding_targeted: bool) -> dict:
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
        return {}
    out = {}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None:
            continue
        wrapped_base = getattr(layer, "base_layer", None)
        if embedding_targeted and not isinstance(wrapped_base, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        for name, module in model.named_modules():
            if (not embedding_targeted and module is layer) or (wrapped_base is not None and module is wrapped_base):
                out.update({k: v for k, v in state_dict.items() if k.startswith(f"{name}.")})
                break
    return out


def get_peft_model_state_dict(
    model, state_dict: Optional[dict] = None, adapter_name: str = "default", unwrap_compiled: bool = False,
    save_embedding_layers="auto",
) -> dict:
    """The state dict of adapter `adapter_name` with the adapter name removed from its keys (PEFT's on-disk form)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter {adapter_name} not found; available: {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    if state_dict is None:
        state_dict = model.state_dict()

    if config.is_prompt_learning:
        to_return = _prompt_learning_state(model, config, adapter_name, state_dict)
    else:
        to_return = _adapter_state(config, adapter_name, state_dict)

    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and module.has_adapter(adapter_name):
            prefix = f"{name}."
            sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            to_return.update({f"{name}.{k}": v for k, v in module.adapter_state_dict(adapter_name, sub).items()})

    embedding_targeted = _embedding_is_targeted(model, config)
    if save_embedding_layers == "auto":
        # trained token rows are saved as such: no whole embedding matrix for them
        trains_tokens = config.peft_type == PeftType.TRAINABLE_TOKENS or \
            getattr(config, "trainable_token_indices", None) is not None
        save_embedding_layers = embedding_targeted and not trains_tokens
        if save_embedding_layers:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
    if save_embedding_layers:
        to_return.update(_embedding_state(model, state_dict, embedding_targeted))

    return {_remove_adapter_name(k, adapter_name): _full(v) for k, v in to_return.items()}


def _sharded_like(value, target):
    """A whole tensor bound for a sharded (FSDP2 DTensor) parameter, sharded the parameter's way: each rank keeps its
    own shard of its own copy (every rank loads the same file), no communication."""
    if target is None or type(target).__name__ != "DTensor" or type(value).__name__ == "DTensor":
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def _full(value):
    """A sharded tensor (FSDP2's DTensor) as the whole tensor, as one process would hold it; anything else as is.
    (A collective: every rank computes the state dict, in the same key order, as save_pretrained does.)"""
    full_tensor = getattr(value, "full_tensor", None)
    return full_tensor() if full_tensor is not None and type(value).__name__ == "DTensor" else value


def _adapter_state(config, adapter_name: str, state_dict: dict) -> dict:
    """The adapter's own tensors (LoRA, LoHa, LoKr …: keys under its method's prefix), plus biases per `bias`."""
    from ..peft_model import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type, "lora_")
    bias = getattr(config, "bias", "none")
    lora_keys = [k for k in state_dict if prefix in k and _belongs_to_adapter(k, adapter_name)]
    to_return = {k: state_dict[k] for k in lora_keys}
    if bias == "all":
        to_return.update({k: v for k, v in state_dict.items() if "bias" in k and "lora_" not in k})
    elif bias == "lora_only":
        for k in lora_keys:
            bias_name = k.split("lora_")[0] + "bias"
            if bias_name in state_dict:
                to_return[bias_name] = state_dict[bias_name]
    return to_return


def _prompt_learning_state(model, config, adapter_name: str, state_dict: dict) -> dict:
    if getattr(config, "inference_mode", False) and hasattr(model, "prompt_encoder"):
        prompt_embeddings = model.prompt_encoder[adapter_name].embedding.weight
    else:
        prompt_embeddings = model.get_prompt_embedding_to_save(adapter_name=adapter_name)
    return {"prompt_embeddings": prompt_embeddings}


def set_peft_model_state_dict(
    model, peft_model_state_dict: dict, adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
):
    """Load an adapter state dict (PEFT's on-disk keys) into adapter `adapter_name` of `model`.

    Shapes are checked before anything is copied, so a mismatch raises ValueError with the model unchanged (or,
    with ignore_mismatched_sizes=True, the mismatching tensors are skipped with a warning).
    """
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter {adapter_name} not found; available: {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    prompt_embeddings = None
    if config.is_prompt_learning:  # the prompt lives on the prompt encoder; the rest are modules_to_save
        peft_model_state_dict = dict(peft_model_state_dict)
        prompt_embeddings = _check_prompt_embeddings(model, peft_model_state_dict.pop("prompt_embeddings", None),
                                                     adapter_name)

    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    remapped = {}
    for key, value in peft_model_state_dict.items():
        new_key = _modules_to_save_key(key, adapter_name, wrappers)
        if new_key is None:
            new_key = key if config.is_prompt_learning else _insert_adapter_name(key, adapter_name)
        remapped[new_key] = value

    model_state = model.state_dict()
    if not any(n.startswith(_MODEL_PREFIX) for n in model_state):
        remapped = {k.removeprefix(_MODEL_PREFIX): v for k, v in remapped.items()}

    # a tensor that is not floating point cannot be an adapter weight (torch would silently cast it)
    not_float = [(k, str(v.dtype), str(model_state[k].dtype)) for k, v in remapped.items()
                 if k in model_state and model_state[k].is_floating_point() and not v.is_floating_point()]
    if not_float:
        raise ValueError(f"Error(s) in loading the adapter '{adapter_name}': {_summary(not_float, 'dtype')}; "
                         "adapter weights must be floating point.")
    mismatched = [
        (k, tuple(v.shape), tuple(model_state[k].shape))
        for k, v in remapped.items()
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)
    ]
    if mismatched:
        if not ignore_mismatched_sizes:
            raise ValueError(f"Error(s) in loading the adapter '{adapter_name}': {_summary(mismatched, 'shape')}. "
                             "Pass ignore_mismatched_sizes=True to skip these tensors.")
        warnings.warn(f"Some adapter weights were not loaded because of mismatched shapes: "
                      f"{_summary(mismatched, 'shape')}")
        for k, _, _ in mismatched:
            del remapped[k]
    remapped = {k: _sharded_like(v, model_state.get(k)) for k, v in remapped.items()}
    if low_cpu_mem_usage:  # assigned, not copied: in the dtype the adapter was made in (as a copy would give)
        empty = [k for k, v in model_state.items() if v.device.type == "meta" and f".{adapter_name}" in k]
        lacking = [k for k in empty if k not in remapped]
        if lacking:  # checked before anything is assigned: the model stays as it was
            raise ValueError(f"The adapter '{adapter_name}' was made without weights (low_cpu_mem_usage=True) and "
                             f"the state dict lacks {len(lacking)} of them, e.g. {lacking[:3]}")
        remapped = {k: v.to(model_state[k].dtype) if k in model_state and v.is_floating_point() else v
                    for k, v in remapped.items()}
    result = model.load_state_dict(remapped, strict=False, assign=low_cpu_mem_usage)
    if low_cpu_mem_usage:
        _place_adapter(model, adapter_name)
    if prompt_embeddings is not None:
        model.prompt_encoder[adapter_name].embedding.load_state_dict({"weight": prompt_embeddings}, strict=True)
    return result


def _place_adapter(model, adapter_name: str) -> None:
    """Adapter tensors assigned from a file (low_cpu_mem_usage) onto their base layer's device, dtype kept."""
    from ..tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        weight = module._base_weight()
        if weight is not None and weight.device.type != "meta":
            module._move_adapter_to_device_of_base_layer(adapter_name, device=weight.device)


def _summary(found: list[tuple[str, object, object]], what: str, shown: int = 3) -> str:
    """'2 tensors have the wrong shape: k1 ((5, 4) in the checkpoint, (4, 4) in the model); k2 (…)', at most
    `shown` of them named: a message of one line, however many tensors are wrong."""
    parts = [f"{k} ({a} in the checkpoint, {b} in the model)" for k, a, b in found[:shown]]
    more = f"; and {len(found) - shown} more" if len(found) > shown else ""
    noun = "tensor has" if len(found) == 1 else "tensors have"
    return f"{len(found)} {noun} the wrong {what}: " + "; ".join(parts) + more


def _modules_to_save_key(key: str, adapter_name: str, wrappers: dict) -> Optional[str]:
    """`<wrapper>.weight` (PEFT ≥ 0.15) or `<wrapper>.modules_to_save.weight` (older) → in-memory key."""
    for name in wrappers:
        for prefix in (f"{_MODEL_PREFIX}{name}.", f"{name}."):
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                rest = rest.removeprefix("modules_to_save.")
                if rest.startswith("original_module."):
                    return key
                return f"{prefix}modules_to_save.{adapter_name}.{rest}"
    return None


def _check_prompt_embeddings(model, value, adapter_name: str):
    if value is None:
        raise ValueError("The prompt-learning adapter file has no 'prompt_embeddings' tensor.")
    embedding = model.prompt_encoder[adapter_name].embedding
    if tuple(value.shape) != tuple(embedding.weight.shape):
        raise ValueError(
            f"prompt_embeddings of shape {tuple(value.shape)} do not fit adapter '{adapter_name}' "
            f"({tuple(embedding.weight.shape)}); a prefix saved with prefix_projection loads only for inference "
            "(is_trainable=False)."
        )
    return value


def load_peft_weights(model_id: str, device: Optional[str] = None, **hf_hub_download_kwargs) -> dict:
    """Read adapter_model.safetensors (or .bin) from a local directory, or from the Hub when online."""
    subfolder = hf_hub_download_kwargs.get("subfolder")
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    if device is None:
        device = infer_device()
    recover_interrupted_save(path)
    if os.path.exists(os.path.join(path, SAFETENSORS_WEIGHTS_NAME)):
        filename, use_safetensors = os.path.join(path, SAFETENSORS_WEIGHTS_NAME), True
    elif os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        filename, use_safetensors = os.path.join(path, WEIGHTS_NAME), False
    elif os.path.isdir(path):
        raise ValueError(f"Can't find weights in {path}: neither {SAFETENSORS_WEIGHTS_NAME} nor {WEIGHTS_NAME} exists.")
    else:
        filename, use_safetensors = _download_weights(model_id, hf_hub_download_kwargs)
    try:
        if use_safetensors:
            from safetensors.torch import load_file

            return load_file(filename, device=str(device))
        return torch.load(filename, map_location=torch.device(device), weights_only=True)
    except Exception as exc:
        raise ValueError(f"Could not read the adapter weights file {filename}: {exc}") from exc


def _download_weights(model_id: str, kwargs: dict) -> tuple[str, bool]:
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in kwargs.items() if k in {"subfolder", "revision", "cache_dir", "token", "local_files_only"}}
    errors = []
    for name, safe in ((SAFETENSORS_WEIGHTS_NAME, True), (WEIGHTS_NAME, False)):
        try:
            return hf_hub_download(model_id, name, **kwargs), safe
        except Exception as exc:  # try the next file name, then report both
            errors.append(f"{name}: {exc}")
    raise ValueError(f"Can't find adapter weights for '{model_id}' locally or on the Hub ({'; '.join(errors)}).")


# ------------------------------------------------------------------ the base model's own state dict
def _original_key(root: torch.nn.Module, key: str) -> Optional[str]:
    """The key `key` of root's state dict had before adapters were injected, or None for an adapter's own tensor.

    Walks the module tree along the key: below a tuner layer only `base_layer` belongs to the base model (and
    that segment goes), below a modules_to_save wrapper only `original_module`; anything past the modules (a
    parameter, or extra entries such as bitsandbytes' quantization state) is kept as it is."""
    from ..tuners.tuners_utils import BaseTunerLayer

    parts = key.split(".")
    kept: list[str] = []
    module = root
    for i, part in enumerate(parts):
        wrapped = "base_layer" if isinstance(module, BaseTunerLayer) else \
            module.wrapped_attribute if isinstance(module, AuxiliaryTrainingWrapper) else None
        if wrapped is not None:  # a PEFT wrapper: its base module's segment goes, anything else is the adapter's
            if part != wrapped:
                return None
        elif part in module._modules:
            kept.append(part)
        else:  # past the modules: a tensor name (or several segments of one)
            return ".".join(kept + parts[i:])
        module = module._modules[part]
    return ".".join(kept)


def _key_map(root: torch.nn.Module, keys) -> dict[str, str]:
    """original key → key in the PEFT-wrapped base model `root`, for each of its state-dict `keys` that belongs to
    the base model (adapter tensors left out)."""
    mapping = {}
    for key in keys:
        original = _original_key(root, key)
        if original is not None:
            mapping[original] = key
    return mapping


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict of a PeftModel under the keys it had before adapters were injected (no
    `base_layer` / `original_module` infixes), without adapter tensors: what the bare model's state_dict() gives."""
    if model._is_prompt_learning:  # the base model is not modified
        return dict(model.base_model.state_dict())
    root = model.base_model.model
    state = root.state_dict()
    return {original: state[key] for original, key in _key_map(root, state).items()}


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a state dict keyed as the bare base model's into a PeftModel (the counterpart of
    get_base_model_state_dict); adapters are left as they are. strict: RuntimeError on missing or unexpected keys,
    nothing loaded. Returns (missing_keys, unexpected_keys) as torch's load_state_dict does."""
    from collections import namedtuple

    if model._is_prompt_learning:
        return model.base_model.load_state_dict(state_dict, strict=strict)
    root = model.base_model.model
    mapping = _key_map(root, root.state_dict())
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        errors = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + \
            ([f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else [])
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    root.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])(missing, unexpected)
