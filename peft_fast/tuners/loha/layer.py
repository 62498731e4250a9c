"""LoHa layers for Linear, Conv1d and Conv2d (PEFT's `peft.tuners.loha.layer`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ..lycoris_utils import LycorisLayer, lycoris_shape


class LoHaLayer(nn.Module, LycorisLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    forward = LycorisLayer.forward

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        LycorisLayer.__init__(self, base_layer)
        self.hada_w1_a = nn.ParameterDict({})
        self.hada_w1_b = nn.ParameterDict({})
        self.hada_w2_a = nn.ParameterDict({})
        self.hada_w2_b = nn.ParameterDict({})
        self.hada_t1 = nn.ParameterDict({})
        self.hada_t2 = nn.ParameterDict({})

    def create_adapter_parameters(self, adapter_name: str, r: int, shape: tuple[int, ...]) -> None:
        if len(shape) >= 3:  # effective conv: Tucker cores (r, r, k1, k2) and the two mode factors
            kernel = tuple(shape[2:]) if len(shape) == 4 else (shape[2], 1)
            for t in ("hada_t1", "hada_t2"):
                getattr(self, t)[adapter_name] = nn.Parameter(torch.empty(r, r, *kernel))
            for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
                getattr(self, a)[adapter_name] = nn.Parameter(torch.empty(r, shape[0]))
                getattr(self, b)[adapter_name] = nn.Parameter(torch.empty(r, shape[1]))
        else:
            for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
                getattr(self, a)[adapter_name] = nn.Parameter(torch.empty(shape[0], r))
                getattr(self, b)[adapter_name] = nn.Parameter(torch.empty(r, shape[1]))

    def reset_adapter_parameters(self, adapter_name: str, random: bool = False) -> None:
        """Kaiming-uniform factors; W2b zero (so ΔW = 0) unless `random`. The order of draws is PEFT's."""
        if adapter_name in self.hada_w1_a:
            nn.init.kaiming_uniform_(self.hada_w1_a[adapter_name], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.hada_w1_b[adapter_name], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.hada_w2_a[adapter_name], a=math.sqrt(5))
            if random:
                nn.init.kaiming_uniform_(self.hada_w2_b[adapter_name], a=math.sqrt(5))
            else:
                nn.init.zeros_(self.hada_w2_b[adapter_name])
        if adapter_name in self.hada_t1:
            nn.init.kaiming_uniform_(self.hada_t1[adapter_name], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.hada_t2[adapter_name], a=math.sqrt(5))

    def update_layer(self, adapter_name: str, r: int, alpha: float, config, **kwargs) -> None:
        self._set_hyperparameters(adapter_name, r, alpha, config)
        shape, _ = lycoris_shape(self.get_base_layer(), config.use_effective_conv2d)
        self.create_adapter_parameters(adapter_name, r, shape)
        self.reset_adapter_parameters(adapter_name, random=not config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _factor_delta(self, adapter_name: str) -> torch.Tensor:
        t1 = self.hada_t1[adapter_name] if adapter_name in self.hada_t1 else None
        t2 = self.hada_t2[adapter_name] if adapter_name in self.hada_t2 else None
        return ops.loha_delta_weight(
            self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name], self.hada_w2_a[adapter_name],
            self.hada_w2_b[adapter_name], self.scaling[adapter_name], t1, t2,
        )


class _LoHaModule(LoHaLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, alpha: float = 0.0, **kwargs):
        super().__init__(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, config=config, **kwargs)

    def __repr__(self) -> str:
        return "loha." + super().__repr__()


class Linear(_LoHaModule):
    """LoHa around nn.Linear."""

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class Conv1d(_LoHaModule):
    """LoHa around nn.Conv1d."""


class Conv2d(_LoHaModule):
    """LoHa around nn.Conv2d."""
