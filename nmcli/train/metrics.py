"""Training metrics: JSONL records, and the gradient-flow measurements of
methods.md §5: per target layer, the variance of dL/dW, the norm of its change since the last log, and the
mask flip rate at the target pattern ("sparse architecture divergence"), logged for every recipe incl. dense.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nmcli.io.atomic import atomic_output
from nmcli.methods.sparsifier import Sparsifier
from nmcli.nm import NMPattern, nm_mask


class MetricsLog:
    """One JSON record per line, appended as training goes (nothing is written where `path` is None)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def rewind(self, epoch: int, step: int) -> None:
        """Resuming from the checkpoint taken after `epoch` epochs (`step` steps): drop what the interrupted run
        logged after it, which the resumed run logs again, so that every record appears exactly once."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            event = record.get("event")
            if event == "start" or (event is None and record["step"] < step) or (event == "epoch" and record["epoch"] < epoch):
                kept.append(line + "\n")
        with atomic_output(self.path, force=True) as tmp:
            tmp.write_text("".join(kept))


class GradientFlowProbe:
    """Per-layer gradient variance, gradient change and mask flips between logs.

    Flips are those of the mask the layer actually uses at that step (a frozen mask, the current SDGF stage, MDGF's
    binary E). A dense step has no mask: there the probe follows the magnitude mask at the target pattern, so that
    dense training can be compared with the sparse recipes (methods.md §5); `mask` in each record says which.
    """

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
            pattern = param.pattern()
            if pattern is not None:
                mask, which = param.keep_mask(weight, pattern), "in use"
            else:
                mask, which = nm_mask(weight.detach(), self.target, param.layout), "target"
            entry = {"grad_var": float(grad.var()), "grad_norm": float(grad.norm()), "mask": which}
            if name in self.last_grad:
                entry["grad_change_norm"] = float((grad - self.last_grad[name]).norm())
                entry["mask_flip_rate"] = float((mask != self.last_mask[name]).float().mean())
            self.last_grad[name], self.last_mask[name] = grad.clone(), mask
            out[name] = entry
        return out
