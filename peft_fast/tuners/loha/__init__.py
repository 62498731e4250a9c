from .config import LoHaConfig
from .layer import Conv1d, Conv2d, Linear, LoHaLayer
from .model import LoHaModel

__all__ = ["LoHaConfig", "LoHaModel", "LoHaLayer", "Linear", "Conv1d", "Conv2d"]
