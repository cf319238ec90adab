"""Mask-preserving LoRA (methods.md §10, SQFT): the effective weight `S * (W + s B A)`, W and the mask frozen.

`S` is the recipe's mask scale at the step (E, or E + alpha (1 - E) while MDGF decays), E derived from the frozen
base W; `s = alpha / rank`. Plain autodiff: the gradient of A and B is that of the masked product, so positions the
mask drops teach the adapter nothing. The merged weight `E * (W + s B A)` is exactly N:M by construction; without
the mask on the update it would be dense (what plain LoRA does to a sparse model).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def mask_scale(keep: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """E + alpha (1 - E) as a tensor of `dtype` (E itself when alpha is 0)."""
    return keep.to(dtype) if alpha == 0 else torch.where(keep, 1.0, alpha).to(dtype)


def lora_weight(weight: torch.Tensor, keep: torch.Tensor, delta: torch.Tensor, scale: float, alpha: float = 0.0) -> torch.Tensor:
    """`(E + alpha (1 - E)) * (W + scale * delta)`, delta = B A laid out as W, in delta's dtype (fp32 adapters on
    a bf16 base compute in fp32)."""
    return mask_scale(keep, alpha, delta.dtype) * (weight.to(delta.dtype) + scale * delta)


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """B A laid out as the weight: [out, K], or [K, out] for a weight stored fan-in first (GPT-2's Conv1D)."""
    product = lora_b @ lora_a
    return product.T if fan_in_fan_out else product


class _MaskedLoraWeight(torch.autograd.Function):
    """`lora_weight` with B A formed inside, keeping for backward only what it already holds (the mask and the
    factors). Plain autodiff would keep S in the factors' dtype and the weight-sized products of every layer until
    the backward pass: 4 bytes per weight, 0.4 GiB for SmolLM2-135M."""

    @staticmethod
    def forward(ctx, weight, keep, lora_a, lora_b, scale: float, alpha: float, fan_in_fan_out: bool):  # type: ignore[override]
        ctx.save_for_backward(keep, lora_a, lora_b)
        ctx.scale, ctx.alpha, ctx.fan_in_fan_out = scale, alpha, fan_in_fan_out
        return lora_weight(weight, keep, lora_delta(lora_a, lora_b, fan_in_fan_out), scale, alpha)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        keep, lora_a, lora_b = ctx.saved_tensors
        masked = mask_scale(keep, ctx.alpha, grad.dtype) * grad  # dL/d(W + s B A)
        grad_weight = masked if ctx.needs_input_grad[0] else None
        # dL/d(B A), laid out [out, K], in the factors' dtype (under autocast the forward's product was bf16)
        grad_delta = ctx.scale * (masked.T if ctx.fan_in_fan_out else masked).to(lora_a.dtype)
        grad_a = lora_b.T @ grad_delta if ctx.needs_input_grad[2] else None
        grad_b = grad_delta @ lora_a.T if ctx.needs_input_grad[3] else None
        return grad_weight, None, grad_a, grad_b, None, None, None


class LoraFactors(nn.Module):
    """A [rank, K] and B [out, rank] of one layer, initialised as peft does (A Kaiming-uniform, B zero: the
    adapter starts as the identity update). `fan_in_fan_out`: the weight is stored [K, out] (GPT-2's Conv1D)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, dropout: float, fan_in_fan_out: bool):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = scale
        self.dropout = dropout
        self.fan_in_fan_out = fan_in_fan_out

    def delta(self) -> torch.Tensor:
        """B A in the weight's own layout."""
        return lora_delta(self.lora_A, self.lora_B, self.fan_in_fan_out)

    def masked_weight(self, weight: torch.Tensor, keep: torch.Tensor, alpha: float) -> torch.Tensor:
        """`(E + alpha (1 - E)) * (W + s B A)`, differentiable in A and B (and W, were it trained)."""
        return _MaskedLoraWeight.apply(weight, keep, self.lora_A, self.lora_B, self.scale, float(alpha), self.fan_in_fan_out)

    @property
    def split(self) -> bool:
        """Dropout on the adapter's input cannot be folded into one weight: in training steps (gradients on) the
        layer adds the adapter's term on the dropped-out input itself (`adapter_output`)."""
        return self.dropout > 0 and torch.is_grad_enabled()

    def adapter_output(self, x: torch.Tensor, scale_mask: torch.Tensor) -> torch.Tensor:
        """`dropout(x) @ (S * s B A)^T`: the adapter's share of the layer's output when `split`."""
        masked = scale_mask * (self.scale * self.delta())
        return F.linear(F.dropout(x, self.dropout, training=True), (masked.T if self.fan_in_fan_out else masked).to(x.dtype))
