"""The `nmsparse` command line: parse options, call one service, print. No math and no file logic here."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nmcli import __version__
from nmcli.errors import NMSparseError
from nmcli.nm import CONVENTION, parse_pattern

PATTERN_HELP = f"N:M pattern, keep-N convention ({CONVENTION}), e.g. 2:4, 1:8, 1:32"

app = typer.Typer(
    name="nmsparse",
    help=f"Make pretrained models N:M sparse. Pattern convention: N:M = {CONVENTION}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
if not out.is_terminal:  # piped output: wide enough that tables do not fold layer names
    out = Console(width=200)
err = Console(stderr=True)
STATE = {"debug": bool(os.environ.get("NMSPARSE_DEBUG"))}

EXIT_ERROR = 2
EXIT_CHECK_FAILED = 1

Source = Annotated[str, typer.Argument(help="safetensors file, sharded/Hugging Face folder, or timm model name")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="timm model name, for exact targets and FLOPs")]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option("--checkpoint", help="weights for a timm SOURCE: .safetensors or .pth (weights only)")
]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="only layers matching this glob (repeat)")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="skip layers matching this glob (repeat)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, only the result")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for random init of a timm SOURCE without --checkpoint")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One line on stderr and a non-zero exit for bad input; the traceback only with --debug."""
    try:
        yield
    except NMSparseError as exc:
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: nothing was written")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for users
        if STATE["debug"]:
            raise
        err.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} (run `nmsparse --debug ...` for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_ERROR) from None


def progress_bar(enabled: bool, unit: str = "tensors") -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit == "tensors" else TextColumn("{task.percentage:>5.1f}%"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[item]}", style="dim"),
        console=err,
        transient=True,
        disable=not enabled,
    )


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


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


@app.command()
def prune(
    source: Source,
    pattern: Annotated[str, typer.Option("--pattern", "-p", help=PATTERN_HELP)] = "2:4",
    out_path: Annotated[Path, typer.Option("--out", "-o", help="output .safetensors file (or folder for a folder)")] = ...,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """One-shot magnitude N:M pruning, streamed tensor by tensor (dense-shaped output with exact zeros)."""
    from nmcli.checkpoints import resolve
    from nmcli.io.atomic import check_writable
    from nmcli.prune import plan_prune
    from nmcli.prune import prune as run_prune

    with user_errors():
        nm = parse_pattern(pattern)
        check_writable(out_path, force)
        resolved = resolve(source, model=model, checkpoint=checkpoint, seed=seed)
        plan = plan_prune(resolved, nm, include or (), exclude or ())
        if not plan.targets:
            raise NMSparseError(f"{resolved.checkpoint.where}: no layer can take {nm}; see `nmsparse report`")
        infos = resolved.checkpoint.infos
        started = time.perf_counter()
        with progress_bar(not (quiet or as_json), unit="bytes") as bar:
            task = bar.add_task("pruning", total=sum(i.numel * i.dtype.itemsize for i in infos.values()), item="")
            result = run_prune(
                resolved, plan, out_path, force=force, progress=lambda name, n: bar.update(task, advance=n, item=name)
            )
        seconds = time.perf_counter() - started
    payload = {
        "out": str(result.out),
        "pattern": str(nm),
        "convention": CONVENTION,
        "pruned_layers": list(plan.targets),
        "skipped_layers": plan.skipped,
        "tensors": result.tensors,
        "bytes": result.bytes,
        "seconds": round(seconds, 3),
    }
    if as_json:
        print_json(payload)
        return
    if not quiet:
        for name, why in plan.skipped.items():
            out.print(f"[yellow]skipped[/yellow] {name}: {why}")
    out.print(
        f"pruned {len(plan.targets)} layers to {nm} ({len(plan.skipped)} skipped) in {seconds:.2f}s -> {result.out}"
    )


@app.command()
def report(
    source: Source,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    check: Annotated[
        Optional[str], typer.Option("--check", help="exit 0 only if every target layer complies with this N:M")
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    no_flops: Annotated[bool, typer.Option("--no-flops", help="skip the FLOP count")] = False,
    seq_len: Annotated[int, typer.Option("--seq-len", help="sequence length for Hugging Face FLOPs")] = 128,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer N:M compliance, sparsity and FLOPs (dense, theoretical sparse, 2:4 tensor-core effective)."""
    from nmcli.checkpoints import resolve
    from nmcli.report import build_report, render_report

    with user_errors():
        check_pattern = parse_pattern(check) if check else None
        resolved = resolve(source, model=model, checkpoint=checkpoint, seed=seed)
        with progress_bar(not (quiet or as_json)) as bar:
            task = bar.add_task("reading", total=len(resolved.layers) or None, item="")
            result = build_report(
                resolved,
                check=check_pattern,
                include=include or (),
                exclude=exclude or (),
                flops=not no_flops,
                seq_len=seq_len,
                progress=lambda name: bar.update(task, advance=1, item=name),
            )
    if as_json:
        print_json(result.to_json())
    elif quiet:
        if check_pattern is not None:
            out.print(f"check {check_pattern}: {'passed' if result.passed else 'FAILED'}")
    else:
        render_report(result, out)
    if check_pattern is not None and not result.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def main() -> None:
    app()
