"""What a recipe will do over a run: phases, structure stages, alpha at key points, training FLOPs.

Backs `nmsparse recipe show`; the numbers come from the same pure functions the training loop uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nmcli.methods.plan import plan_step, relative_training_flops, training_density
from nmcli.models import ModelRef
from nmcli.nm import NMPattern
from nmcli.recipes import Recipe
from nmcli.schedules import Phases


def describe_schedule(recipe: Recipe, target: NMPattern, steps: int, model: ModelRef | None = None) -> dict[str, Any]:
    phases = Phases.from_fractions(steps, recipe.dense_fraction, recipe.finetune_fraction)
    plans = [plan_step(recipe, target, phases, s) for s in range(steps)]
    segments: list[dict[str, Any]] = []
    for step, plan in enumerate(plans):
        key = (plan.phase, str(plan.pattern) if not plan.dense else "dense")
        if not segments or (segments[-1]["phase"], segments[-1]["pattern"]) != key:
            segments.append({"phase": key[0], "pattern": key[1], "start": step, "end": step + 1})
        else:
            segments[-1]["end"] = step + 1
    decay = range(phases.dense_end, phases.finetune_start)
    key_points = sorted({decay[int(f * (len(decay) - 1))] for f in (0, 0.25, 0.5, 0.75, 1.0)} if decay else set())
    if model is not None:
        from nmcli.models import build_model, layers_of_model, select_targets
        from nmcli.report.flops import per_layer_flops

        meta = build_model(model)
        _, total, per_layer = per_layer_flops(model)
        targets = select_targets(layers_of_model(meta, model), recipe.include, recipe.exclude)
        layers = {
            l.module: (per_layer.get(l.module, 0), meta.get_submodule(l.module).weight.shape[l.layout.k_axis])
            for l in targets.values()
        }
        cost = relative_training_flops(recipe, target, phases, layers, total)
        cost_scope = f"whole model {model.name}"
    else:
        cost = sum(training_density(p) for p in plans) / steps
        cost_scope = "target layers only (pass --model for the whole model)"
    return {
        "recipe": recipe.name,
        "method": recipe.method,
        "pattern": str(target),
        "steps": steps,
        "phases": {"dense_end": phases.dense_end, "finetune_start": phases.finetune_start, "total": steps},
        "segments": segments,
        "alpha": [{"step": s, "alpha": plans[s].alpha} for s in key_points],
        "training_flops_relative_to_dense": cost,
        "training_flops_scope": cost_scope,
        "curve": [{"step": s, "alpha": p.alpha, "density": training_density(p), "pattern": p.label()} for s, p in enumerate(plans)],
    }


def plot_schedule(description: dict[str, Any], path: Path) -> None:
    """Alpha and the target layers' density over the run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = description["curve"]
    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(steps, [c["alpha"] for c in curve], label="alpha (mask value of pruned weights)")
    ax.plot(steps, [c["density"] for c in curve], label="training density of target layers", linestyle="--")
    for segment in description["segments"][1:]:
        ax.axvline(segment["start"], color="grey", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"{description['recipe']} at {description['pattern']} over {description['steps']} steps")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
