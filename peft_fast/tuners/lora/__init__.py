from .config import CordaConfig, LoftQConfig, LoraConfig
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
]
