"""LoRA around bitsandbytes 4-bit / 8-bit linear layers (QLoRA; PEFT's `peft.tuners.lora.bnb`).

The base layer stays quantized and frozen; adapters are ordinary LoRA weights (fp32 by default). Forward follows
PEFT's order for these layers (each adapter's output is cast to the base output's dtype before it is added, unless
autocast is on). Merging dequantizes the weight, adds ΔW and quantizes again (with PEFT's rounding warning);
4-bit weights are dequantized by peft_fast's own bitsandbytes-compatible code.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ... import ops
from ...ops import cuda_qlora
from ..tuners_utils import check_adapters_to_merge
from .config import LoraConfig
from .layer import Linear, LoraLayer


def _bnb():
    import bitsandbytes as bnb

    return bnb


def is_bnb_available() -> bool:
    try:
        _bnb()
        return True
    except Exception:  # bitsandbytes missing or unusable on this machine
        return False


class _BnbLinear(Linear):
    """Shared forward / merge of the quantized LoRA linears; subclasses dequantize and requantize."""

    _bits = 0
    forward = LoraLayer.forward  # (not Linear's flat path: that one is for nn.Linear / Conv1D bases)

    def _check_base_layer(self, base_layer: nn.Module, r: int, config: LoraConfig) -> None:
        if config.use_dora:
            raise ValueError(f"DoRA on bitsandbytes {self._bits}-bit layers is not supported by peft_fast.")

    def _dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            warnings.warn(f"Merge lora module to {self._bits}-bit linear may get different generations due to rounding "
                          "errors.")
            delta = self.get_delta_weight(adapter)
            merged = self._dequantized_weight().to(delta.device) + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self._set_weight(merged)
            self._shift_bias(adapter, +1)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            warnings.warn(f"Unmerge lora module to {self._bits}-bit linear may get different generations due to "
                          "rounding errors.")
            delta = self.get_delta_weight(adapter)
            self._set_weight(self._dequantized_weight().to(delta.dtype).to(delta.device) - delta)
            self._shift_bias(adapter, -1)

    def _shift_bias(self, adapter: str, sign: int) -> None:
        # the forward adds s·bias_B, so merging moves s·bias_B into the base bias (PEFT's bnb layers omit the s)
        if self.lora_bias.get(adapter):
            base = self.get_base_layer()
            if base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            base.bias.data += sign * (self.lora_B[adapter].bias * self.scaling[adapter]).to(base.bias.dtype)

    def _unmerged_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        terms = [self._adapter_term(a) for a in self.active_adapters if a in self.lora_A]
        if args or kwargs:  # extra base-layer arguments: the torch path passes them on
            return ops.torch_ref.quantized_linear_with_lora(x, self.base_layer, terms, *args, **kwargs)
        return ops.quantized_linear_with_lora(x, self.base_layer, terms)


class Linear4bit(_BnbLinear):
    """LoRA around `bitsandbytes.nn.Linear4bit` (NF4 / FP4, optionally double-quantized)."""

    _bits = 4

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:  # the common training case on CUDA: one C++ node for the whole layer
            out = cuda_qlora.eager_qlora_call(self, x)
            if out is not None:
                return out
        return LoraLayer.forward(self, x, *args, **kwargs)

    def _dequantized_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its AVX512 CPU kernels on the first inference forward; back to
            # the standard layout first, as bitsandbytes itself does before saving
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        return ops.dequantize_4bit(weight.data, weight.quant_state)

    def _set_weight(self, weight: torch.Tensor) -> None:
        bnb = _bnb()
        old = self.get_base_layer().weight
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        kwargs.pop("module", None)
        new = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
        self.get_base_layer().weight = new
        new.module = self.get_base_layer()


class Linear8bitLt(_BnbLinear):
    """LoRA around `bitsandbytes.nn.Linear8bitLt` (LLM.int8())."""

    _bits = 8

    def _dequantized_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        weight, state = base.weight, base.state
        if state.SCB is None:
            state.SCB = weight.SCB
        # int8 row-wise: value · row scale / 127
        return weight.data.float() * state.SCB.to(weight.device).view(-1, 1).float() * (1.0 / 127)

    def _set_weight(self, weight: torch.Tensor) -> None:
        bnb = _bnb()
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                        has_fp16_weights=old.has_fp16_weights).to(old.device)
        base.state.reset_grads()


def dispatch_bnb(target: nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs) -> Optional[nn.Module]:
    """The quantized LoRA layer for a bitsandbytes Linear4bit / Linear8bitLt target, else None."""
    if not is_bnb_available():
        return None
    bnb = _bnb()
    from ..tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, bnb.nn.Linear4bit):
        return Linear4bit(target, adapter_name, lora_config, **kwargs)
    if isinstance(base, bnb.nn.Linear8bitLt):
        return Linear8bitLt(target, adapter_name, lora_config, **kwargs)
    return None
