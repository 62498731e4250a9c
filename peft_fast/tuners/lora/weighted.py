"""`LoraModel.add_weighted_adapter`: a new LoRA adapter combined from loaded ones (PEFT's combination types).

- "cat": the adapters side by side, rank Σ rᵢ: A = [wᵢ sᵢ Aᵢ] stacked on the rank dimension, B = [Bᵢ]; exact.
- "svd" and the "*_svd" types: each layer's deltas sᵢ Bᵢ Aᵢ combined (task arithmetic, TIES, DARE or magnitude
  pruning; utils/merge_utils.py), then the truncated SVD at `svd_rank` (default: the largest rank) gives B = U S and
  A = Vᴴ; optionally clamped at a quantile.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the A's and the B's combined separately with
  weights √|wᵢ sᵢ| (the sign on A only); all ranks equal; a rough approximation of the weighted sum.
The new adapter's scaling is 1 (lora_alpha = its rank, or √rank with use_rslora), so that its B A is the combination
itself, in PEFT and in peft_fast; it is added frozen and not made active.
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from functools import reduce

import torch
from torch import nn

from ...utils import merge_utils
from ...utils.other import ModulesToSaveWrapper

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING_TYPES = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                 "magnitude_prune", "magnitude_prune_svd")


def check_add_weighted_adapter(model, adapters: list[str], weights: list[float], combination_type: str,
                               svd_rank, density) -> tuple[str, int, object]:
    """(combination type, rank of the new adapter, its target_modules), or a ValueError naming what is wrong."""
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter to combine")
    for adapter in adapters:
        if adapter not in model.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter got {len(weights)} weights for {len(adapters)} adapters")
    clashing = [m for m in model.model.modules() if isinstance(m, ModulesToSaveWrapper)
                and sum(a in m.modules_to_save for a in adapters) > 1]
    if clashing:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                         f"{len(clashing)} such instance(s).")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    configs = [model.peft_config[a] for a in adapters]
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties or dare_linear.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_TYPES:
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    if combination_type in PRUNING_TYPES and density is None:
        raise ValueError(f"combination_type {combination_type!r} needs `density` (the fraction of values kept, 0 to 1)")
    kinds = {type(c.target_modules) for c in configs}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters with "
                         "`target_modules` type being a mix of list/set and string is not supported.")
    kind = kinds.pop()
    if kind is str:
        targets = "|".join(f"({c.target_modules})" for c in configs)
    elif kind in (set, list):
        targets = reduce(operator.or_, (set(c.target_modules) for c in configs))
    else:
        raise TypeError(f"Invalid type {kind} found in target_modules")
    return combination_type, new_rank, targets


def new_adapter_config(model, adapters: list[str], new_rank: int, targets):
    """The combined adapter's config: the first adapter's, at the new rank, with scaling 1."""
    first = model.peft_config[adapters[0]]
    alpha = math.sqrt(new_rank) if first.use_rslora else new_rank
    return replace(first, r=new_rank, lora_alpha=alpha, target_modules=targets, alpha_pattern={}, rank_pattern={})


def _factors(layer, adapter: str):
    """(A, B) tensors of `adapter` in `layer` (Linear/Conv: module weights; Embedding: parameters), or None."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, majority_sign_method):
    if kind in ("svd", "linear"):
        return merge_utils.task_arithmetic(tensors, weights)
    if kind == "ties":
        return merge_utils.ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    if kind == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, density, majority_sign_method)
    if kind == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    raise ValueError(f"Invalid combination_type: {kind}")


def _cat(layer, present, target_a, target_b):
    a = torch.cat([fa.detach() * w * layer.scaling[name] for name, w, (fa, _) in present], dim=0)
    b = torch.cat([fb.detach() for _, _, (_, fb) in present], dim=1)
    new_a, new_b = torch.zeros_like(target_a), torch.zeros_like(target_b)
    new_a[: a.shape[0]] = a
    new_b[:, : b.shape[1]] = b
    return new_a, new_b


def _svd(layer, present, kind, new_rank, target_a, target_b, density, majority_sign_method, clamp, full_matrices,
         driver):
    deltas = [layer.get_delta_weight(name).float() for name, _, _ in present]  # scaled: sᵢ Bᵢ Aᵢ
    weights = torch.tensor([w for _, w, _ in present]).to(deltas[0].device)
    delta = _combine(kind.removesuffix("_svd"), deltas, weights, density, majority_sign_method)
    conv = isinstance(layer.get_base_layer(), (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if conv:
        delta = delta.flatten(start_dim=1)
    embedding = present[0][0] in layer.lora_embedding_A
    if getattr(layer, "fan_in_fan_out", False) or embedding:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh.reshape(target_a.shape).to(target_a.dtype), u.reshape(target_b.shape).to(target_b.dtype)


def _by_factor(layer, present, kind, density, majority_sign_method):
    weights_a, weights_b, factors_a, factors_b = [], [], [], []
    for name, w, (fa, fb) in present:
        ws = w * layer.scaling[name]
        root = math.sqrt(abs(ws))
        weights_a.append(root if ws >= 0 else -root)  # the sign on one factor only
        weights_b.append(root)
        factors_a.append(fa.detach())
        factors_b.append(fb.detach())
    out = []
    for factors, weights in ((factors_a, weights_a), (factors_b, weights_b)):
        combined = _combine(kind, factors, torch.tensor(weights).to(factors[0].device), density, majority_sign_method)
        out.append(combined.to(factors[0].dtype))
    return out[0], out[1]


def fill_weighted_adapter(model, adapters, weights, adapter_name, kind, new_rank, svd_clamp, svd_full_matrices,
                          svd_driver, density, majority_sign_method) -> None:
    """Write the combined factors into `adapter_name` (already injected, zero) in every LoRA layer holding it."""
    from .layer import LoraLayer

    for _, layer in model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        targets = _factors(layer, adapter_name)
        if targets is None:
            continue
        present = [(name, w, f) for name, w in zip(adapters, weights) if (f := _factors(layer, name)) is not None]
        if not present:
            raise ValueError(f"No matching LoRAs found for adapter '{adapter_name}' in a layer it targets")
        target_a, target_b = targets
        if kind == "cat":
            new_a, new_b = _cat(layer, present, target_a, target_b)
        elif kind in SVD_TYPES:
            new_a, new_b = _svd(layer, present, kind, new_rank, target_a, target_b, density, majority_sign_method,
                                svd_clamp, svd_full_matrices, svd_driver)
        else:
            new_a, new_b = _by_factor(layer, present, kind, density, majority_sign_method)
        with torch.no_grad():
            target_a.copy_(new_a)
            target_b.copy_(new_b)
