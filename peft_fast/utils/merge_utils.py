"""Ways of combining several task tensors (LoRA deltas or factors) into one, for `LoraModel.add_weighted_adapter`
(PEFT's `peft.utils.merge_utils` names and arguments).

Each merge takes a list of same-shaped tensors and a 1-D tensor of weights, one per tensor:
- task_arithmetic: Σ wᵢ tᵢ;
- magnitude_prune: the same after keeping each tensor's largest-magnitude `density` fraction;
- ties (TIES-merging, Yadav et al. 2023): prune by magnitude, elect a sign per element (sum of the values, or the
  count of signs), then average the weighted values that agree with it;
- dare_linear / dare_ties (DARE, Yu et al. 2023): prune at random keeping a `density` fraction, rescaled by
  1/density, then Σ wᵢ tᵢ / the TIES election.
Random pruning draws one torch.bernoulli per tensor, in order, from torch's generator: `torch.manual_seed` makes a
merge reproducible (and equal to PEFT's for the same seed).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights` (one per stacked task tensor) shaped to broadcast against `task_tensors` (stacked on dim 0)."""
    return weights.reshape(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density · numel) largest-magnitude values set to zero."""
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """`tensor` with each value kept with probability `density` (divided by it when `rescale`, so that the expected
    value is unchanged)."""
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """Keep a `density` fraction of `tensor`'s values, by magnitude or at random; density ≥ 1 keeps all (warned)."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Where each stacked task tensor's sign agrees with the elected one: the sign of the values' sum ("total") or
    of the count of positive against negative values ("frequency"); zero counts as positive."""
    sign = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    elected = torch.where(votes >= 0, 1, -1)
    return sign == elected


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the stacked tensors of the values that agree with the elected sign (0 where none does)."""
    agreeing = majority_sign_mask.sum(dim=0)
    return (task_tensors * majority_sign_mask).sum(dim=0) / torch.clamp(agreeing, min=1.0)


def _weighted_sum(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    return (stacked * reshape_weight_task_tensors(stacked, weights)).sum(dim=0)


def _elected_mean(task_tensors: list[torch.Tensor], weights: torch.Tensor, method: str) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    mask = calculate_majority_sign_mask(stacked, method=method)  # elected on the unweighted values
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, weights), mask)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ wᵢ tᵢ."""
    return _weighted_sum(task_tensors, weights)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Σ wᵢ tᵢ over the tensors pruned to their largest-magnitude `density` fraction."""
    return _weighted_sum([prune(t, density, method="magnitude") for t in task_tensors], weights)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES: magnitude pruning, sign election, mean of the agreeing weighted values."""
    return _elected_mean([prune(t, density, method="magnitude") for t in task_tensors], weights,
                         majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: random pruning rescaled by 1/density, then Σ wᵢ tᵢ."""
    return _weighted_sum([prune(t, density, method="random", rescale=True) for t in task_tensors], weights)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE pruning, then the TIES sign election and mean."""
    return _elected_mean([prune(t, density, method="random", rescale=True) for t in task_tensors], weights,
                         majority_sign_method)
