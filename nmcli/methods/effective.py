"""The effective weight W_eff = (E + alpha (1 - E)) * W and the gradient each method sends back to W."""

from __future__ import annotations

import torch


class _EffectiveWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, keep, alpha: float, sr_lambda: float, backward: str):  # type: ignore[override]
        scale = keep.to(weight.dtype) if alpha == 0 else torch.where(keep, 1.0, alpha).to(weight.dtype)
        ctx.alpha, ctx.sr_lambda, ctx.backward = alpha, sr_lambda, backward
        ctx.save_for_backward(weight if sr_lambda else None, keep, scale if backward == "scaled" else None)
        return weight * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, keep, scale = ctx.saved_tensors
        grad_weight = grad * scale if ctx.backward == "scaled" else grad
        if ctx.sr_lambda:
            grad_weight = grad_weight + ctx.sr_lambda * weight.masked_fill(keep, 0)
        return grad_weight, None, None, None, None


def effective_weight(
    weight: torch.Tensor, keep: torch.Tensor, *, alpha: float = 0.0, sr_lambda: float = 0.0, backward: str = "ste"
) -> torch.Tensor:
    """Forward: (E + alpha (1 - E)) * W.

    Backward to W: `ste` passes g to every entry (pruned ones included); `scaled` is plain autodiff,
    g * (E + alpha (1 - E)); with `sr_lambda` the SR-STE term lambda * (1 - E) * W is added.
    """
    return _EffectiveWeight.apply(weight, keep, float(alpha), float(sr_lambda), backward)
