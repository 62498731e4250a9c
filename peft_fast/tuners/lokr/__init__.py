from .config import LoKrConfig
from .layer import Conv1d, Conv2d, Linear, LoKrLayer
from .model import LoKrModel

__all__ = ["LoKrConfig", "LoKrModel", "LoKrLayer", "Linear", "Conv1d", "Conv2d"]
