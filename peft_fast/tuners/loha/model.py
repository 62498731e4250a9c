"""LoHaModel (PEFT's `peft.tuners.loha.model`)."""

from __future__ import annotations

from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..lycoris_utils import LycorisTuner
from .config import LoHaConfig
from .layer import Conv1d, Conv2d, Linear, LoHaLayer


class LoHaModel(LycorisTuner):
    """Creates a LoHa model from a transformers (or any torch) model: `get_peft_model(model, LoHaConfig(...))`."""

    prefix: str = "hada_"
    tuner_layer_cls = LoHaLayer
    config_cls = LoHaConfig
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    layers_mapping = {nn.Conv2d: Conv2d, nn.Conv1d: Conv1d, nn.Linear: Linear}
