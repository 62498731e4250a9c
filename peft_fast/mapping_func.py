"""get_peft_model (PEFT's `peft.mapping_func`)."""

from __future__ import annotations

import warnings

from torch import nn

from .config import PeftConfig
from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from .peft_model import PeftModel
from .tuners.tuners_utils import BaseTunerLayer


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (mixed=True: a PeftMixedModel).

    Returns the PeftModel subclass matching `peft_config.task_type` (PeftModel when it is None). The model is
    modified in place (its targeted modules become adapter layers); on error it is left as it was.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}")
    old_name = peft_config.base_model_name_or_path
    # models built from a config have name_or_path == "", which is no Hub id
    new_name = model.__dict__.get("name_or_path", None) or None
    peft_config.base_model_name_or_path = new_name
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before."
        )
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
            "Please ensure that the correct base model is loaded when loading this checkpoint."
        )
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, overwriting with revision {revision}")
        peft_config.revision = revision
    if getattr(peft_config, "init_lora_weights", None) == "eva" and not low_cpu_mem_usage:
        warnings.warn("lora with eva initialization used with low_cpu_mem_usage=False. Setting low_cpu_mem_usage=True "
                      "can improve the maximum batch size possible for eva initialization.")
    if mixed:
        from .mixed_model import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name=adapter_name)
    if peft_config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING and not peft_config.is_prompt_learning:
        raise ValueError(f"peft_type {peft_config.peft_type} is not supported by peft_fast.")
    peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return peft_cls(
        model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
