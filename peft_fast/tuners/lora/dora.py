"""DoRA (weight-decomposed LoRA): the magnitude vector of one adapter and its forward term (torch path).

For a base weight W (out × in) and LoRA delta s·BA, DoRA rescales each output row by m / ‖W + s·BA‖ (the norm is
detached, as in the paper and PEFT). The saved key is `lora_magnitude_vector` (in memory `…default.weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.other import transpose


class DoraLinearLayer(nn.Module):
    def __init__(self, fan_in_fan_out: bool):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out

    def get_weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
        weight = transpose(weight, self.fan_in_fan_out) + scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The base layer's weight as a float matrix (the quantized layers' DoRA dequantizes it)."""
        return base_layer.weight

    def get_lora_weight(self, lora_A: nn.Module, lora_B: nn.Module) -> torch.Tensor:
        # B·A as the layer computes it (through the modules), so it matches the forward exactly
        eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
        return lora_B(lora_A(eye)).T

    def update_layer(self, *, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     place_on_cpu: bool = False) -> None:
        is_fp16 = lora_A.dtype == torch.float16
        if is_fp16:
            lora_A, lora_B = lora_A.float(), lora_B.float()
        weight = self.base_weight(base_layer)
        if weight.ndim >= 3:  # conv
            r = lora_A.shape[0]
            lora_weight = (lora_B.view(-1, r) @ lora_A.view(r, -1)).reshape(weight.shape)
        else:
            lora_weight = lora_B @ lora_A
        if is_fp16:
            lora_weight = lora_weight.half()
        norm = self.get_weight_norm(weight.to(lora_A.device), lora_weight, scaling)
        if place_on_cpu:  # (computed on the GPU for an adapter kept in CPU memory: LoraRuntimeConfig)
            norm = norm.to("cpu")
        self.weight = nn.Parameter(norm, requires_grad=True)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None):
        """The DoRA term to add to the base output: (m/‖W'‖ − 1)·base + (m/‖W'‖)·s·B(A(x))."""
        lora_weight = self.get_lora_weight(lora_A, lora_B).to(x.dtype)
        weight = self.base_weight(base_layer).to(x.dtype)
        weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling).detach()
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias
        else:
            base_result = F.linear(x, transpose(weight, self.fan_in_fan_out))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


class DoraEmbeddingLayer(DoraLinearLayer):
    def get_lora_weight(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return (lora_A @ lora_B).T

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, embed_fn):
        """Returns (m/‖W'‖, its LoRA term); the caller rescales the base output by the first."""
        lora_weight = self.get_lora_weight(lora_A, lora_B)
        weight_norm = self.get_weight_norm(base_layer.weight, lora_weight.detach(), scaling).detach()
        mag_norm_scale = self.weight / weight_norm
        return mag_norm_scale, mag_norm_scale * (embed_fn(x, lora_A) @ lora_B) * scaling


class DoraConvLayer(DoraLinearLayer):
    def __init__(self, conv_fn):
        super().__init__(fan_in_fan_out=False)
        self.conv_fn = conv_fn

    def get_weight_norm(self, weight, lora_weight, scaling):
        weight = weight + scaling * lora_weight
        dims = tuple(range(1, weight.dim()))
        return weight.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)

    def get_lora_weight(self, lora_A, lora_B):
        r = lora_A.weight.shape[0]
        return lora_B.weight.view(-1, r) @ lora_A.weight.view(r, -1)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None):
        weight = base_layer.weight
        lora_weight = self.get_lora_weight(lora_A, lora_B).reshape(weight.shape)
        weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling).detach()
        mag_norm_scale = self.weight / weight_norm
        if base_result is None:
            base_result = self.conv_fn(
                x, weight, bias=None, stride=base_layer.stride, padding=base_layer.padding,
                dilation=base_layer.dilation, groups=base_layer.groups,
            )
        elif base_layer.bias is not None:
            base_result = base_result - base_layer.bias.view(1, -1, *([1] * (base_result.dim() - 2)))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_B(lora_A(x)) * scaling
