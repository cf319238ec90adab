"""The prune plan every one-shot method and export shares: which layers take which N:M pattern, which are skipped
and why, the plan a checkpoint declares, and the plan applied to a loaded model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from nmcli.errors import NMSparseError
from nmcli.io.metadata import SparsityMetadata
from nmcli.models.architecture import ModelRef
from nmcli.models.resolve import Resolved
from nmcli.models.targets import LayerInfo, select_targets
from nmcli.nm import (
    MASKABLE_DTYPES,
    NMPattern,
    apply_nm_,
    parse_pattern,
    reduction_length,
)


@dataclass
class PrunePlan:
    """Which tensors get the pattern and which targets cannot take it (with the reason). `own` holds the targets
    whose pattern is not `pattern` (prune --budget chose it, or a file declares it)."""

    pattern: NMPattern
    targets: dict[str, LayerInfo]
    skipped: dict[str, str] = field(default_factory=dict)
    own: dict[str, NMPattern] = field(default_factory=dict)

    def pattern_of(self, name: str) -> NMPattern:
        """Target `name`'s pattern."""
        return self.own.get(name, self.pattern)

    def module_patterns(self) -> dict[str, NMPattern]:
        """`own` keyed by module name (what a loaded model's layers are called)."""
        return {self.targets[name].module: pattern for name, pattern in self.own.items()}

    def patterns(self) -> list[NMPattern]:
        """The patterns the targets hold, densest first."""
        return sorted({self.pattern_of(name) for name in self.targets}, key=lambda p: (-p.density, p.m))

    def metadata(self, model: ModelRef | None) -> SparsityMetadata:
        """What prune, finetune and the exports write: pattern, convention, N:M layers and their K axes."""
        return SparsityMetadata(
            pattern=self.pattern,
            layers={
                name: {"layout": layer.layout.name, "k_axis": layer.layout.k_axis, "pattern": str(self.pattern_of(name))}
                for name, layer in self.targets.items()
            },
            skipped=self.skipped,
            model=model.to_json() if model else None,
        )


def plan_prune(
    resolved: Resolved, pattern: NMPattern, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> PrunePlan:
    """Targets per methods.md §4; a layer whose K is not divisible by M is skipped, never padded, and so is one whose
    dtype cannot be masked (float8, integers). A plan with no target at all is an error, for every command."""
    plan = PrunePlan(pattern, {})
    for name, layer in select_targets(resolved.layers, include, exclude).items():
        info = resolved.checkpoint.infos[name]
        k = reduction_length(info.shape, layer.layout)
        if info.dtype not in MASKABLE_DTYPES:
            plan.skipped[name] = f"dtype {str(info.dtype).removeprefix('torch.')} cannot be masked (N:M takes fp16, bf16, fp32, fp64)"
        elif k % pattern.m:
            plan.skipped[name] = f"K={k} not divisible by M={pattern.m}"
        else:
            plan.targets[name] = layer
    if not plan.targets:
        reasons = sorted(set(plan.skipped.values()))
        why = f" ({'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})" if reasons else ""
        raise NMSparseError(f"{resolved.checkpoint.where}: no layer can take {pattern}{why}; see `nmsparse report`")
    return plan


def declared_plan(resolved: Resolved) -> PrunePlan | None:
    """The plan a prune/finetune output declares: its N:M layers, each with its own pattern (None: declares none)."""
    declared = resolved.declared
    if declared is None:
        return None
    own = {name: parse_pattern(entry["pattern"]) for name, entry in declared.layers.items() if "pattern" in entry}
    return PrunePlan(declared.pattern, resolved.declared_targets(), dict(declared.skipped),
                     {name: p for name, p in own.items() if p != declared.pattern})


def prune_model_(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """The plan's N:M applied in place to a loaded model's target weights (what `prune` does to the file)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in plan.targets.items():
            apply_nm_(modules[layer.module].weight.data, plan.pattern_of(name), layer.layout)
    return model
