"""LoRA on a bare nn.Parameter (LoraConfig.target_parameters), e.g. the stacked expert weights of a mixture-of-experts
layer, which no nn.Linear holds (PEFT's `lora.ParamWrapper`: same layout of lora_A / lora_B, so files move both ways).

A parameter of shape (d1, d2), or (experts, d1, d2), gets per expert e a rank-r update ΔW_e = s · L_e R_e of shape
(d1, d2), with lora_A (r·experts × a) and lora_B (b × r·experts) laid out as PEFT lays them out. The base module's
forward runs with the parameter replaced by W + ΔW (torch.func.functional_call: nothing of the module is modified,
autograd reaches lora_A / lora_B through the sum), the sum folded into one batched GEMM (baddbmm) per adapter so that
no second tensor of the parameter's size is made besides W + ΔW. Several parameters of one module nest one wrapper
each, the first registered parameter innermost (as PEFT nests them).

What cannot be factored out of such a forward is refused when the adapter is made: dropout (it would act on x,
which never meets the low-rank factors here), fan_in_fan_out, lora_bias, DoRA, and inits that read a base `weight`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..tuners_utils import check_adapters_to_merge
from .config import LoraConfig
from .layer import _LoraModule


class ParamWrapper(_LoraModule):
    """LoRA on parameter `parameter_name` of `base_layer` (the module that holds it, or a ParamWrapper of it)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        self.parameter_name = parameter_name
        super().__init__(base_layer, adapter_name, config, r, lora_alpha, **kwargs)

    def _get_in_out_features(self, base: nn.Module) -> tuple[int, int]:
        """(a, b): lora_A reads a features and lora_B writes b, per expert; also settles the expert count."""
        param = getattr(base, self.parameter_name)
        shape = tuple(getattr(param, "ds_shape", param.shape))
        self._param_ndim = len(shape)
        if len(shape) == 2:
            self.num_experts, self._transposed = 1, False
            return shape[1], shape[0]
        if len(shape) == 3:
            # (experts, d1, d2); some MoE layers mark theirs transposed, which swaps the factors' roles
            self.num_experts, self._transposed = shape[0], bool(getattr(base, "is_transposed", False))
            return (shape[1], shape[2]) if self._transposed else (shape[2], shape[1])
        raise ValueError(f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter "
                         f"'{self.parameter_name}', but only 2d and 3d are supported.")

    def _check_base_layer(self, base_layer: nn.Module, r: int, config: LoraConfig) -> None:
        self._check_config(config)

    @staticmethod
    def _check_config(config: LoraConfig) -> None:
        name = "lora.ParamWrapper (target_parameters)"
        for refused, what in ((config.lora_dropout, "lora_dropout != 0"), (config.fan_in_fan_out, "fan_in_fan_out"),
                              (config.lora_bias, "lora_bias=True"), (config.use_dora, "use_dora=True")):
            if refused:
                raise ValueError(f"{name} does not work with {what}.")
        init = config.init_lora_weights
        if isinstance(init, str) and init.lower() != "gaussian":
            raise ValueError(f"{name} does not work with init_lora_weights={init!r} (it reads a base `weight`).")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        self._check_config(config)
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def get_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    def _base_weight(self) -> torch.Tensor:
        return self.get_param()

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        if device is not None:  # an explicit device: moved there, dtype kept (the general rule)
            return super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        param = self.get_param()
        if param.device.type == "meta":
            return
        dtype = param.dtype if param.dtype.is_floating_point else None
        for attr in ("lora_A", "lora_B"):
            holder = getattr(self, attr)
            if adapter_name in holder and not any(p.device.type == "meta" for p in holder[adapter_name].parameters()):
                holder[adapter_name] = holder[adapter_name].to(param.device, dtype=dtype)

    # ---------------------------------------------------------------- the update
    def _factors(self, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs), each with a leading expert dimension, such that ΔW_e / s = lhs_e @ rhs_e, in `dtype`."""
        experts = self.num_experts
        a = self.lora_A[adapter].weight.to(dtype)
        b = self.lora_B[adapter].weight.to(dtype)
        a = a.reshape(experts, -1, a.shape[-1])  # (experts, r, a): rows of lora_A grouped by expert
        b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (experts, b, r): columns interleaved by expert
        if self._transposed:
            return a.transpose(-2, -1), b.transpose(-2, -1)
        return b, a

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        param = self.get_param()
        compute = torch.float32 if param.device.type == "cpu" and param.dtype in (torch.float16, torch.bfloat16) \
            else param.dtype
        lhs, rhs = self._factors(adapter, compute)
        delta = torch.bmm(lhs, rhs) * self.scaling[adapter]
        return (delta if self._param_ndim == 3 else delta[0]).to(param.dtype)

    def _updated_param(self, adapters: list[str]) -> torch.Tensor:
        """W + Σ ΔW of `adapters`, in W's dtype (autocast off: the module sees its parameter's own dtype)."""
        param = self.get_param()
        with torch.autocast(device_type=param.device.type, enabled=False):
            out = param if self._param_ndim == 3 else param.unsqueeze(0)
            for adapter in adapters:
                lhs, rhs = self._factors(adapter, param.dtype)
                out = torch.baddbmm(out, lhs, rhs, alpha=self.scaling[adapter])
        return out if self._param_ndim == 3 else out[0]

    # ---------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        param = self.get_param()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = param.data + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            param.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            super().unmerge()  # (warns)
            return
        param = self.get_param()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                param.data -= self.get_delta_weight(adapter)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """The module holding the parameters, with every nested wrapper's adapters merged into them when `merge`."""
        layer = self
        while isinstance(layer, ParamWrapper):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            layer = layer.base_layer
        return layer

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("lora.ParamWrapper (target_parameters) does not support mixed adapter batches.")
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        # the parameter's path below self.base_layer (through the wrappers of the module's other parameters)
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, ParamWrapper):
            path, module = f"base_layer.{path}", module.base_layer
        return torch.func.functional_call(self.base_layer, {path: self._updated_param(adapters)}, (x, *args), kwargs)

    def __repr__(self) -> str:
        rep = super().__repr__()
        at = rep.find("(") + 1
        return f"{rep[:at]}\n  parameter_name='{self.parameter_name}',{rep[at:]}"
