from .config import CordaConfig, LoraConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = ["LoraConfig", "CordaConfig", "LoraLayer", "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "LoraModel"]
