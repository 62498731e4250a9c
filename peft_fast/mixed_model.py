"""PeftMixedModel: LoRA, LoHa and LoKr adapters loaded into one model and active together (PEFT's `peft.mixed_model`).

As in PEFT it is meant for inference and loading: adapters come from files saved by PeftModel (of either
library); saving a mixed model is not supported (PEFT raises the same way).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Optional, Union

from torch import nn

from .config import PeftConfig
from .peft_model import PeftModel, _snapshot, _uses_checkpointing
from .tuners.mixed import COMPATIBLE_TUNER_TYPES, MixedModel
from .utils.other import _set_adapter, _set_trainable, infer_device
from .utils.peft_types import PeftType
from .utils.save_and_load import load_peft_weights, set_peft_model_state_dict


def _check_config_compatible(peft_config: PeftConfig) -> None:
    if peft_config.peft_type not in COMPATIBLE_TUNER_TYPES:
        raise ValueError(
            f"The provided `peft_type` '{PeftType(peft_config.peft_type).value}' is not compatible with the "
            f"`PeftMixedModel`. Compatible types are: {COMPATIBLE_TUNER_TYPES}"
        )


class PeftMixedModel(nn.Module):
    """Several adapter types in one model. Build with `get_peft_model(model, config, mixed=True)` or
    `PeftMixedModel.from_pretrained(model, path, adapter_name)`, add more with `load_adapter` / `add_adapter`, and
    activate any set of them with `set_adapter([...])`. Adapters apply in the order they were added."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_config_compatible(peft_config)
        if _uses_checkpointing(model):
            PeftModel._prepare_model_for_gradient_checkpointing(self, model)
        self.modules_to_save = None
        self.base_model = MixedModel(model, {adapter_name: peft_config}, adapter_name)
        self.set_modules_to_save(peft_config, adapter_name)
        self.config = getattr(model, "config", {"model_type": "custom"})
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    # ------------------------------------------------------------------ state
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return PeftModel.get_nb_trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        PeftModel.print_trainable_parameters(self)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any):
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self):
        """Within the context the model behaves as the base model."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an (inactive) adapter of any compatible type; on error the model is left as it was."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        _check_config_compatible(peft_config)
        try:
            self.peft_config[adapter_name] = peft_config
            self.base_model.inject_adapter(self.base_model.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                           autocast_adapter_dtype=autocast_adapter_dtype)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            raise
        self.set_modules_to_save(peft_config, adapter_name)

    def set_modules_to_save(self, peft_config: PeftConfig, adapter_name: str) -> None:
        modules_to_save = getattr(peft_config, "modules_to_save", None)
        if modules_to_save is None:
            return
        self.modules_to_save = set(modules_to_save) | (self.modules_to_save or set())
        _set_trainable(self, adapter_name, modules_to_save, inference_mode=peft_config.inference_mode)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one or several adapters (of any types); their order of application is the order of adding."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = set(names) - set(self.peft_config)
        if missing:
            raise ValueError(f"Adapter(s) {sorted(missing)} not found, available adapters: {sorted(self.peft_config)}")
        self.base_model.set_adapter(names, inference_mode=inference_mode)
        _set_adapter(self, names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        self.base_model.delete_adapter(adapter_name)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the (given, default: active) adapters of every type into the base weights; return the base model."""
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging; return the base model."""
        return self.base_model.unload()

    def get_layer_status(self):
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self):
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    # ------------------------------------------------------------------ files
    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, low_cpu_mem_usage: bool = False, **kwargs: Any):
        """Load an adapter saved by PeftModel (peft_fast or HF PEFT) as `adapter_name`; active adapters stay as they
        are. On error the model is left unchanged."""
        model_id = str(model_id)
        hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
        config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
        _check_config_compatible(config)
        config.inference_mode = not is_trainable
        before = _snapshot(self)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            weights = load_peft_weights(model_id, device=torch_device or infer_device(), **hub_kwargs)
            if not weights:
                raise ValueError(f"The adapter weights file at {model_id} holds no tensors.")
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name,
                                               ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False))
        except Exception:
            self.base_model._remove_adapter_layers(adapter_name)
            for param, flag in before:
                param.requires_grad = flag
            raise
        self.set_adapter(self.active_adapters)
        if not is_trainable:
            self.eval()
        return result

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None, **kwargs: Any):
        """A PeftMixedModel holding the adapter at `model_id` (first of possibly several, added by load_adapter)."""
        model_id = str(model_id)
        hub_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        _check_config_compatible(config)
        config.inference_mode = not is_trainable
        before = _snapshot(model)
        mixed = cls(model, config, adapter_name)
        try:
            weights = load_peft_weights(model_id, device=kwargs.get("torch_device") or infer_device(), **hub_kwargs)
            if not weights:
                raise ValueError(f"The adapter weights file at {model_id} holds no tensors.")
            set_peft_model_state_dict(mixed, weights, adapter_name=adapter_name,
                                      ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False))
        except Exception:
            mixed.base_model._remove_adapter_layers(adapter_name)
            for param, flag in before:
                param.requires_grad = flag
            if "peft_config" in model.__dict__:
                del model.__dict__["peft_config"]
            raise
        if not is_trainable:
            mixed.eval()
        return mixed

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"Saving is not supported for {type(self).__name__} (as in PEFT): save each adapter from a PeftModel."
        )

    def create_or_update_model_card(self, output_dir: str) -> None:
        raise NotImplementedError(f"Model card creation is not supported for {type(self).__name__} (as in PEFT).")
