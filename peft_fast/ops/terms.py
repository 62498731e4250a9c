"""What a tuner layer hands the ops layer: one record per active adapter, holding weights and scale but no state."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn


class LoraTerm(NamedTuple):
    """s · lora_B(lora_A(dropout(x))). lora_A / lora_B are nn.Linear or nn.ConvNd; dropout is nn.Dropout/Identity.

    (A NamedTuple: one is built per adapter per forward call, so construction must cost next to nothing.)"""

    lora_A: nn.Module
    lora_B: nn.Module
    scaling: float
    dropout: nn.Module

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0


class EmbeddingTerm(NamedTuple):
    """s · embed(x, lora_Aᵀ) · lora_Bᵀ (· embed_scale); lora_A is (r × vocab), lora_B is (dim × r)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    embed_scale: Optional[torch.Tensor] = None
