from .lora import LoraConfig, LoraModel
from .tuners_utils import BaseTuner, BaseTunerLayer

__all__ = ["LoraConfig", "LoraModel", "BaseTuner", "BaseTunerLayer"]
