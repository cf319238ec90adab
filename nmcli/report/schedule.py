"""What a recipe will do over a run: phases, structure stages, alpha at key points, training FLOPs.

Backs `nmsparse recipe show`; the numbers come from the same pure functions the training loop uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nmcli.methods.plan import plan_spans, plan_step, relative_training_flops, training_density
from nmcli.models.architecture import ModelRef
from nmcli.nm import NMPattern
from nmcli.methods.recipes import Recipe
from nmcli.methods.schedules import Phases


CURVE_POINTS = 2000  # steps sampled for the plot: enough for a smooth line, bounded for any run length


def describe_schedule(recipe: Recipe, target: NMPattern, steps: int, model: ModelRef | None = None) -> dict[str, Any]:
    """Phases, stages, alpha and cost of a run of `steps`, computed per span of constant plan (never per step)."""
    phases = Phases.from_fractions(steps, recipe.dense_fraction, recipe.finetune_fraction)
    segments: list[dict[str, Any]] = []
    for start, end in plan_spans(recipe, target, phases):
        plan = plan_step(recipe, target, phases, start)
        key = (plan.phase, str(plan.pattern) if not plan.dense else "dense")
        if segments and (segments[-1]["phase"], segments[-1]["pattern"]) == key:
            segments[-1]["end"] = end
        else:
            segments.append({"phase": key[0], "pattern": key[1], "start": start, "end": end})
    decay = range(phases.dense_end, phases.finetune_start)
    key_points = sorted({decay[int(f * (len(decay) - 1))] for f in (0, 0.25, 0.5, 0.75, 1.0)} if decay else set())
    if model is not None:
        from nmcli.models.architecture import build_model
        from nmcli.models.targets import layers_of_model, select_targets
        from nmcli.report.flops import per_layer_flops

        meta = build_model(model)
        _, total, per_layer = per_layer_flops(model)
        targets = select_targets(layers_of_model(meta, model), recipe.include, recipe.exclude)
        layers = {
            l.module: (per_layer.get(l.module, 0), meta.get_submodule(l.module).weight.shape[l.layout.k_axis])
            for l in targets.values()
        }
        cost_scope = f"whole model {model.name}"
    else:  # one stand-in layer holding all the FLOPs: the target layers' average density
        layers, total = {"targets": (1, None)}, 1
        cost_scope = "target layers only (pass --model for the whole model)"
    curve_steps = sorted({round(i * (steps - 1) / max(1, CURVE_POINTS - 1)) for i in range(min(steps, CURVE_POINTS))}
                         | {s["start"] for s in segments})
    curve = [(s, plan_step(recipe, target, phases, s)) for s in curve_steps]
    return {
        "recipe": recipe.name,
        "method": recipe.method.value,
        "pattern": str(target),
        "steps": steps,
        "phases": {"dense_end": phases.dense_end, "finetune_start": phases.finetune_start, "total": steps},
        "segments": segments,
        "alpha": [{"step": s, "alpha": plan_step(recipe, target, phases, s).alpha} for s in key_points],
        "training_flops_relative_to_dense": relative_training_flops(recipe, target, phases, layers, total),
        "training_flops_scope": cost_scope,
        "curve": [{"step": s, "alpha": p.alpha, "density": training_density(p), "pattern": p.label()} for s, p in curve],
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
