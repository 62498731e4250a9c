"""Turn a model's nn.Linear layers into bitsandbytes 4-bit / 8-bit layers on any device (QLoRA benchmarks, tests).

This is what `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` does to a
transformers model, for models built from configs (no checkpoint) and on machines where transformers would not.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_linears(model: nn.Module, bits: int = 4, quant_type: str = "nf4", compute_dtype=torch.float32,
                     compress_statistics: bool = False, skip=("lm_head", "score", "classifier"),
                     device=None) -> nn.Module:
    """Replace every nn.Linear (but the heads) by a bitsandbytes Linear4bit / Linear8bitLt holding its weights,
    as `BitsAndBytesConfig(load_in_4bit/8bit=True)` does. bitsandbytes quantizes a weight when it is moved to its
    device: on `device` (default: the CPU), where the new layers then live; the rest of the model stays where it
    is. On a GPU that is seconds for a 1B model; on the CPU a 4096×4096 weight alone took 8–11 s (H200 host)."""
    import bitsandbytes as bnb

    device = torch.device("cpu" if device is None else device)

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child_name in skip:
                continue
            bias = child.bias is not None
            if bits == 4:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias, compute_dtype=compute_dtype,
                                        quant_type=quant_type, compress_statistics=compress_statistics)
                new.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                               compress_statistics=compress_statistics)
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias, has_fp16_weights=False)
                new.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if bias:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            # bnb's AVX512 CPU repacking (first no-grad forward) fails on these tiny shapes; keep the standard layout
            new.support_avx512bf16_for_cpu = False
            setattr(module, child_name, new.to(device))  # (quantizes, one weight at a time)
    # what transformers sets on a model loaded with BitsAndBytesConfig (HF PEFT picks its bnb layers by it)
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return model


def dequantize_linears(model: nn.Module) -> nn.Module:
    """The inverse of `quantize_linears` for 4-bit layers: each bitsandbytes Linear4bit becomes an fp32 nn.Linear
    holding its dequantized weight (the exact values the 4-bit layer computes with), on the same device."""
    import bitsandbytes as bnb

    from ..quantization import dequantize_4bit

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = dequantize_4bit(child.weight.data, child.weight.quant_state, torch.float32)
            new = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                            device=weight.device, dtype=torch.float32)
            new.weight = nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.float().clone(), requires_grad=False)
            setattr(module, child_name, new)
    model.is_loaded_in_4bit = False
    return model
