"""BaseTuner / BaseTunerLayer: the contract every tuner follows (PEFT's `peft.tuners.tuners_utils`).

A BaseTuner wraps a model and injects adapter layers into it; a BaseTunerLayer wraps one base layer and keeps the
per-adapter state (which adapters exist, which are active, what is merged). Arithmetic lives in `peft_fast.ops`.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..config import PeftConfig
from ..utils.error import NoMatchingPeftModuleError
from ..utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from ..utils.other import (
    AuxiliaryTrainingWrapper,
    _get_submodules,
    _set_adapter,
    _set_trainable,
    _unwrap_modules_to_save,
    names_module,
    set_adapter_weights_requires_grad,
)
from ..utils.peft_types import TaskType


class _ExcludedModule:
    """Returned by check_target_module_exists for modules excluded explicitly (falsy, but distinguishable)."""

    def __bool__(self):
        return False


def match_target_against_key(target_pattern: str, key: str):
    return re.fullmatch(target_pattern, key)


def check_target_module_exists(config, key: str) -> bool | re.Match | _ExcludedModule | None:
    """Whether module `key` is targeted by `config` (target_modules, exclude_modules, layers_to_transform)."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _ExcludedModule()
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return _ExcludedModule()

    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return _ExcludedModule()

    target_modules = config.target_modules
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return match_target_against_key(target_modules, key)
    if key in target_modules:
        return True

    found = any(key.endswith(f".{t}") for t in target_modules)
    layer_indexes = getattr(config, "layers_to_transform", None)
    layers_pattern = getattr(config, "layers_pattern", None)
    uses_indexes = layer_indexes is not None and (len(layer_indexes) != 0 if isinstance(layer_indexes, list) else True)
    if uses_indexes and found:
        match = None
        if not layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        found = index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
    return found


def check_adapters_to_merge(module: "BaseTunerLayer", adapter_names: Optional[list[str]] = None) -> list[str]:
    """The adapters `merge` should act on: the given ones (default: the active ones) minus those already merged."""
    if adapter_names is None:
        adapter_names = module.active_adapters
    if isinstance(adapter_names, str):
        raise ValueError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    if module.merged:
        merged = set(module.merged_adapters)
        already = [name for name in adapter_names if name in merged]
        if already:
            warnings.warn(
                f"Already following adapters were merged {','.join(already)}. "
                f"You are now additionally merging {','.join(n for n in adapter_names if n not in merged)}."
            )
        adapter_names = [name for name in adapter_names if name not in merged]
    return adapter_names


def set_requires_grad(model: nn.Module, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
    """Gradients on (or off) for the weights of `adapter_names` (a name or several) in every adapter layer and
    auxiliary module (modules_to_save, trainable tokens) of `model`, active or not; other adapters' are left as they
    are (PEFT's `set_requires_grad`)."""
    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module.set_requires_grad(adapter_names=adapter_names, requires_grad=requires_grad)


@contextlib.contextmanager
def onload_layer(layer: nn.Module):
    """Placeholder for offloaded (accelerate) layers: peft_fast keeps adapters where the base layer is."""
    yield


class BasePromptEncoder(nn.Module):
    """Base of the prompt-learning encoders: `embedding` holds (or, encoded, replaces) the virtual tokens."""

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load the flattened `prompt_embeddings` tensor of a saved adapter into `embedding`."""
        if prompt_embeddings.shape != self.embedding.weight.shape:
            raise ValueError(
                f"Invalid `prompt_embeddings` shape. Expected {tuple(self.embedding.weight.shape)}, got "
                f"{tuple(prompt_embeddings.shape)}."
            )
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings.to(self.embedding.weight.device))


class BaseTunerLayer(ABC):
    """Mixin of every adapter layer: holds names of adapter sub-modules and the active/merged/disabled state."""

    # names of the ModuleDicts/ParameterDicts that hold trainable adapter weights
    adapter_layer_names: tuple[str, ...] = ()
    # names of other per-adapter dicts (ranks, scalings, dropouts…)
    other_param_names: tuple[str, ...] = ()
    _disable_adapters: bool = False
    _active_adapter: Union[str, list[str]] = "default"
    merged_adapters: list[str] = []

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether this layer's adapter is W + ΔW with ΔW a plain matrix, which `convert_to_lora` can approximate by
        a rank-r LoRA (linear layers of additive methods)."""
        return False

    def get_base_layer(self) -> nn.Module:
        base_layer = self
        while hasattr(base_layer, "base_layer"):
            base_layer = base_layer.base_layer
        return base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor:
        return self.get_base_layer().bias

    @abstractmethod
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None: ...

    @abstractmethod
    def unmerge(self) -> None: ...

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        if isinstance(self.active_adapter, str):
            return [self.active_adapter]
        return list(self.active_adapter)

    def _get_available_adapters(self) -> set[str]:
        adapters = set()
        for layer_name in self.adapter_layer_names:
            module = getattr(self, layer_name, None)
            if isinstance(module, (nn.ModuleDict, nn.ParameterDict)):
                adapters.update(module.keys())
        return adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Toggle the adapters on (restoring requires_grad of the active ones) or off (freezing all)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for layer_name in self.adapter_layer_names:
                getattr(self, layer_name).requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make `adapter_names` the active adapters; only they get requires_grad (unless inference_mode), less the
        weights their method keeps frozen (frozen_peft_weight_names)."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for layer_name in self.adapter_layer_names:
            module_dict = getattr(self, layer_name)
            for key, layer in module_dict.items():
                layer.requires_grad_(key in adapter_names and not inference_mode)
        self._freeze_non_trainable_peft_weights(adapter_names)
        self._active_adapter = list(adapter_names)

    # adapter → the names of its weights (adapter_layer_names) that stay frozen while it trains, e.g. MiCA's lora_B;
    # instances get their own copy when one is registered (_register_frozen_peft_weight)
    frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}

    def _register_frozen_peft_weight(self, adapter_name: str, weight_name: str) -> None:
        names = dict(self.frozen_peft_weight_names)
        if weight_name not in names.get(adapter_name, ()):
            names[adapter_name] = names.get(adapter_name, ()) + (weight_name,)
        self.frozen_peft_weight_names = names
        self._freeze_non_trainable_peft_weights(adapter_name)

    def _freeze_non_trainable_peft_weights(self, adapter_names: Union[str, list[str], None] = None) -> None:
        """requires_grad off for the weights frozen_peft_weight_names lists (of `adapter_names`, default all): reapplied
        wherever adapter weights are made trainable (set_adapter, set_requires_grad)."""
        if not self.frozen_peft_weight_names:
            return
        if adapter_names is None:
            adapter_names = list(self.frozen_peft_weight_names)
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for adapter_name in adapter_names:
            for layer_name in self.frozen_peft_weight_names.get(adapter_name, ()):
                module_dict = getattr(self, layer_name, None)
                if layer_name in self.adapter_layer_names and module_dict is not None and adapter_name in module_dict:
                    module_dict[adapter_name].requires_grad_(False)

    def _all_available_adapter_names(self) -> list[str]:
        names = []
        for attr in self.adapter_layer_names + self.other_param_names:
            value = getattr(self, attr, None)
            if hasattr(value, "keys"):
                names.extend(value.keys())
        return sorted(set(names))

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names:
            value = getattr(self, attr, None)
            if hasattr(value, "keys") and adapter_name in value:
                del value[adapter_name]
        if adapter_name in self.frozen_peft_weight_names:
            names = self.frozen_peft_weight_names
            self.frozen_peft_weight_names = {k: v for k, v in names.items() if k != adapter_name}
        if adapter_name in self.active_adapters:
            remaining_active = [a for a in self.active_adapters if a != adapter_name]
            if remaining_active:
                self.set_adapter(remaining_active)
            else:
                remaining = self._all_available_adapter_names()
                if not remaining:
                    self.set_adapter([])
                else:
                    warnings.warn(
                        f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                        f"{remaining[0]}."
                    )
                    self.set_adapter(remaining[0])

    def _base_weight(self) -> Optional[torch.Tensor]:
        """The tensor whose device (and dtype) the adapter's weights follow: the base layer's weight (qweight for
        GPTQ), None where it has neither; layers over other tensors (a bare parameter, an attention module's
        in_proj_weight) say theirs."""
        base_layer = self.get_base_layer()
        for weight_name in ("weight", "qweight"):
            weight = getattr(base_layer, weight_name, None)
            if weight is not None:
                return weight
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Put the adapter's weights on the base layer's device, and in its floating dtype (with `device` given: on
        that device, dtype kept)."""
        base_layer = self.get_base_layer()
        dtype = None
        if device is None:
            weight = self._base_weight()
            if weight is None:
                return
            device, dtype = weight.device, weight.dtype
            if hasattr(base_layer, "compute_dtype"):  # bnb Linear4bit: adapters start in its compute dtype
                dtype = base_layer.compute_dtype
        meta = torch.device("meta")
        for layer_name in self.adapter_layer_names + self.other_param_names:
            adapter_layer = getattr(self, layer_name, None)
            if not isinstance(adapter_layer, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in adapter_layer:
                continue
            item = adapter_layer[adapter_name]
            if any(p.device == meta for p in (item.parameters() if isinstance(item, nn.Module) else [item])):
                continue
            if dtype is not None and (dtype.is_floating_point or dtype.is_complex):
                adapter_layer[adapter_name] = item.to(device, dtype=dtype)
            else:
                adapter_layer[adapter_name] = item.to(device)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Gradients on (or off) for the weights of `adapter_names` in this layer, active or not; other adapters' are
        left as they are, and weights their method keeps frozen stay frozen."""
        set_adapter_weights_requires_grad(self, adapter_names, requires_grad)
        if requires_grad:
            self._freeze_non_trainable_peft_weights(adapter_names)


class BaseTuner(nn.Module, ABC):
    """Wraps a model and replaces its targeted modules by adapter layers of `tuner_layer_cls`."""

    prefix: str = ""
    tuner_layer_cls: type = BaseTunerLayer
    target_module_mapping: dict = {}
    uses_shared_state: bool = False  # (PEFT's flag for tuners whose layers share one state, VB-LoRA's kind)

    def __init__(
        self,
        model: nn.Module,
        peft_config: Union[PeftConfig, dict[str, PeftConfig]],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        if not hasattr(self, "peft_config"):
            self.peft_config = {adapter_name: peft_config} if isinstance(peft_config, PeftConfig) else peft_config
        else:
            warnings.warn(
                "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters in "
                "the model. Make sure to know what you are doing!"
            )
            if isinstance(peft_config, PeftConfig):
                self.peft_config[adapter_name] = peft_config
            else:
                self.peft_config.update(peft_config)
        self.active_adapter: Union[str, list[str]] = adapter_name
        self._pre_injection_hook(self.model, self.peft_config[adapter_name], adapter_name)
        self.inject_adapter(
            self.model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        # Copy the peft_config into the injected model, as PEFT does.
        self.model.peft_config = self.peft_config

    # ------------------------------------------------------------------ properties / pass-through
    @property
    def active_adapters(self) -> list[str]:
        if isinstance(self.active_adapter, str):
            return [self.active_adapter]
        return list(self.active_adapter)

    def forward(self, *args: Any, **kwargs: Any):
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # avoid infinite recursion while the tuner is being built
                raise
            return getattr(self.model, name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether every adapter layer of the model can be converted to LoRA (`convert_to_lora`)."""
        return all(module.supports_lora_conversion(adapter_name) for module in self.model.modules()
                   if isinstance(module, BaseTunerLayer))

    # ------------------------------------------------------------------ hooks for subclasses
    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        pass

    @staticmethod
    def _prepare_adapter_config(peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> Optional[Callable[[], None]]:
        """Change the model's structure before injection; returns what undoes it if injection then fails (or None)."""
        return None

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str):
        return check_target_module_exists(peft_config, key)

    @abstractmethod
    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None: ...

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze every parameter but the adapters' (those under the tuner's prefix); tuners with more rules (LoRA's
        bias) override it."""
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        pass

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        model_config = getattr(model, "config", {"model_type": "custom"})
        if hasattr(model_config, "to_dict"):
            model_config = model_config.to_dict()
        elif not isinstance(model_config, dict):
            model_config = {"model_type": "custom"}
        return model_config

    # ------------------------------------------------------------------ injection
    def _find_targets(self, peft_config: PeftConfig, model: nn.Module) -> list[str]:
        keys, excluded = [], False
        for key, module in model.named_modules():
            if not key or isinstance(module, AuxiliaryTrainingWrapper):
                continue
            # adapter sub-modules (lora_A.default …, a wrapper's insides) are never targets themselves
            if any(isinstance(model.get_submodule(p), (BaseTunerLayer, AuxiliaryTrainingWrapper))
                   for p in _proper_prefixes(key)):
                continue
            matched = self._check_target_module_exists(peft_config, key)
            excluded = excluded or isinstance(matched, _ExcludedModule)
            if matched:
                keys.append(key)
        exclude = getattr(peft_config, "exclude_modules", None)
        if exclude and not excluded:
            warnings.warn(f"You have passed exclude_modules={exclude} but no modules were excluded. Please check that "
                          "exclude_modules was set correctly.")
        # layers tied to a targeted embedding (ensure_weight_tying) come last: their adapters are views of its own
        tied = getattr(peft_config, "target_modules_to_tie", None)
        if tied:
            is_tied = [k for k, _ in model.named_modules() if k and any(names_module(k, t) for t in tied)]
            keys = [k for k in keys if k not in is_tied] + is_tied
        return keys

    def _find_parameter_targets(self, peft_config: PeftConfig, model: nn.Module) -> list[tuple[str, str, str]]:
        """(module to wrap, parameter name, key) for each parameter `target_parameters` names: a key is the
        parameter's name in the bare model ('layers.0.mlp.experts.gate_up_proj'), matched whole or as a suffix; the
        module to wrap is the one holding it, or the outermost wrapper around it. Module order, then each module's
        parameter order (so several parameters of one module nest in a fixed order)."""
        names = sorted(set(getattr(peft_config, "target_parameters", None) or []))
        if not names:
            return []
        found = []
        for module_name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) or not module_name or not _is_base_model_module(model, module_name):
                continue
            outer = _strip_base_layer(module_name)
            for parameter_name, _ in module.named_parameters(recurse=False):
                key = f"{outer}.{parameter_name}"
                if any(names_module(key, name) for name in names):
                    found.append((outer, parameter_name, key))
        return found

    def _create_adapter_layers(self, peft_config, adapter_name: str, model: nn.Module, target_keys: list[str],
                               parameter_targets: list[tuple[str, str, str]], replaced: list, updated: list) -> None:
        """The adapter layers of `adapter_name` on the targeted modules and parameters; what was replaced or updated
        is recorded in `replaced` / `updated` for the caller's rollback."""
        for key in target_keys:
            parent, target, target_name = _get_submodules(model, key)
            if isinstance(target, BaseTunerLayer):
                updated.append(target)
            self._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key=key)
            if getattr(parent, target_name) is not target:
                replaced.append((parent, target_name, target))
        for outer, parameter_name, key in parameter_targets:
            parent, target, target_name = _get_submodules(model, outer)
            existing = _wrapper_of_parameter(target, parameter_name)
            if existing is not None:
                updated.append(existing)
            elif isinstance(target, BaseTunerLayer) and type(target).__name__ != "ParamWrapper":
                raise ValueError(
                    f"Trying to wrap an `nn.Parameter` of layer '{outer}' of type {type(target).__name__}, which "
                    "is not a valid target. Make sure that this layer is not also targeted with `target_modules`."
                )
            self._create_and_replace(peft_config, adapter_name, existing or target, target_name, parent,
                                     current_key=key, parameter_name=parameter_name)
            if getattr(parent, target_name) is not target:
                replaced.append((parent, target_name, target))

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Create adapter `adapter_name` in every targeted module. On any error the model is restored as it was."""
        peft_config = self.peft_config[adapter_name]
        self._check_new_adapter_config(peft_config)
        model_config = self.get_model_config(model)
        peft_config = self._prepare_adapter_config(peft_config, model_config)
        restore_model = self._prepare_model(peft_config, model)
        try:
            self._inject_into_prepared_model(model, adapter_name, peft_config, autocast_adapter_dtype,
                                             low_cpu_mem_usage, state_dict)
        except Exception:
            if restore_model is not None:  # (e.g. layers replicated for this adapter)
                restore_model()
            raise

    def _inject_into_prepared_model(self, model, adapter_name, peft_config, autocast_adapter_dtype, low_cpu_mem_usage,
                                    state_dict) -> None:
        peft_config = _maybe_include_all_linear_layers(peft_config, model)
        self.peft_config[adapter_name] = peft_config

        if state_dict is not None:
            # target exactly the modules that the state dict holds adapter weights for
            keys = [k.removeprefix("base_model.model.").split(f".{self.prefix}")[0] for k in state_dict]
            keys = [k for k in dict.fromkeys(keys) if k and _has_submodule(model, k)]
            target_keys = [k for k in keys if not any(isinstance(model.get_submodule(p), AuxiliaryTrainingWrapper)
                                                      for p in (k, *_proper_prefixes(k)))]
        else:
            target_keys = self._find_targets(peft_config, model)
        parameter_targets = self._find_parameter_targets(peft_config, model)
        if getattr(peft_config, "target_parameters", None) and state_dict is not None:
            raise ValueError("Trying to inject a PEFT adapter from a state_dict but the PEFT config uses "
                             "`target_parameters`. This is not supported -- when using `target_parameters`, please "
                             "inject the adapter without the state_dict.")
        if getattr(peft_config, "target_parameters", None) and not parameter_targets:
            if not target_keys:
                raise NoMatchingPeftModuleError(f"target_parameters={peft_config.target_parameters} matched no "
                                                "parameter of the model and target_modules no module.")
            warnings.warn(f"target_parameters={peft_config.target_parameters} were set but no parameter was matched.",
                          RuntimeWarning)
        if not target_keys and not parameter_targets:
            raise NoMatchingPeftModuleError(
                f"Target modules {peft_config.target_modules} not found in the base model. Please check the target "
                "modules and try again."
            )

        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        updated: list[BaseTunerLayer] = []
        requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]
        # low_cpu_mem_usage: the adapter's weights are made on the meta device (no memory, no init), to be loaded
        # in place (set_peft_model_state_dict(..., low_cpu_mem_usage=True) / load_adapter)
        empty = adapter_weights_on_meta() if low_cpu_mem_usage else contextlib.nullcontext()
        try:
            with empty:
                self._create_adapter_layers(peft_config, adapter_name, model, target_keys, parameter_targets,
                                            replaced, updated)
            self._mark_only_adapters_as_trainable(model)
            modules_to_save = getattr(peft_config, "modules_to_save", None)
            _set_trainable(model, adapter_name, modules_to_save, inference_mode=peft_config.inference_mode)
            modules_to_tie = getattr(peft_config, "modules_to_tie", None)
            if modules_to_tie:  # ensure_weight_tying: the tied layers' copies share the embedding copy's weight
                tied_module = model.get_input_embeddings().modules_to_save[adapter_name]
                _set_trainable(model, adapter_name, modules_to_tie, inference_mode=peft_config.inference_mode,
                               tied_module=tied_module)
            if getattr(peft_config, "trainable_token_indices", None) is not None:
                from .trainable_tokens.wrapping import wrap_trainable_tokens

                wrap_trainable_tokens(model, peft_config, adapter_name, self.get_model_config(model))
        except Exception:
            # leave the model exactly as it was: original modules back, the half-made adapter gone
            for parent, name, original in reversed(replaced):
                new = getattr(parent, name)
                if hasattr(new, "unload_and_optionally_merge_module"):  # gives back what it changed inside (MHA)
                    new.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
                setattr(parent, name, original)
            for layer in updated:
                if adapter_name in layer._all_available_adapter_names():
                    layer.delete_adapter(adapter_name)
            _unwrap_modules_to_save(model, adapter_name)
            for param, flag in requires_grad_before:
                param.requires_grad = flag
            raise

        self.targeted_module_names.extend(target_keys)
        self.targeted_parameter_names.extend(key for _, _, key in parameter_targets)
        self.set_adapter(self.active_adapters, inference_mode=peft_config.inference_mode)
        if peft_config.inference_mode:
            for n, p in model.named_parameters():
                if adapter_name in n.split("."):
                    p.requires_grad = False
        self._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Keep adapter weights of fp16/bf16 models in fp32 (PEFT's default `autocast_adapter_dtype=True`)."""
        if not autocast_adapter_dtype:
            return
        half = {torch.float16, torch.bfloat16}
        for module in self.model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for sub in module.modules():
                if not isinstance(sub, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in sub:
                    continue
                item = sub[adapter_name]
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for param in params:
                    if param.dtype in half:
                        param.data = param.data.to(torch.float32)

    # ------------------------------------------------------------------ merge / unmerge / unload
    def _check_merge_allowed(self) -> None:
        if getattr(self.model, "quantization_method", None) == "gptq":
            raise ValueError("Cannot merge layers when the model is gptq quantized")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the given (default: active) adapters into the base weights of every adapter layer."""
        self._check_merge_allowed()
        for module in self.model.modules():
            # (a layer owned by another one, e.g. a MultiheadAttention's out_proj, is merged by its owner)
            if isinstance(module, BaseTunerLayer) and not getattr(module, "_owned_by_parent", False):
                module.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer) and not getattr(module, "_owned_by_parent", False):
                module.unmerge()

    def _unloading_checks(self, adapter_names: Optional[list[str]]) -> None:
        adapters_to_consider = adapter_names or self.active_adapters
        is_modules_to_save_available = any(
            self.peft_config[adapter].modules_to_save for adapter in adapters_to_consider if adapter in self.peft_config
        )
        if is_modules_to_save_available and len(adapters_to_consider) > 1:
            raise ValueError("Cannot unload multiple adapters that specify `modules_to_save`.")

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        if adapter_names is not None:
            unknown = [a for a in adapter_names if a not in self.peft_config]
            if unknown:
                raise ValueError(f"Adapter(s) {unknown} not found; available: {list(self.peft_config)}")
        key_list = [key for key, _ in self.model.named_modules() if self.prefix not in key]
        desc = "Unloading " + ("and merging " if merge else "") + "model"
        iterator = key_list
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(key_list, desc=desc)
        for key in iterator:
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue
            # wrappers that unload themselves: modules_to_save / trainable tokens, nested parameter wrappers, MHA
            if hasattr(target, "unload_and_optionally_merge_module"):
                self._replace_module(
                    parent, target_name, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names), target
                )
            elif isinstance(target, BaseTunerLayer):
                if merge:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                self._replace_module(parent, target_name, target.get_base_layer(), target)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model (adapter layers removed)."""
        return self._unload_and_optionally_merge(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the plain base model."""
        return self._unload_and_optionally_merge(merge=False)

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate `adapter_name` (a name or a list of names) in every adapter layer; unmerges first if merged."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; available: {list(self.peft_config)}")
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                if module.merged:
                    warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                    module.unmerge()
                module.set_adapter(names, inference_mode=inference_mode)
        _set_adapter(self.model, names, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Gradients on (or off) for the weights of `adapter_names` throughout the model (module-level
        set_requires_grad), e.g. to train two adapters at once, or to freeze one while it stays active."""
        set_requires_grad(self.model, adapter_names=adapter_names, requires_grad=requires_grad)

    def _set_adapter_layers(self, enabled: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(enabled=True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(enabled=False)

    def _remove_adapter_layers(self, adapter_name: str) -> None:
        """Undo the injection of `adapter_name`: layers and wrappers left with no adapter give back their base module."""
        for key in reversed([k for k, _ in self.model.named_modules()]):  # inner wrappers first
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, BaseTunerLayer) and not isinstance(parent, AuxiliaryTrainingWrapper):
                target.delete_adapter(adapter_name)
                if not target._all_available_adapter_names():
                    setattr(parent, target_name, target.base_layer)  # (one level: nested wrappers may keep theirs)
            elif isinstance(target, AuxiliaryTrainingWrapper):
                target.delete_adapter(adapter_name, [a for a in target.active_adapters if a != adapter_name])
                if not target._get_available_adapters():
                    setattr(parent, target_name, target.get_base_layer())
        self.peft_config.pop(adapter_name, None)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name` from the model and its config; another adapter becomes active if needed."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        new_adapter = None
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(adapter_name)
                # (the tuner's own layers say which adapter is active now, not a trainable-tokens layer)
                if new_adapter is None and isinstance(module, self.tuner_layer_cls):
                    new_adapter = module.active_adapters[:]
        remaining = new_adapter or [a for a in self.active_adapters if a != adapter_name]
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter_name, remaining)
        self.active_adapter = remaining if len(remaining) != 1 else remaining[0]
        if not remaining:
            self.active_adapter = []


@contextlib.contextmanager
def adapter_weights_on_meta():
    """Parameters registered inside the block are created on the meta device (PEFT's init_empty_weights for
    low_cpu_mem_usage): the base model's own parameters, registered before, are not touched."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _strip_base_layer(name: str) -> str:
    """A module's name in the bare model: every '.base_layer' an adapter layer inserted removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _is_base_model_module(model: nn.Module, name: str) -> bool:
    """Whether module `name` belongs to the base model (below an adapter layer only its base_layer does; nothing
    inside a modules_to_save / trainable-tokens wrapper counts)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        holder = model.get_submodule(".".join(parts[:i]))
        if isinstance(holder, AuxiliaryTrainingWrapper) or (isinstance(holder, BaseTunerLayer) and parts[i] != "base_layer"):
            return False
    return True


def _wrapper_of_parameter(module: nn.Module, parameter_name: str) -> Optional["BaseTunerLayer"]:
    """The ParamWrapper for `parameter_name` in the chain of wrappers `module` starts, if there is one."""
    while isinstance(module, BaseTunerLayer) and type(module).__name__ == "ParamWrapper":
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def _proper_prefixes(key: str):
    parts = key.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def _has_submodule(model: nn.Module, key: str) -> bool:
    try:
        model.get_submodule(key)
        return True
    except AttributeError:
        return False


def _maybe_include_all_linear_layers(peft_config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Expand target_modules='all-linear' into every Linear/Conv1D module except the output (and seq-cls) head."""
    target = getattr(peft_config, "target_modules", None)
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return peft_config
    linear_classes: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_classes = (nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        pass
    # on a model that already has adapters, a tuner layer around a linear counts as that linear (its insides do not)
    names = {name for name, module in model.named_modules()
             if isinstance(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module, linear_classes)}
    exclude = set()
    get_out = getattr(model, "get_output_embeddings", None)
    output_emb = get_out() if callable(get_out) and _is_transformers_model(model) else None
    if output_emb is not None:
        exclude.update(name for name, module in model.named_modules() if module is output_emb)
    elif _is_transformers_model(model) and peft_config.task_type == TaskType.SEQ_CLS:
        for head in SEQ_CLS_HEAD_NAMES:
            cls_head = getattr(model, head, None)
            if cls_head is not None:
                exclude.update(name for name, module in model.named_modules() if module is cls_head)
                break
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            exclude.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    peft_config.target_modules = names - exclude
    return peft_config


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def clone_module(module: nn.Module, share_weights: bool = False) -> nn.Module:
    """A deep copy of `module`; with `share_weights`, its parameters are the very Parameter objects of `module`
    (never copied, not even for a moment), its buffers copies."""
    memo = {id(param): param for param in module.parameters()} if share_weights else None
    return copy.deepcopy(module, memo)


def _layer_stack(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(inner model, owner, attribute) of the transformer's ModuleList of layers, found where PEFT looks:
    model[.model]*.layers (Llama-like), [.bert].encoder.layer (BERT), .h (Falcon)."""
    while hasattr(model, "model"):
        model = model.model
    if hasattr(model, "bert"):  # some BERT variants nest the main model there
        model = model.bert
    if hasattr(model, "layers"):
        owner, attribute = model, "layers"
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        owner, attribute = model.encoder, "layer"
    elif hasattr(model, "h"):
        owner, attribute = model, "h"
    else:
        owner, attribute = None, ""
    if owner is None or not isinstance(getattr(owner, attribute), nn.ModuleList):
        raise ValueError("Could not locate the layers attribute in the model. Expected Llama, Bert or Falcon "
                         "compatible architectures.")
    return model, owner, attribute


def _replicate_layers(model: nn.Module, layer_map) -> Callable[[], None]:
    """replicate_layers, returning a function that puts the original stack (and config) back."""
    inner, owner, attribute = _layer_stack(model)
    layers = getattr(owner, attribute)
    count = len(layers)
    order = []
    for pair in layer_map:
        start, end = pair if isinstance(pair, (list, tuple)) and len(pair) == 2 else (None, None)
        if type(start) is not int or type(end) is not int or not 0 <= start < end <= count:
            raise ValueError(f"layer_replication needs [start, end) pairs with 0 <= start < end <= {count} (the "
                             f"model's layers), got {pair!r} in {layer_map!r}")
        order.extend(range(start, end))
    new_layers = []
    for index in order:
        layer = clone_module(layers[index], share_weights=True)
        for submodule in layer.modules():  # transformers' attention layers index the KV cache by it
            if hasattr(submodule, "layer_idx"):
                submodule.layer_idx = len(new_layers)
        new_layers.append(layer)
    config = getattr(inner, "config", None)
    saved = {name: getattr(config, name) for name in ("num_hidden_layers", "layer_types") if hasattr(config, name)}
    setattr(owner, attribute, nn.ModuleList(new_layers))
    if "num_hidden_layers" in saved:
        config.num_hidden_layers = len(new_layers)
    if isinstance(saved.get("layer_types"), list) and len(saved["layer_types"]) == count:
        # (models such as Qwen2 pick each layer's attention mask from it: the stack's order, replicated)
        config.layer_types = [saved["layer_types"][i] for i in order]

    def restore() -> None:
        setattr(owner, attribute, layers)
        for name, value in saved.items():
            setattr(config, name, value)

    return restore


def replicate_layers(model: nn.Module, layer_map: list[tuple[int, int]]) -> None:
    """Rebuild a transformer's layer stack from [start, end) ranges of its layers, the copies sharing their weights.

    The stack is found at model[.model]*.layers, [.bert].encoder.layer or .h; `[[0, 4], [2, 5]]` turns layers
    `[0, 1, 2, 3, 4]` into `[0, 1, 2, 3, 2, 3, 4]`. Every new layer is a clone whose parameters are the original's
    (buffers copied), its `layer_idx` attributes renumbered; `config.num_hidden_layers` (and `config.layer_types`,
    where the model has one per layer) follow. A range outside the stack raises with the model unchanged."""
    _replicate_layers(model, layer_map)
