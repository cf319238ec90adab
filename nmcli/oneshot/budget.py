"""`prune --budget S`: each layer's pattern chosen from the candidates so that the target layers together are at
least S sparse, at the least summed sensitivity (sensitivity.py measures, allocation.py chooses). Layers chosen
dense leave the plan (listed as skipped, with their cost); the others keep their own pattern in the plan and in
the output's metadata.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nmcli.nm import NMPattern
from nmcli.oneshot.allocation import allocate
from nmcli.oneshot.sensitivity import layer_candidates, measure_sensitivity, probe_batch
from nmcli.oneshot.plan import PrunePlan


KEPT_DENSE = "kept dense by --budget"  # the skipped reason of a layer the budget left dense


@dataclass(frozen=True)
class BudgetSettings:
    sparsity: float  # zeros / weights over the target layers, at least
    candidates: tuple[NMPattern, ...]  # DENSE (1:1) among them when a layer may stay dense


@dataclass
class BudgetReport:
    sparsity: float  # asked
    reached: float
    patterns: dict[str, str] = field(default_factory=dict)  # target tensor -> chosen pattern ("dense")
    costs: dict[str, float] = field(default_factory=dict)  # target tensor -> sensitivity of its choice
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.patterns.values()).most_common())

    def note(self) -> str:
        layers = ", ".join(f"{pattern} x {count}" for pattern, count in self.counts().items())
        return (f"--budget {self.sparsity:g}: {layers} layers, overall sparsity {self.reached:.4f} over the target "
                f"layers (sensitivity measured in {self.seconds:.1f}s)")

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity, "reached": round(self.reached, 6), "counts": self.counts(),
                "patterns": self.patterns, "costs": {k: round(v, 8) for k, v in self.costs.items()},
                "seconds": self.seconds}


def _label(pattern: NMPattern) -> str:
    return "dense" if pattern.is_dense else str(pattern)


def budget_plan(model: nn.Module, plan: PrunePlan, settings: BudgetSettings, batches: list[dict],
                norms: dict[str, torch.Tensor] | None,
                progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[PrunePlan, BudgetReport]:
    """The plan with each target's pattern chosen (dense ones skipped); `norms` (module -> ‖x_j‖) make the
    sensitivity probe mask by Wanda's criterion, None by magnitude."""
    by_module = {layer.module: layer for layer in plan.targets.values()}
    modules = dict(model.named_modules())
    shapes = {name: modules[name].weight.shape for name in by_module}
    candidates = layer_candidates(shapes, by_module, list(settings.candidates))
    measured = measure_sensitivity(model, by_module, candidates, probe_batch(batches), norms, progress)
    sizes = {name: shapes[name].numel() for name in by_module}
    chosen = allocate(measured.costs, sizes, settings.sparsity)
    report = BudgetReport(settings.sparsity, chosen.sparsity, seconds=measured.seconds)
    held: Counter[NMPattern] = Counter()
    for name, layer in plan.targets.items():
        pattern = chosen.patterns[layer.module]
        report.patterns[name] = _label(pattern)
        report.costs[name] = measured.costs[layer.module][pattern]
        if not pattern.is_dense:
            held[pattern] += sizes[layer.module]
    main = held.most_common(1)[0][0] if held else plan.pattern
    new = PrunePlan(main, {}, dict(plan.skipped))
    for name, layer in plan.targets.items():
        pattern = chosen.patterns[layer.module]
        if pattern.is_dense:
            least = min(c for p, c in measured.costs[layer.module].items() if not p.is_dense)
            new.skipped[name] = f"{KEPT_DENSE} (its cheapest N:M candidate costs {least:.3g})"
        else:
            new.targets[name] = layer
            if pattern != main:
                new.own[name] = pattern
    return new, report
