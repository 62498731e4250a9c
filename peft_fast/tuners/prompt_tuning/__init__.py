from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptEmbedding"]
