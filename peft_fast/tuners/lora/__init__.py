from .config import CordaConfig, LoftQConfig, LoraConfig
from .conversion import convert_to_lora, save_as_lora
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = [
    "LoraConfig",
    "CordaConfig",
    "LoftQConfig",
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "LoraModel",
    "convert_to_lora",
    "save_as_lora",
]
