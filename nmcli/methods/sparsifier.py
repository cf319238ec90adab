"""Attach N:M masks to a model's target layers without editing model code, and remove them at the end.

Masks are attached with `torch.nn.utils.parametrize` (as torch.ao.pruning does): each target weight becomes
`original` + an `NMWeight` parametrization that forms the effective weight every forward pass. `finalize`
removes the parametrizations and leaves plain weights with exact zeros at the target pattern.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmcli.methods.effective import effective_weight
from nmcli.methods.plan import StepPlan
from nmcli.models.targets import LayerInfo
from nmcli.nm import Layout, NMPattern, apply_nm_, nm_mask
from nmcli.schedules import pattern_for_layer


class NMWeight(nn.Module):
    """Parametrization W -> W_eff for one layer; the sparsifier sets its state before every step."""

    def __init__(self, layout: Layout, reduction_length: int):
        super().__init__()
        self.layout = layout
        self.reduction_length = reduction_length
        self.plan: StepPlan | None = None
        self.frozen: torch.Tensor | None = None

    def pattern(self) -> NMPattern | None:
        if self.plan is None or self.plan.dense:
            return None
        return pattern_for_layer(list(self.plan.stages), self.plan.stage, self.reduction_length)

    def keep_mask(self, weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
        """The binary mask E in use at `pattern` (this layer's `pattern()`): the frozen one, else from `weight`."""
        if self.frozen is not None:
            return self.frozen
        return nm_mask(weight.detach(), pattern, self.layout)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        plan, pattern = self.plan, self.pattern()
        if plan is None or pattern is None or pattern.is_dense:
            return weight
        if plan.freeze and self.frozen is None:
            self.frozen = nm_mask(weight.detach(), pattern, self.layout)
        return effective_weight(
            weight, self.keep_mask(weight, pattern), alpha=plan.alpha, sr_lambda=plan.sr_lambda, backward=plan.backward
        )


class Sparsifier:
    """The target layers of one model and their parametrizations."""

    def __init__(self, model: nn.Module, targets: dict[str, LayerInfo]):
        self.model = model
        self.targets = targets
        self.params: dict[str, NMWeight] = {}

    def modules(self) -> Iterator[tuple[str, nn.Module]]:
        by_name = dict(self.model.named_modules())
        for layer in self.targets.values():
            yield layer.module, by_name[layer.module]

    def attach(self) -> Sparsifier:
        for name, module in self.modules():
            layer = self.targets[f"{name}.weight"]
            param = NMWeight(layer.layout, module.weight.shape[layer.layout.k_axis])
            parametrize.register_parametrization(module, "weight", param, unsafe=True)
            self.params[name] = param
        return self

    def set_plan(self, plan: StepPlan) -> None:
        for param in self.params.values():
            if not plan.freeze:
                param.frozen = None
            param.plan = plan

    def original(self, name: str) -> torch.Tensor:
        """The dense master weight the optimizer updates."""
        return dict(self.model.named_modules())[name].parametrizations.weight.original

    def masks_state(self) -> dict[str, torch.Tensor]:
        """Frozen masks, the only mask state that cannot be re-derived from the weights (for checkpoints)."""
        return {name: p.frozen for name, p in self.params.items() if p.frozen is not None}

    def load_masks_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, mask in state.items():
            self.params[name].frozen = mask.bool()

    def finalize(self, target: NMPattern | None) -> None:
        """Remove the parametrizations; with a target, weights become exactly N:M (frozen mask, else magnitude)."""
        for name, module in self.modules():
            param = self.params.pop(name)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            if target is None:
                continue
            with torch.no_grad():
                if param.frozen is not None:
                    module.weight.mul_(param.frozen)
                else:
                    apply_nm_(module.weight.data, target, param.layout)
