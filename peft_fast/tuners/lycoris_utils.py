"""Shared base of the LyCORIS-style adapters (LoHa, LoKr): config, layer and tuner (PEFT's `peft.tuners.lycoris_utils`).

A LyCORIS layer builds a full-size weight delta ΔW from its factors (the ops layer computes it) and adds
x ↦ op(x, ΔW) to the base layer's output, where op is the base layer's own linear / conv1d / conv2d. Merging adds
ΔW to the base weight. Training-time regularisers as in PEFT: rank dropout (rows of ΔW dropped, optionally
rescaled) and module dropout (the whole adapter skipped for a step).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig
from ..utils.other import get_pattern_key
from .tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge


@dataclass
class LycorisConfig(PeftConfig):
    """Base config of LyCORIS-like adapters: per-layer rank / alpha overrides by name or regex."""

    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Layer name/regex → rank."})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Layer name/regex → alpha."})


def _in_out_features(base: nn.Module) -> tuple[Optional[int], Optional[int]]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return base.in_channels, base.out_channels
    return None, None


class LycorisLayer(BaseTunerLayer):
    """State and arithmetic common to LoHa and LoKr layers (Linear, Conv1d, Conv2d)."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.in_features, self.out_features = _in_out_features(self.get_base_layer())

    @property
    def _available_adapters(self) -> set[str]:
        return self._get_available_adapters()

    @abstractmethod
    def create_adapter_parameters(self, adapter_name: str, r: int, **kwargs) -> None: ...

    @abstractmethod
    def reset_adapter_parameters(self, adapter_name: str) -> None: ...

    @abstractmethod
    def _factor_delta(self, adapter_name: str) -> torch.Tensor:
        """ΔW (before reshaping to the base weight's shape) from the adapter's factors, via the ops layer."""

    def _set_hyperparameters(self, adapter_name: str, r: int, alpha: float, config) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = getattr(config, "rank_dropout_scale", True)
        self.module_dropout[adapter_name] = config.module_dropout

    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        weight = self._factor_delta(adapter_name).reshape(self.get_base_layer().weight.shape)
        if apply_rank_dropout:  # whole output rows of ΔW dropped; the RNG draws are PEFT's
            drop = (torch.rand(weight.size(0)) > self.rank_dropout[adapter_name]).to(weight.dtype)
            drop = drop.view(-1, *[1] * len(weight.shape[1:])).to(weight.device)
            if self.rank_dropout_scale[adapter_name]:
                drop /= drop.mean()
            weight = weight * drop
        return weight

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return x.to(dtype)

    def _get_delta_activations(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        apply_rank_dropout = self.training and bool(self.rank_dropout[adapter_name])
        delta = self.get_delta_weight(adapter_name, apply_rank_dropout=apply_rank_dropout)
        x = self._cast_input_dtype(x, delta.dtype)
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return F.linear(x, delta)
        conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
        return conv(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
            for adapter in self.active_adapters:
                if adapter not in self._available_adapters:
                    continue
                # module dropout: in training the adapter is skipped with probability module_dropout
                if not self.training or torch.rand(1) > self.module_dropout[adapter]:
                    result = result + self._get_delta_activations(adapter, x)
        return result.to(previous_dtype)

    # ------------------------------------------------------------------ merging and scaling
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self._available_adapters:
                continue
            base = self.get_base_layer()
            if safe_merge:
                merged = base.weight.data.clone() + self.get_delta_weight(adapter)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base.weight.data = merged
            else:
                base.weight.data += self.get_delta_weight(adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self._available_adapters:
                self.get_base_layer().weight.data -= self.get_delta_weight(adapter)

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self._available_adapters:
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self._available_adapters:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for adapter in self.active_adapters:
            if adapter not in self._available_adapters:
                continue
            if scale is None:
                self.scaling[adapter] = self.alpha[adapter] / self.r[adapter]
            else:
                self.scaling[adapter] /= scale


def lycoris_shape(base: nn.Module, use_effective_conv2d: bool) -> tuple[tuple[int, ...], bool]:
    """The factor shape of a layer's ΔW and whether the Tucker (effective conv) form applies: Linear (out, in);
    convs (out, in·k…) flattened, or (out, in, k…) when effective."""
    if isinstance(base, nn.Linear):
        return tuple(base.weight.shape), False
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        kernel = tuple(base.kernel_size)
        effective = use_effective_conv2d and any(k != 1 for k in kernel)
        in_channels = base.in_channels // base.groups
        if effective:
            return (base.out_channels, in_channels, *kernel), True
        flat = in_channels
        for k in kernel:
            flat *= k
        return (base.out_channels, flat), False
    raise TypeError(f"type {type(base).__name__} is not supported (Linear, Conv1d and Conv2d are)")


class LycorisTuner(BaseTuner):
    """Injects a LyCORIS layer class into the targeted Linear / Conv1d / Conv2d modules."""

    layers_mapping: dict[type[nn.Module], type[LycorisLayer]] = {}

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        config_cls = type(self).config_cls
        if not isinstance(config, config_cls):
            raise TypeError(f"{type(self).__name__} needs a {config_cls.__name__}, got {type(config).__name__}.")

    @classmethod
    def _prepare_adapter_config(cls, peft_config, model_config: dict):
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in cls.target_module_mapping:
                raise ValueError("Please specify `target_modules` in `peft_config`")
            peft_config.target_modules = set(cls.target_module_mapping[model_type])
        return peft_config

    def _create_and_replace(self, config, adapter_name: str, target, target_name: str, parent, current_key: str,
                            **optional_kwargs) -> None:
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        r = config.rank_pattern.get(r_key, config.r)
        alpha = config.alpha_pattern.get(alpha_key, config.alpha)
        # the tuner class of the config's method (self may be a MixedModel holding several methods)
        from ..peft_model import PEFT_TYPE_TO_TUNER_MAPPING

        tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
        if isinstance(target, tuner.tuner_layer_cls):
            target.update_layer(adapter_name, r=r, alpha=alpha, config=config)
            return
        new_module = tuner._create_new_module(config, adapter_name, target, r=r, alpha=alpha)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _create_new_module(cls, config, adapter_name: str, target: nn.Module, **kwargs) -> LycorisLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        for subtype, layer_cls in cls.layers_mapping.items():
            if isinstance(base, subtype):
                return layer_cls(target, adapter_name=adapter_name, config=config, **kwargs)
        supported = ", ".join(t.__name__ for t in cls.layers_mapping)
        raise TypeError(
            f"Target module of type {type(target)} not supported, currently only adapters for {supported} are supported"
        )

    def set_scale(self, adapter: str, scale: float) -> None:
        for module in self.model.modules():
            if isinstance(module, LycorisLayer):
                module.set_scale(adapter, scale)


__all__ = ["LycorisConfig", "LycorisLayer", "LycorisTuner", "lycoris_shape"]
