"""LoKrModel (PEFT's `peft.tuners.lokr.model`)."""

from __future__ import annotations

from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..lycoris_utils import LycorisTuner
from .config import LoKrConfig
from .layer import Conv1d, Conv2d, Linear, LoKrLayer


class LoKrModel(LycorisTuner):
    """Creates a LoKr model from a transformers (or any torch) model: `get_peft_model(model, LoKrConfig(...))`."""

    prefix: str = "lokr_"
    tuner_layer_cls = LoKrLayer
    config_cls = LoKrConfig
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    layers_mapping = {nn.Conv2d: Conv2d, nn.Conv1d: Conv1d, nn.Linear: Linear}
