from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora import (ArrowConfig, BdLoraConfig, EvaConfig, KasaConfig, LoftQConfig, LoraConfig, LoraGAConfig,
                   LoraModel, LoraRuntimeConfig, VeloraConfig, convert_to_lora, create_arrow_model,
                   get_eva_state_dict, initialize_lora_eva_weights, preprocess_loraga, save_as_lora)
from .p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .tuners_utils import BasePromptEncoder, BaseTuner, BaseTunerLayer

__all__ = [
    "LoraConfig", "LoftQConfig", "LoraModel", "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel", "BaseTuner",
    "BaseTunerLayer", "BasePromptEncoder",
    "PrefixTuningConfig", "PrefixEncoder", "PromptTuningConfig", "PromptTuningInit", "PromptEmbedding",
    "PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder", "TrainableTokensConfig",
    "TrainableTokensModel", "convert_to_lora", "save_as_lora", "EvaConfig", "get_eva_state_dict",
    "initialize_lora_eva_weights", "LoraGAConfig", "preprocess_loraga", "LoraRuntimeConfig",
    "ArrowConfig", "create_arrow_model", "KasaConfig", "VeloraConfig", "BdLoraConfig",
]
