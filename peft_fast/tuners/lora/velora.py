"""VeLoRA (arXiv 2405.17991): lora_A's input kept for backward as rank-1 projections of its sub-tokens.

The input x (… × in) is cut into `num_groups` sub-tokens of g = ⌈in / num_groups⌉ features (the last zero-padded);
for backward each sub-token is kept as one number, its projection on a unit vector `embed` (g), so a token costs
num_groups numbers instead of `in`. A's gradient then uses the reconstruction scale · (number · embed) in place of x;
the forward output and the gradients of x and B are exact. `embed` is drawn at random once, or is the normalised mean
sub-token of the batch at every training forward ("batch_average") or at the first ("batch_average_once"). Outside
training (or without grad) the adapter is plain LoRA.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def group_dim(in_features: int, num_groups: int) -> int:
    return -(-in_features // num_groups)


def _sub_tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """x (… × in) as (tokens × num_groups × g), zero-padded to num_groups · g features."""
    width = num_groups * group_dim(x.shape[-1], num_groups)
    if x.shape[-1] != width:
        x = F.pad(x, (0, width - x.shape[-1]))
    return x.reshape(-1, num_groups, width // num_groups)


def unit_vector(v: torch.Tensor) -> torch.Tensor:
    """v / ‖v‖ in fp32 (a zero v: the normalised all-ones vector)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    return v / norm


def batch_embed(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The unit vector along the mean sub-token of `x` (fp32)."""
    with torch.no_grad():
        return unit_vector(_sub_tokens(x.detach(), num_groups).reshape(-1, group_dim(x.shape[-1], num_groups)).mean(0))


class VeloraLinearFunction(torch.autograd.Function):
    """F.linear(x, weight, bias) that keeps, for backward, x's sub-token projections on `embed` instead of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], embed: torch.Tensor,
                num_groups: int, scale: float) -> torch.Tensor:
        ctx.x_shape, ctx.x_dtype, ctx.num_groups, ctx.scale = tuple(x.shape), x.dtype, num_groups, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        projections = torch.einsum("tgd,d->tg", _sub_tokens(x, num_groups), embed.to(x.dtype))
        ctx.save_for_backward(projections, weight, embed)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        projections, weight, embed = ctx.saved_tensors
        dtype = grad_out.dtype
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ weight.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            in_features = ctx.x_shape[-1]
            rebuilt = (projections.to(dtype).unsqueeze(-1) * embed.to(dtype).view(1, 1, -1))
            rebuilt = rebuilt.reshape(projections.shape[0], -1)[:, :in_features] * ctx.scale
            grad_weight = (grad_2d.transpose(0, 1) @ rebuilt).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None
