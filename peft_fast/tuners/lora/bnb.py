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
from .config import LoraConfig
from .dora import DoraLinearLayer
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


def dequantize_4bit_layer(base: nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear4bit's weight, dequantized (in its quant_state's dtype) by peft_fast's own code."""
    weight = base.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its AVX512 CPU kernels on the first inference forward; back to
        # the standard layout first, as bitsandbytes itself does before saving
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return ops.dequantize_4bit(weight.data, weight.quant_state)


def dequantize_8bit_layer(base: nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear8bitLt's weight in fp32: int8 row-wise, value · row scale / 127."""
    weight, state = base.weight, base.state
    if state.SCB is None:
        state.SCB = weight.SCB
    return weight.data.float() * state.SCB.to(weight.device).view(-1, 1).float() * (1.0 / 127)


class DoraQuantLinearLayer(DoraLinearLayer):
    """DoRA's magnitude over a bitsandbytes base (QDoRA): the weight norms are taken of the dequantized weight."""

    def __init__(self, bits: int):
        super().__init__(fan_in_fan_out=False)
        self.bits = bits

    def base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return dequantize_4bit_layer(base_layer) if self.bits == 4 else dequantize_8bit_layer(base_layer)


class _BnbLinear(Linear):
    """Shared forward / merge of the quantized LoRA linears; subclasses dequantize and requantize."""

    _bits = 0
    _supports_kasa = False  # (its SVD truncation is of a plain weight)
    _supports_velora = False  # (as in PEFT)
    _supports_bdlora = False  # (its blocks would take the packed weight's dtype; PEFT's bnb layers ignore BD-LoRA)
    forward = LoraLayer.forward  # (not Linear's flat path: that one is for nn.Linear / Conv1D bases)

    def _make_dora_layer(self) -> nn.Module:
        return DoraQuantLinearLayer(self._bits)

    def _dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in self._adapters_to_merge(adapter_names):
            if adapter not in self.lora_A:
                continue
            warnings.warn(f"Merge lora module to {self._bits}-bit linear may get different generations due to rounding "
                          "errors.")
            delta = self.get_delta_weight(adapter)
            weight = self._dequantized_weight().to(delta.device)
            if self.use_dora.get(adapter, False):  # m / ‖W + ΔW‖ rescales the merged rows (kept for unmerge)
                factor, self._caches[f"{adapter}-weight_norm"] = self._dora_factor(adapter, delta, weight)
                merged = factor * (weight + delta)
            else:
                merged = weight + delta
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
            weight = self._dequantized_weight().to(delta.dtype).to(delta.device)
            if self.use_dora.get(adapter, False):
                weight = weight / self._dora_factor_from_norm(adapter, self._caches.pop(f"{adapter}-weight_norm"))
            self._set_weight(weight - delta)
            self._shift_bias(adapter, -1)

    def _shift_bias(self, adapter: str, sign: int) -> None:
        # the forward adds s·bias_B, so merging moves s·bias_B into the base bias (PEFT's bnb layers omit the s)
        if self.lora_bias.get(adapter):
            base = self.get_base_layer()
            if base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            base.bias.data += sign * (self.lora_B[adapter].bias * self.scaling[adapter]).to(base.bias.dtype)

    def _unmerged_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if any(self._arrow_router(a) is not None for a in active):  # (routed per token: tuners/lora/arrow.py)
            return self._lora_forward(x, self.base_layer(x, *args, **kwargs))
        if any(self.use_dora.get(a, False) for a in active):
            return self._forward_with_dora(x, active, self.base_layer(x, *args, **kwargs))
        terms = [self._adapter_term(a) for a in active]
        if args or kwargs:  # extra base-layer arguments: the torch path passes them on
            return ops.torch_ref.quantized_linear_with_lora(x, self.base_layer, terms, *args, **kwargs)
        return ops.quantized_linear_with_lora(x, self.base_layer, terms)

    def _forward_with_dora(self, x: torch.Tensor, active: list[str], result: torch.Tensor) -> torch.Tensor:
        """Adapters among which some are DoRA, in PEFT's order for these layers (ops.torch_ref.add_quantized_terms):
        each term, computed in the adapter's dtype, is cast to the base output's dtype before it is added unless
        autocast is on; a DoRA term rescales the output so far."""
        if self._bits == 4:
            result = result.clone()  # (as add_quantized_terms: the 4-bit matmul's output is not modified in place)
        convert = not torch.is_autocast_enabled(x.device.type)
        for adapter in active:
            if convert:
                x = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            if self.use_dora.get(adapter, False):
                output = self._dora_term(adapter, x, result)
            else:
                term = self._adapter_term(adapter)
                output = term.lora_B(term.lora_A(term.dropout(x))) * term.scaling
            result = result + (output.to(result.dtype) if convert else output)
        return result


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
        return dequantize_4bit_layer(self.get_base_layer())

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
        return dequantize_8bit_layer(self.get_base_layer())

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
