"""Type → class maps, get_peft_config and inject_adapter_in_model (PEFT's `peft.mapping`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, register_peft_config
from .peft_model import (
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners.mixed import COMPATIBLE_TUNER_TYPES
from .tuners.loha import LoHaConfig, LoHaModel
from .tuners.lokr import LoKrConfig, LoKrModel
from .tuners.lora import LoraConfig, LoraModel
from .tuners.p_tuning import PromptEncoder, PromptEncoderConfig
from .tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig
from .tuners.trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .utils.peft_types import PeftType, TaskType

# the tuners a PeftMixedModel can hold together (get_peft_model(..., mixed=True))
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: dict = {}

for _type, _config, _tuner in (
    (PeftType.LORA, LoraConfig, LoraModel),
    (PeftType.LOHA, LoHaConfig, LoHaModel),
    (PeftType.LOKR, LoKrConfig, LoKrModel),
    (PeftType.TRAINABLE_TOKENS, TrainableTokensConfig, TrainableTokensModel),
):
    register_peft_config(_type, _config)
    PEFT_TYPE_TO_TUNER_MAPPING[_type] = _tuner
    PEFT_TYPE_TO_PREFIX_MAPPING[_type] = _tuner.prefix
    if _type in COMPATIBLE_TUNER_TYPES:
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING[_type] = _tuner
# prompt learning: the "tuner" is the prompt encoder module built beside the frozen model
for _type, _config, _encoder in (
    (PeftType.PREFIX_TUNING, PrefixTuningConfig, PrefixEncoder),
    (PeftType.PROMPT_TUNING, PromptTuningConfig, PromptEmbedding),
    (PeftType.P_TUNING, PromptEncoderConfig, PromptEncoder),
):
    register_peft_config(_type, _config)
    PEFT_TYPE_TO_TUNER_MAPPING[_type] = _encoder

MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_config(config_dict: dict) -> PeftConfig:
    """Build the config object named by config_dict['peft_type'] from a plain dict."""
    if not isinstance(config_dict, dict):
        raise TypeError(f"get_peft_config expects a dict, got {type(config_dict).__name__}")
    return PeftConfig.from_peft_type(**config_dict)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """Inject adapter layers into `model` in place, without wrapping it in a PeftModel; returns the model."""
    if peft_config.is_prompt_learning or peft_config.is_adaption_prompt:
        raise ValueError("`inject_adapter_in_model` does not support prompt learning and adaption prompt yet.")
    if peft_config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(f"`inject_adapter_in_model` does not support {peft_config.peft_type} yet.")
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type]
    peft_model = tuner_cls(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                           state_dict=state_dict)
    return peft_model.model


__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "inject_adapter_in_model",
]
