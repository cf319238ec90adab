"""`nmsparse report`: per-layer N:M compliance, sparsity and FLOPs; `--check` gates a pipeline."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nmcli.commands.common import (
    EXIT_CHECK_FAILED,
    CheckpointOpt,
    ExcludeOpt,
    IncludeOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    Source,
    out,
    print_json,
    user_errors,
)
from nmcli.commands.progress import progress_bar
from nmcli.nm import parse_pattern


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
    from nmcli.models.resolve import resolve
    from nmcli.report import build_report, render_report

    with user_errors():
        check_pattern = parse_pattern(check) if check is not None else None
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
