from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder"]
