"""Intruder-dimension mitigation of a trained LoRA adapter (PEFT's `reduce_intruder_dimension`; "LoRA vs Full
Fine-tuning: An Illusion of Equivalence", https://arxiv.org/abs/2410.21228).

Per layer, with W the base weight and W' = W + ΔW (both out × in, the orientation B·A lives in): the top_k left
singular vectors of W' whose largest |cosine| with any left singular vector of W stays below threshold_epsilon are
"intruders"; (1 − λ) of their rank-one parts is taken out of W', and the rest of the change, divided by the scaling,
becomes a new adapter of the same rank (best rank-r factors, √S on each side). The old adapter stays as it was.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from ...utils.loftq_utils import low_rank_decomposition
from .layer import Embedding, Linear, LoraLayer


def _oriented_base(layer: LoraLayer) -> torch.Tensor:
    """The base weight in B·A's orientation (out × in): nn.Linear's as stored, Conv1D's and Embedding's transposed."""
    weight = layer.get_base_layer().weight
    return weight.T if isinstance(layer, Embedding) or getattr(layer, "fan_in_fan_out", False) else weight


def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of `adapter` as the tensors that hold them."""
    if isinstance(layer, Embedding):
        return layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter]
    return layer.lora_B[adapter].weight, layer.lora_A[adapter].weight


@torch.no_grad()
def _mitigated(layer: LoraLayer, adapter: str, top_k: int, threshold_epsilon: float, mitigation_lambda: float
               ) -> Optional[tuple[torch.Tensor, torch.Tensor, int]]:
    """The new (B, A) in fp32 and the number of intruder dimensions, or None where the layer has none."""
    b, a = _factors(layer, adapter)
    base = _oriented_base(layer).float()
    merged = base + layer.scaling[adapter] * (b.float() @ a.float())
    u_base = torch.linalg.svd(base, full_matrices=False)[0]
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    similarity = (u.T @ u_base).abs().amax(dim=1)
    intruders = torch.where(similarity[:top_k] < threshold_epsilon)[0]
    if intruders.numel() == 0:
        return None
    root = s[intruders].sqrt()
    removed = (u[:, intruders] * root) @ (root[:, None] * vh[intruders])
    delta = (merged - (1 - mitigation_lambda) * removed - base) / layer.scaling[adapter]
    new_b, new_a = low_rank_decomposition(delta, layer.r[adapter])
    return new_b, new_a, intruders.numel()


@torch.no_grad()
def reduce_intruder_dimension(peft_model, old_adapter_name: str = "default",
                              new_adapter_name: str = "intruder_reduced", top_k: int = 10,
                              threshold_epsilon: float = 0.5, mitigation_lambda: float = 0.75,
                              logging_sink: Optional[Callable[..., None]] = print) -> None:
    """Add `new_adapter_name`: `old_adapter_name` with its intruder dimensions reduced (module docstring), layer
    by layer ("<layer>: No intruders" / "<layer>: Intruders: n" to logging_sink, None for silence), and make it the
    active adapter; `peft_model.set_adapter(old_adapter_name)` goes back. LoRA on linear (nn.Linear, Conv1D) and
    embedding layers with a floating-point base weight, no DoRA; anything else raises before the model changes."""
    log = logging_sink if logging_sink is not None else (lambda *args, **kwargs: None)
    if peft_model.peft_type != "LORA":
        raise ValueError("The provided model is not using LoRA and is therefore not supported.")
    if old_adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter {old_adapter_name!r} to reduce; the model has {sorted(peft_model.peft_config)}.")
    layers = [(name, layer) for name, layer in peft_model.named_modules()
              if isinstance(layer, LoraLayer) and old_adapter_name in layer._get_available_adapters()]
    for name, layer in layers:
        if not isinstance(layer, (Linear, Embedding)) or not layer.get_base_layer().weight.is_floating_point():
            raise ValueError(f"reduce_intruder_dimension handles LoRA on linear and embedding layers with a "
                             f"floating-point weight; {name} is a {type(layer).__name__} over "
                             f"{type(layer.get_base_layer()).__name__}.")
        if layer.use_dora.get(old_adapter_name, False):
            raise ValueError(f"reduce_intruder_dimension does not handle DoRA adapters ({old_adapter_name!r}).")

    peft_model.add_adapter(new_adapter_name, copy.deepcopy(peft_model.peft_config[old_adapter_name]))
    try:
        for name, layer in layers:
            reduced = _mitigated(layer, old_adapter_name, top_k, threshold_epsilon, mitigation_lambda)
            new_b, new_a = _factors(layer, new_adapter_name)
            if reduced is None:
                log(f"{name}: No intruders")
                b, a = _factors(layer, old_adapter_name)  # (the old adapter's weights, unchanged)
            else:
                b, a, count = reduced
                log(f"{name}: Intruders: {count}")
            new_b.copy_(b.to(new_b.dtype))
            new_a.copy_(a.to(new_a.dtype))
    except Exception:
        peft_model.delete_adapter(new_adapter_name)
        raise
    log(f"Enabling new adapter {new_adapter_name}")
    peft_model.set_adapter(new_adapter_name)
