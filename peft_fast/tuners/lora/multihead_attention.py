"""LoRA on torch's nn.MultiheadAttention (PEFT's `lora.MultiheadAttention`: the same layers, keys and files).

nn.MultiheadAttention has no sub-layer for its input projection (a bare `in_proj_weight`, q/k/v stacked) and never
calls its `out_proj`'s forward (it reads out_proj.weight), so LoRA cannot hook a forward there. The layer holds the
input projection's adapter itself (lora_A: embed_dim → r, lora_B: r → 3·embed_dim) and wraps `out_proj` in a LoRA
Linear (as PEFT does; that layer's forward is never used either). Its forward runs the attention module with both
weights replaced by W + ΔW through torch.func.functional_call: nothing of the module is modified (PEFT merges and
unmerges the weights around every call), and autograd reaches the adapters through the sums.

Code outside that reads the weights itself (nn.TransformerEncoderLayer's inference fast path reads
`self_attn.in_proj_weight` and `self_attn.out_proj.weight`) gets the effective W + ΔW from this layer's attributes,
so the adapter is not skipped there. As in PEFT: q, k and v must share the embedding width; no DoRA; no
mixed-adapter batches.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from ..tuners_utils import check_adapters_to_merge
from .config import LoraConfig
from .layer import Linear, _LoraModule


class MultiheadAttention(_LoraModule):
    """LoRA around nn.MultiheadAttention: its input projection here, its out_proj in a LoRA Linear."""

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError("Only same embed for query/key/value is supported as of now for MultiheadAttention.")
        if config.use_dora:
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")
        # out_proj's adapter is made first (as PEFT makes it: the same random draws under the same seed)
        original_out_proj = base_layer.out_proj
        base_layer.out_proj = Linear(original_out_proj, adapter_name, config, r=r, lora_alpha=lora_alpha)
        base_layer.out_proj._owned_by_parent = True  # merged / unmerged with this layer, not on its own
        try:
            super().__init__(base_layer, adapter_name, config, r, lora_alpha, **kwargs)
        except Exception:
            base_layer.out_proj = original_out_proj  # the attention module as it was
            raise

    @staticmethod
    def _get_in_out_features(base: nn.Module) -> tuple[int, int]:
        return base.embed_dim, 3 * base.embed_dim

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    get_delta_weight = Linear.get_delta_weight  # s · B A of the stacked q/k/v projection (fan_in_fan_out is False)

    def _base_weight(self) -> torch.Tensor:
        """The stacked q/k/v projection: the adapter follows its device and dtype (the module has no `weight`)."""
        return self.get_base_layer().in_proj_weight

    @property
    def _attention(self) -> nn.MultiheadAttention:
        return self.get_base_layer()

    @property
    def _out_proj_layer(self) -> Linear:
        return self._attention.out_proj

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        out_proj = self._out_proj_layer
        if isinstance(out_proj, Linear):
            out_proj.update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        else:  # its adapters were all deleted before: wrap it again
            self._attention.out_proj = Linear(out_proj, adapter_name, config, r=r, lora_alpha=lora_alpha)
            self._attention.out_proj._owned_by_parent = True

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if isinstance(self._out_proj_layer, Linear):
            self._out_proj_layer.set_adapter(adapter_names, inference_mode=inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if isinstance(self._out_proj_layer, Linear):
            self._out_proj_layer.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        out_proj = self._out_proj_layer
        if isinstance(out_proj, Linear):
            out_proj.delete_adapter(adapter_name)
            if not out_proj._all_available_adapter_names():  # the attention module gets its own out_proj back
                self._attention.out_proj = out_proj.get_base_layer()

    # ---------------------------------------------------------------- the effective weights
    def _active(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        return [a for a in self.active_adapters if a in self.lora_A]

    def _effective_weights(self, adapters: list[str]) -> dict[str, torch.Tensor]:
        attention, out_proj = self._attention, self._out_proj_layer
        in_weight = attention.in_proj_weight
        out_weight = out_proj.get_base_layer().weight
        for adapter in adapters:
            in_weight = in_weight + self.get_delta_weight(adapter).to(in_weight.dtype)
            if adapter in out_proj.lora_A:
                out_weight = out_weight + out_proj.get_delta_weight(adapter).to(out_weight.dtype)
        return {"in_proj_weight": in_weight, "out_proj.base_layer.weight": out_weight}

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The input projection as the layer applies it (W + ΔW of the active adapters), for code that reads it."""
        adapters = self._active()
        return self._effective_weights(adapters)["in_proj_weight"] if adapters else self._attention.in_proj_weight

    @property
    def out_proj(self):
        """out_proj as the layer applies it: its base Linear, or, while adapters act, its effective weight and bias."""
        base = self._out_proj_layer.get_base_layer()
        adapters = self._active()
        if not adapters:
            return base
        return SimpleNamespace(weight=self._effective_weights(adapters)["out_proj.base_layer.weight"], bias=base.bias,
                               in_features=base.in_features, out_features=base.out_features)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or "base_layer" not in self.__dict__["_modules"]:
                raise
        return getattr(self._modules["base_layer"], name)  # embed_dim, num_heads, batch_first, in_proj_bias, …

    # ---------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        attention, out_proj = self._attention, self._out_proj_layer
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = attention.in_proj_weight.data + self.get_delta_weight(adapter).to(attention.in_proj_weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            if adapter not in out_proj.merged_adapters:
                out_proj.merge(safe_merge=safe_merge, adapter_names=[adapter])
            attention.in_proj_weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            super().unmerge()  # (warns)
            return
        weight = self._attention.in_proj_weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                weight.data -= self.get_delta_weight(adapter).to(weight.dtype)
        if self._out_proj_layer.merged:
            self._out_proj_layer.unmerge()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.MultiheadAttention:
        """The attention module with its own out_proj back (the adapters merged into both weights when `merge`)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        attention = self._attention
        if isinstance(attention.out_proj, Linear):
            attention.out_proj = attention.out_proj.get_base_layer()
        return attention

    # ---------------------------------------------------------------- forward
    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any):
        if "adapter_names" in kwargs:
            raise TypeError("lora.MultiheadAttention does not support mixed adapter batches.")
        dtype = query.dtype
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = self._active()
        if not adapters:
            result = self.base_layer(query, *args, **kwargs)
        else:
            result = torch.func.functional_call(self.base_layer, self._effective_weights(adapters), (query, *args),
                                                kwargs)
        return result[0].to(dtype), (result[1].to(dtype) if result[1] is not None else None)
