"""`nmsparse recipes` (the built-ins) and `nmsparse recipe show` (what one recipe does over a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from nmcli.commands.common import PATTERN_HELP, ForceOpt, JsonOpt, ModelKwargsOpt, json_option, out, print_json, user_errors
from nmcli.nm import parse_pattern

recipe_app = typer.Typer(help="Inspect one recipe.", no_args_is_help=True)


def list_recipes(as_json: JsonOpt = False) -> None:
    """List the built-in recipes."""
    from rich.table import Table

    from nmcli.methods.recipes import builtin_names, load_recipe

    with user_errors():
        recipes = [load_recipe(name) for name in builtin_names()]
    if as_json:
        print_json([{"name": r.name, "method": r.method.value, "pattern": r.pattern, "description": r.description} for r in recipes])
        return
    table = Table("name", "method", "default pattern", "description")
    for r in recipes:
        table.add_row(r.name, r.method.value, r.pattern, r.description)
    out.print(table)


@recipe_app.command("show")
def recipe_show(
    name: Annotated[str, typer.Argument(help="built-in recipe name or YAML path")],
    pattern: Annotated[Optional[str], typer.Option("--pattern", "-p", help=PATTERN_HELP)] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="total training steps")] = 1000,
    model: Annotated[Optional[str], typer.Option("--model", help="timm model, for whole-model training FLOPs")] = None,
    model_kwargs: ModelKwargsOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write the schedule as a PNG")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The schedule a recipe follows: phases, stages, alpha at key points, training FLOPs vs dense."""
    from nmcli.io.atomic import atomic_output
    from nmcli.models.architecture import ModelRef
    from nmcli.methods.recipes import load_recipe
    from nmcli.report.schedule import describe_schedule, plot_schedule

    with user_errors():
        chosen = load_recipe(name).with_overrides(pattern=str(parse_pattern(pattern)) if pattern is not None else None)
        ref = ModelRef("timm", model, json_option(model_kwargs, "--model-kwargs")) if model else None
        described = describe_schedule(chosen, chosen.target, steps, ref)
        if plot is not None:
            with atomic_output(plot, force=force) as tmp:
                plot_schedule(described, tmp.with_suffix(".png"))
                tmp.with_suffix(".png").replace(tmp)
    if as_json:
        print_json({k: v for k, v in described.items() if k != "curve"})
        return
    out.print(Text.assemble((chosen.name, "bold"), f" ({chosen.method.value}) -> {described['pattern']} over {steps} steps: {chosen.description}"))
    for segment in described["segments"]:
        out.print(f"  steps {segment['start']:>6}-{segment['end'] - 1:<6} {segment['phase']:<8} {segment['pattern']}")
    if any(a["alpha"] for a in described["alpha"]):
        out.print("  alpha: " + ", ".join(f"step {a['step']}: {a['alpha']:.4f}" for a in described["alpha"]))
    if chosen.lora is not None:
        lora = chosen.lora
        out.print(f"  lora: rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.scale:g}), layers {', '.join(lora.targets)}; "
                  f"trains the adapters{' and norms / biases' if lora.train_norms else ''} only, merged under the mask"
                  + (f"; frozen weights held in {lora.base_dtype}" if lora.base_dtype != "float32" else ""))
    out.print(
        f"  training FLOPs relative to dense: {described['training_flops_relative_to_dense']:.3f}x "
        f"({described['training_flops_scope']})"
    )
    if plot is not None:
        out.print(f"  plot -> {plot}")
