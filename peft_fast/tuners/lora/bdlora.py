"""BD-LoRA (block-diagonal LoRA): lora_A or lora_B of a Linear layer as a block-diagonal matrix of `nblocks` blocks.

Served with tensor parallelism over `nblocks` shards, a block-diagonal factor keeps each shard's LoRA term local
(no extra all-gather): lora_A block-diagonal in row-sharded modules (attention out, MLP down), lora_B in
column-sharded ones (q, k, v, up, gate). `BlockDiagonalLinear` stores only the diagonal blocks, as `weight` of shape
out × (in / nblocks) (block i = rows i·out/nblocks …), which is also how it is saved; `dense_weight` expands it.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockDiagonalLinear(nn.Module):
    """y = x · blockdiag(W_0, …, W_{n−1})ᵀ: input block i (in / n features) goes through W_i (out/n × in/n) to output
    block i. A lora_A starts as kaiming_uniform (PEFT's draws), a lora_B at zero."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, init_zero: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(f"self.in_features={in_features} or self.out_features={out_features} not divisible by "
                             f"{nblocks}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, dtype=dtype,
                                               device=device or torch.device("cpu")))
        if init_zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.nblocks
        blocks = x.reshape(-1, n, x.shape[-1] // n)  # tokens × block × (in / n)
        weight = self.weight.view(n, self.out_features // n, -1)  # block × (out / n) × (in / n)
        return torch.einsum("tbi,boi->tbo", blocks, weight).reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The full out × in matrix, zero off the diagonal blocks."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))


def block_diagonal_side(config, target_name: str) -> str:
    """'A', 'B' or '' (neither): which factor BdLoraConfig `config` makes block-diagonal in module `target_name`."""
    in_a = any(pattern in target_name for pattern in config.target_modules_bd_a or [])
    in_b = any(pattern in target_name for pattern in config.target_modules_bd_b or [])
    if in_a and in_b:
        raise ValueError(f"Target {target_name} matches both A and B block-diagonal patterns")
    if config.match_strict and not (in_a or in_b):
        raise ValueError(f"Target {target_name} matches neither A nor B block-diagonal patterns. If this is "
                         "intentional, set match_strict=False in BdLoraConfig during initialization.")
    return "A" if in_a else "B" if in_b else ""


def dense(module: nn.Module) -> torch.Tensor:
    """A factor's weight as a full matrix (a block-diagonal one expanded)."""
    return module.dense_weight() if isinstance(module, BlockDiagonalLinear) else module.weight
