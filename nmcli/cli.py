"""The `nmsparse` command line: the Typer app and its commands (one module each under nmcli/commands/).

The commands parse options, call one service and print; no math and no file logic here or there.
"""

from __future__ import annotations

from typing import Annotated

import typer

from nmcli import __version__
from nmcli.commands.common import STATE, out
from nmcli.commands.evaluate import evaluate
from nmcli.commands.export import export
from nmcli.commands.finetune import finetune
from nmcli.commands.prune import prune
from nmcli.commands.recipes import list_recipes, recipe_app
from nmcli.commands.report import report
from nmcli.commands.study import study
from nmcli.nm import CONVENTION

app = typer.Typer(
    name="nmsparse",
    help=f"Make pretrained models N:M sparse. Pattern convention: N:M = {CONVENTION}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"nmsparse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Make pretrained models N:M sparse (keep-N: at most N non-zeros in every M weights along K)."""
    STATE["debug"] = STATE["debug"] or debug


app.command()(prune)
app.command()(report)
app.command("eval")(evaluate)
app.command()(finetune)
app.command("recipes")(list_recipes)
app.add_typer(recipe_app, name="recipe")
app.command()(export)
app.command()(study)


def main() -> None:
    app()
