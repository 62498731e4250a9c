from .lora import LoraConfig, LoraModel
from .p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .tuners_utils import BasePromptEncoder, BaseTuner, BaseTunerLayer

__all__ = [
    "LoraConfig", "LoraModel", "BaseTuner", "BaseTunerLayer", "BasePromptEncoder",
    "PrefixTuningConfig", "PrefixEncoder", "PromptTuningConfig", "PromptTuningInit", "PromptEmbedding",
    "PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder",
]
