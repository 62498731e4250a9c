"""What a tuner layer hands the ops layer: one record per active adapter, holding weights and scale but no state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class LoraTerm:
    """s · lora_B(lora_A(dropout(x))). lora_A / lora_B are nn.Linear or nn.ConvNd; dropout is nn.Dropout/Identity."""

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


@dataclass(frozen=True)
class EmbeddingTerm:
    """s · embed(x, lora_Aᵀ) · lora_Bᵀ (· embed_scale); lora_A is (r × vocab), lora_B is (dim × r)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    embed_scale: Optional[torch.Tensor] = None
