from .arrow import create_arrow_model
from .config import (ArrowConfig, BdLoraConfig, CordaConfig, EvaConfig, KasaConfig, LoftQConfig, LoraConfig,
                     LoraGAConfig, LoraRuntimeConfig, VeloraConfig)
from .conversion import convert_to_lora, save_as_lora
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .loraga import preprocess_loraga
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = [
    "LoraConfig",
    "CordaConfig",
    "EvaConfig",
    "LoraGAConfig",
    "LoftQConfig",
    "LoraRuntimeConfig",
    "ArrowConfig",
    "KasaConfig",
    "BdLoraConfig",
    "VeloraConfig",
    "create_arrow_model",
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "LoraModel",
    "convert_to_lora",
    "save_as_lora",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_loraga",
]
