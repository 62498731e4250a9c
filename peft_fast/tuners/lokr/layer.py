"""LoKr layers for Linear, Conv1d and Conv2d (PEFT's `peft.tuners.lokr.layer`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ...ops.torch_ref import lokr_tucker
from ..lycoris_utils import LycorisLayer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m ≤ n: m = factor when it divides, else the divisor pair nearest the square
    root (bounded by factor). factorization(128) == (8, 16); factorization(127) == (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


class LoKrLayer(nn.Module, LycorisLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    forward = LycorisLayer.forward

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        LycorisLayer.__init__(self, base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))

    def create_adapter_parameters(self, adapter_name: str, r: int, shape, use_w1: bool, use_w2: bool,
                                  use_effective_conv2d: bool) -> None:
        (a, b), (c, d), kernel = shape[0], shape[1], tuple(shape[2:])
        if use_w1:
            self.lokr_w1[adapter_name] = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a[adapter_name] = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b[adapter_name] = nn.Parameter(torch.empty(r, c))
        if use_w2:
            self.lokr_w2[adapter_name] = nn.Parameter(torch.empty(b, d, *kernel))
        elif kernel and use_effective_conv2d:
            core_kernel = kernel if len(kernel) == 2 else (kernel[0], 1)
            self.lokr_t2[adapter_name] = nn.Parameter(torch.empty(r, r, *core_kernel))
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, d))
        else:
            flat = d
            for k in kernel:
                flat *= k
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, flat))

    def reset_adapter_parameters(self, adapter_name: str, mode=True) -> None:
        """mode True: ΔW = 0 through W1 (PEFT's default); False: all random; "lycoris": ΔW = 0 through W2."""
        kaiming = lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # noqa: E731
        if adapter_name in self.lokr_w1:
            (nn.init.zeros_ if mode is True else kaiming)(self.lokr_w1[adapter_name])
        else:
            (nn.init.zeros_ if mode is True else kaiming)(self.lokr_w1_a[adapter_name])
            kaiming(self.lokr_w1_b[adapter_name])
        if adapter_name in self.lokr_w2:
            (nn.init.zeros_ if mode == "lycoris" else kaiming)(self.lokr_w2[adapter_name])
        elif mode == "lycoris":
            nn.init.zeros_(self.lokr_w2_b[adapter_name])
            kaiming(self.lokr_w2_a[adapter_name])
        else:
            kaiming(self.lokr_w2_a[adapter_name])
            kaiming(self.lokr_w2_b[adapter_name])
        if adapter_name in self.lokr_t2:
            kaiming(self.lokr_t2[adapter_name])

    def update_layer(self, adapter_name: str, r: int, alpha: float, config, **kwargs) -> None:
        self._set_hyperparameters(adapter_name, r, alpha, config)
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            in_dim, out_dim, kernel = base.in_features, base.out_features, ()
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)):
            in_dim, out_dim, kernel = base.in_channels // base.groups, base.out_channels, tuple(base.kernel_size)
        else:
            raise TypeError(f"LoKr is not implemented for base layers of type {type(base).__name__}")
        in_m, in_n = factorization(in_dim, config.decompose_factor)
        out_l, out_k = factorization(out_dim, config.decompose_factor)
        shape = ((out_l, out_k), (in_m, in_n), *kernel)  # out = a·b, in = c·d
        use_w1 = not (config.decompose_both and r < max(shape[0][0], shape[1][0]) / 2)
        use_w2 = r >= max(shape[0][1], shape[1][1]) / 2
        effective = bool(kernel) and config.use_effective_conv2d and any(k != 1 for k in kernel)
        self.create_adapter_parameters(adapter_name, r, shape, use_w1, use_w2, effective)
        self.reset_adapter_parameters(adapter_name, mode=config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _factor_delta(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            w1 = self.lokr_w1[adapter_name]
        else:
            w1 = self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
        if adapter_name in self.lokr_w2:
            w2 = self.lokr_w2[adapter_name]
        elif adapter_name in self.lokr_t2:
            w2 = lokr_tucker(self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        else:
            w2 = self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
        return ops.lokr_delta_weight(w1, w2, self.scaling[adapter_name])


class _LoKrModule(LoKrLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, alpha: float = 0.0, **kwargs):
        super().__init__(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, config=config, **kwargs)

    def __repr__(self) -> str:
        return "lokr." + super().__repr__()


class Linear(_LoKrModule):
    """LoKr around nn.Linear."""

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class Conv1d(_LoKrModule):
    """LoKr around nn.Conv1d."""


class Conv2d(_LoKrModule):
    """LoKr around nn.Conv2d."""
