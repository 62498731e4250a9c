"""MixedModel: one tuner holding LoRA, LoHa and LoKr adapters at once (PEFT's `peft.tuners.mixed.model`).

Adapters of different methods on the same module stack: the layer of the adapter added later wraps the layer of
the earlier one (its `base_layer`), so a forward runs every active adapter of every method, in the order they
were added. Each method's own injection code is reused; only module creation and trainability are dispatched here.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ...utils.other import AuxiliaryTrainingWrapper, _get_submodules
from ...utils.peft_types import PeftType
from ..loha import LoHaConfig, LoHaModel
from ..lokr import LoKrConfig, LoKrModel
from ..lora import LoraConfig, LoraModel
from ..tuners_utils import BaseTuner, BaseTunerLayer

COMPATIBLE_TUNER_TYPES = (PeftType.LORA, PeftType.LOHA, PeftType.LOKR)
_TUNERS = {LoraConfig: LoraModel, LoHaConfig: LoHaModel, LoKrConfig: LoKrModel}
PREFIXES = [tuner.prefix for tuner in _TUNERS.values()]


def _tuner_for(config) -> type[BaseTuner]:
    for config_cls, tuner in _TUNERS.items():
        if isinstance(config, config_cls):
            return tuner
    raise TypeError(f"Unsupported config type {type(config).__name__}, should be one of {COMPATIBLE_TUNER_TYPES}.")


class MixedModel(BaseTuner):
    """Tuner of a PeftMixedModel; use `get_peft_model(model, config, mixed=True)` rather than this class."""

    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config) -> None:
        if not isinstance(config, tuple(_TUNERS)):
            raise TypeError(
                f"{type(self).__name__} only supports {COMPATIBLE_TUNER_TYPES} configs, but got {type(config)}."
            )
        biased = [c for c in self.peft_config.values() if getattr(c, "bias", "none") != "none"]
        if len(self.peft_config) > 1 and len(biased) > 1:
            raise ValueError("MixedModel supports only 1 adapter with bias. Set bias to 'none' for the others.")

    @staticmethod
    def _prepare_adapter_config(peft_config, model_config: dict):
        if peft_config.target_modules is None:
            if model_config.get("model_type") not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
                raise ValueError("Please specify `target_modules` in `peft_config`")
            peft_config.target_modules = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_config["model_type"]])
        return peft_config

    def _create_and_replace(self, config, *args, **kwargs) -> None:
        _tuner_for(config)._create_and_replace(self, config, *args, **kwargs)

    @staticmethod
    def _create_new_module(config, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        return _tuner_for(config)._create_new_module(config, adapter_name, target, **kwargs)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if not any(prefix in name for prefix in PREFIXES):
                param.requires_grad = False
        for adapter in self.active_adapters:
            bias = getattr(self.peft_config[adapter], "bias", "none")
            if bias == "all":
                for name, param in model.named_parameters():
                    if "bias" in name:
                        param.requires_grad = True
            elif bias.endswith("_only"):
                for module in model.modules():
                    if isinstance(module, BaseTunerLayer) and getattr(module.get_base_layer(), "bias", None) is not None:
                        module.get_base_layer().bias.requires_grad = True

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Each stacked layer merges its own adapters into the one base weight, then the base module goes back."""
        if merge:
            self._check_merge_allowed()
        keys = [k for k, _ in self.model.named_modules() if not any(prefix in k for prefix in PREFIXES)]
        iterator = keys
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(keys, desc="Unloading " + ("and merging " if merge else "") + "model")
        for key in iterator:
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, BaseTunerLayer):
                layer = target
                while isinstance(layer, BaseTunerLayer):
                    if merge:
                        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                    layer = layer.base_layer
                setattr(parent, target_name, target.get_base_layer())
            elif isinstance(target, AuxiliaryTrainingWrapper):
                setattr(parent, target_name, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names))
        if "peft_config" in self.model.__dict__:
            del self.model.__dict__["peft_config"]
        return self.model

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = set(names) - set(self.peft_config)
        if missing:
            raise ValueError(f"Adapter(s) {sorted(missing)} not found, available adapters: {sorted(self.peft_config)}")
        for name in names:
            super().delete_adapter(name)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)
