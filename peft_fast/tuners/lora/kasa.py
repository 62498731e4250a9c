"""KaSA (Knowledge-aware Singular-value Adaptation, arXiv 2412.06071): the pieces a LoRA Linear layer uses.

At initialisation the layer's base weight W (out × in, k = min of both) loses its r smallest singular components,
W ← U[:, :k−r] S[:k−r] Vh[:k−r] (once, destructively), and the update becomes s·B·diag(d)·A with a learnable r-vector
d (`lora_diag`, drawn from a normal; B starts at zero, so the update does too). With the adapter created on the meta
device (low_cpu_mem_usage) the truncation waits for the first forward or merge; that forward's base output, made with
the untruncated weight, is corrected by the dropped components. `regularization_loss` is the paper's β·Σd² +
γ·(‖BᵀB − I‖ + ‖AAᵀ − I‖), which `LoraModel._get_kasa_loss` sums for the training loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def truncate_base_weight(base_layer, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace `base_layer.weight` (out × in) by its rank-(k − r) SVD approximation; the dropped part as fp32
    factors (U·S of shape out × r, Vh of shape r × in)."""
    weight = base_layer.weight
    out_features, in_features = weight.shape
    k = min(out_features, in_features)
    if r >= k:
        raise ValueError(f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k}) so that "
                         "at least one singular component of the base weight is preserved after truncation.")
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    kept = k - r
    base_layer.weight.data = ((U[:, :kept] * S[:kept]) @ Vh[:kept]).to(weight.dtype)
    return U[:, kept:] * S[kept:], Vh[kept:]


def dropped_output(x: torch.Tensor, dropped: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """What the dropped components contributed to a base output of `x` (to subtract from one made before the
    truncation)."""
    scaled_u, vh = dropped
    return F.linear(F.linear(x.to(vh.dtype), vh), scaled_u)


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, diag: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·B·diag(d)·A (out × in); half precision on the CPU is computed in fp32."""
    dtype = lora_B.dtype
    cast = lora_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if cast:
        lora_A, lora_B, diag = lora_A.float(), lora_B.float(), diag.float()
    delta = ((lora_B * diag) @ lora_A) * scaling
    return delta.to(dtype) if cast else delta


def regularization_loss(lora_A: torch.Tensor, lora_B: torch.Tensor, diag: torch.Tensor, beta: float,
                        gamma: float) -> torch.Tensor:
    """β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), in fp32."""
    A, B, d = lora_A.float(), lora_B.float(), diag.float()
    eye = torch.eye(d.shape[0], device=d.device, dtype=torch.float32)
    orthogonality = torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye)
    return beta * (d ** 2).sum() + gamma * orthogonality
