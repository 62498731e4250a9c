from .config import LoraConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = ["LoraConfig", "LoraLayer", "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "LoraModel"]
