"""PrefixTuningConfig (PEFT's `peft.tuners.prefix_tuning.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trained key/value prefixes for every attention layer.

    Args:
        init_weights: None (random) or "zero" (the prefix starts as a no-op).
        encoder_hidden_size: hidden size of the reparameterization MLP (default: token_dim).
        prefix_projection: learn num_virtual_tokens × token_dim embeddings and project them through an MLP.
    """

    init_weights: Optional[Literal["zero"]] = field(default=None, metadata={"help": 'None or "zero".'})
    encoder_hidden_size: int = field(default=None, metadata={"help": "The hidden size of the encoder"})
    prefix_projection: bool = field(default=False, metadata={"help": "Whether to project the prefix tokens"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
