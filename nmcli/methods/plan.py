"""What each recipe does at a given training step (methods.md §2-3), as a pure function of the step."""

from __future__ import annotations

from dataclasses import dataclass

from nmcli.nm import NMPattern, parse_pattern
from nmcli.methods.recipes import MaskDecay, Method, Recipe
from nmcli.methods.schedules import (
    Phase,
    Phases,
    alpha,
    decay_rate,
    geometric_stages,
    pattern_for_layer,
    stage_bounds,
    stage_index,
    stepwise_stages,
)


@dataclass(frozen=True)
class StepPlan:
    """How every target layer forms its effective weight at one step."""

    phase: Phase
    stages: tuple[NMPattern, ...]  # the structure sequence (one entry unless SDGF)
    stage: int  # index into `stages` (layers that cannot take it hold at a later one)
    alpha: float = 0.0  # mask value of pruned weights (MDGF)
    sr_lambda: float = 0.0  # SR-STE pull on pruned weights
    backward: str = "ste"  # "ste": dW = g; "scaled": dW = g * (E + alpha (1 - E))
    freeze: bool = False  # keep the mask fixed from the first step it is frozen

    @property
    def dense(self) -> bool:
        return self.phase is Phase.DENSE

    @property
    def pattern(self) -> NMPattern:
        return self.stages[self.stage]

    @property
    def at_last_stage(self) -> bool:
        """At the recipe's target pattern, where a layer's own pattern (a --budget start) takes its place."""
        return self.stage == len(self.stages) - 1

    def label(self) -> str:
        if self.dense:
            return "dense"
        text = str(self.pattern)
        return f"{text} a={self.alpha:.3f}" if self.alpha > 0 else text


def structure_stages(recipe: Recipe, target: NMPattern) -> tuple[NMPattern, ...]:
    sd = recipe.structure_decay
    if sd is None:
        return (target,)
    if sd.schedule == "stepwise":
        return tuple(stepwise_stages(target))
    if sd.schedule == "geometric":
        return tuple(geometric_stages(target))
    stages = [parse_pattern(s, allow_dense=True) for s in sd.stages]
    return tuple(stages if stages[-1] == target else [*stages, target])


def _alpha(md: MaskDecay, t: int, length: int) -> float:
    rate = md.rate if md.rate is not None else (decay_rate(md.schedule, length, md.reach_at) if md.reach_at else 0.0)
    return alpha(md.schedule, t, rate=rate, interval=md.interval, step_size=md.step_size or 0.0)


def plan_step(recipe: Recipe, target: NMPattern, phases: Phases, step: int) -> StepPlan:
    """The recipe's rule for `step`; the same inputs always give the same plan (resume relies on it)."""
    stages = structure_stages(recipe, target)
    last = len(stages) - 1
    phase = phases.phase(step)
    if not recipe.method.sparse or phase is Phase.DENSE:
        return StepPlan(Phase.DENSE, stages, last)
    sr_lambda = recipe.sr_ste_lambda or 0.0
    if phase is Phase.FINETUNE or recipe.method.fixed_pattern:
        fixed = recipe.method is Method.FIXED_MASK
        return StepPlan(
            phase,
            stages,
            last,
            sr_lambda=sr_lambda,
            backward="scaled" if fixed else "ste",  # fixed mask: gradient of pruned weights zeroed
            freeze=fixed or (phase is Phase.FINETUNE and recipe.finetune_mask == "frozen"),
        )
    t, length = phases.clock(step), phases.decay_length
    index = stage_index(t, length, len(stages)) if recipe.method.decays_structure else last
    md = recipe.mask_decay  # present exactly for the MDGF methods (recipe validation)
    if md is None:
        return StepPlan(Phase.DECAY, stages, index, sr_lambda=sr_lambda)
    if recipe.method.decays_structure:  # mdgf+sdgf: alpha restarts and decays within each structure stage
        start, end = stage_bounds(index, length, len(stages))
        a = _alpha(md, t - start, end - start)
    else:
        a = _alpha(md, t, length)
    return StepPlan(Phase.DECAY, stages, index, alpha=a, sr_lambda=sr_lambda, backward=md.backward)


def training_density(plan: StepPlan, reduction_length: int | None = None, own: NMPattern | None = None) -> float:
    """Cost factor of a target layer at this step (methods.md §5): dense 1, MDGF while alpha > 0 dense, else N/M
    (`own`: the layer's own pattern in place of the last stage's)."""
    if plan.dense or plan.alpha > 0:
        return 1.0
    if own is not None and plan.at_last_stage:
        return own.density
    if reduction_length is None:
        return plan.pattern.density
    return pattern_for_layer(list(plan.stages), plan.stage, reduction_length).density


def plan_spans(recipe: Recipe, target: NMPattern, phases: Phases) -> list[tuple[int, int]]:
    """[start, end) step ranges over which phase and structure stage stay the same (alpha may still decay)."""
    cuts = {0, phases.dense_end, phases.finetune_start, phases.total}
    if recipe.method.decays_structure:
        count = len(structure_stages(recipe, target))
        cuts |= {phases.dense_end + stage_bounds(i, phases.decay_length, count)[0] for i in range(count)}
    ordered = sorted(c for c in cuts if 0 <= c <= phases.total)
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if a < b]


def uniform_spans(recipe: Recipe, target: NMPattern, phases: Phases) -> list[tuple[int, int, StepPlan]]:
    """Spans over which the training density of every layer is constant, with the plan at each span's start.

    Within a span of `plan_spans` alpha never increases, so one bisection finds where it reaches 0: the cost of a
    schedule is a sum over a handful of spans, not a loop over (possibly millions of) steps.
    """
    out = []
    for start, end in plan_spans(recipe, target, phases):
        lo, hi = start, end
        while lo < hi:  # first step of the span with alpha == 0
            mid = (lo + hi) // 2
            if plan_step(recipe, target, phases, mid).alpha > 0:
                lo = mid + 1
            else:
                hi = mid
        out += [(a, b, plan_step(recipe, target, phases, a)) for a, b in ((start, lo), (lo, end)) if a < b]
    return out


def relative_training_flops(
    recipe: Recipe, target: NMPattern, phases: Phases, layers: dict[str, tuple[int, int | None]], total_flops: int,
    own: dict[str, NMPattern] | None = None,
) -> float:
    """Training FLOPs of the recipe relative to dense training of the same steps (methods.md §5).

    `layers`: target module -> (dense forward FLOPs, reduction length K, or None for the pattern's own density);
    `own`: module -> its pattern where it is not the recipe's.
    Training costs ~3x the forward pass per step (forward, gradient of the inputs, gradient of the weights), with
    each target layer scaled by its density at that step; the factor 3 cancels in the ratio. A LoRA recipe
    computes no weight gradient but the adapters' (rank / K of a layer's, left out): 2 of the 3 passes.
    """
    if total_flops <= 0 or phases.total <= 0:
        return 1.0
    spent = 0.0
    for start, end, plan in uniform_spans(recipe, target, phases):
        spent += (end - start) * (total_flops - sum(
            f * (1 - training_density(plan, k, (own or {}).get(module))) for module, (f, k) in layers.items()))
    passes = 2 / 3 if recipe.lora is not None else 1.0
    return passes * spent / (phases.total * total_flops)
