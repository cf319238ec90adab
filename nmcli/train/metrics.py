"""Training metrics: JSONL (always), TensorBoard (when installed), and the gradient-flow measurements of
methods.md §5: per target layer, the variance of dL/dW, the norm of its change since the last log, and the
mask flip rate at the target pattern ("sparse architecture divergence"), logged for every recipe incl. dense.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nmcli.methods.sparsifier import Sparsifier
from nmcli.nm import NMPattern, nm_mask


class MetricsLog:
    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # TensorBoard is optional
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class GradientFlowProbe:
    """Per-layer gradient variance, gradient change and mask flips between logs."""

    def __init__(self, sparsifier: Sparsifier, target: NMPattern):
        self.sparsifier = sparsifier
        self.target = target
        self.last_grad: dict[str, torch.Tensor] = {}
        self.last_mask: dict[str, torch.Tensor] = {}

    def measure(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, param in self.sparsifier.params.items():
            weight = self.sparsifier.original(name)
            if weight.grad is None:
                continue
            grad = weight.grad.detach().float()
            mask = nm_mask(weight.detach(), self.target, param.layout)
            entry = {"grad_var": float(grad.var()), "grad_norm": float(grad.norm())}
            if name in self.last_grad:
                entry["grad_change_norm"] = float((grad - self.last_grad[name]).norm())
                entry["mask_flip_rate"] = float((mask != self.last_mask[name]).float().mean())
            self.last_grad[name], self.last_mask[name] = grad.clone(), mask
            out[name] = entry
        return out
