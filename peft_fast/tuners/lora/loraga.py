"""LoRA-GA's gradient estimation (arXiv 2407.05000; PEFT's `peft.tuners.lora.loraga`).

Before `get_peft_model(model, LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(...)))`, call
`preprocess_loraga(model, config, train_step)`: `train_step()` runs forward and backward passes on a few training
batches while only the targeted linear layers' weights require grad; each layer's gradient, averaged over the
backward passes that reached it, is attached to the layer (`_peft_loraga_grad`) for `LoraLayer.lora_ga_init`, which
builds the adapter from its top singular vectors and consumes it. `cache_file` keeps the gradients for a later run.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from .config import LoraConfig
from .corda import _device, target_modules


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config: LoraConfig, train_step: Callable[[], None],
                      cache_file: Optional[str] = None) -> None:
    """Attach to every targeted linear layer of `model` its weight gradient averaged over the backward passes
    `train_step()` runs (or read them from `cache_file` when it exists, and write them there otherwise), for
    init_lora_weights='lora_ga'. Refused: no lora_ga_config, quantized layers (LoRA-GA needs full-precision
    gradients), no targeted linear layer."""
    if lora_config.lora_ga_config is None:
        raise ValueError("If you want to use LoRA-GA, please initialize the LoraConfig with "
                         "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...).")
    if lora_config.target_modules is None:  # (get_peft_model would fill them in the same way, after this call)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if defaults is None:
            raise ValueError("Please specify `target_modules` in `peft_config`")
        lora_config.target_modules = set(defaults)
    targets = list(target_modules(model, lora_config))
    for name, module in targets:
        if hasattr(module, "quant_state") or not module.weight.dtype.is_floating_point:
            raise ValueError(f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. LoRA-GA "
                             "requires full-precision gradients during preprocessing.")
    if not targets:
        raise ValueError("No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear and "
                         "Conv1D layers. Please ensure your model contains at least one of these layer types in "
                         "target_modules.")
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=_device(model))
        missing = [name for name, _ in targets if f"{name}._peft_loraga_grad" not in cache]
        if missing:
            raise ValueError(f"The LoRA-GA cache {cache_file} has no gradient for {missing}: it was made for another "
                             "model or other target_modules")
        for name, module in targets:
            module._peft_loraga_grad = cache[f"{name}._peft_loraga_grad"]
        return
    _estimate_gradients(model, targets, train_step)
    if cache_file is not None:
        folder = os.path.dirname(cache_file)
        if folder:
            os.makedirs(folder, exist_ok=True)
        torch.save({f"{name}._peft_loraga_grad": module._peft_loraga_grad for name, module in targets}, cache_file)


def _estimate_gradients(model: nn.Module, targets: list[tuple[str, nn.Module]], train_step: Callable[[], None]) -> None:
    """Each target weight's gradient over `train_step()`, divided by the number of backward passes that reached it
    (counted as the weight's gradient accumulations); every other parameter frozen meanwhile, and requires_grad,
    the weights' .grad and the training mode restored after, also on error."""
    was_training = model.training
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    counts = {name: 0 for name, _ in targets}
    handles = []
    try:
        model.train()
        for param in requires_grad:
            param.requires_grad_(False)
        for name, module in targets:
            module.weight.grad = None
            module.weight.requires_grad_(True)

            def count(_param, name=name):
                counts[name] += 1
            handles.append(module.weight.register_post_accumulate_grad_hook(count))
        with torch.enable_grad():
            train_step()
        for name, module in targets:
            if counts[name] > 0:
                module._peft_loraga_grad = module.weight.grad.detach() / counts[name]
    finally:
        for handle in handles:
            handle.remove()
        for name, module in targets:
            module.weight.grad = None
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        model.train(was_training)
