"""Small helpers PEFT exposes in `peft.helpers`."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .peft_model import PeftModel
from .tuners.lora.layer import LoraLayer
from .tuners.tuners_utils import BaseTunerLayer


def check_if_peft_model(model_name_or_path: str) -> bool:
    """Whether `model_name_or_path` holds an adapter config (a local dir, or a Hub repo when online)."""
    from .config import PeftConfig

    try:
        PeftConfig.from_pretrained(model_name_or_path)
        return True
    except Exception:
        return False


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float):
    """Temporarily multiply the scaling of every active LoRA adapter by `multiplier`."""
    if not isinstance(multiplier, (int, float)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    originals = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            originals[module] = module.scaling.copy()
            module.scaling = {k: v * multiplier for k, v in module.scaling.items()}
    if not originals:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in originals.items():
            module.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True):
    """Within the context, LoRA layers do not cast their input to the adapter dtype."""
    if not active:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled")]
    previous = {m: m.cast_input_dtype_enabled for m in layers}
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, flag in previous.items():
            m.cast_input_dtype_enabled = flag
