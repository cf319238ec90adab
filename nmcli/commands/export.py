"""`nmsparse export`: nm (compressed, any N:M), compressed-tensors (2:4), ONNX or dense."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nmcli.commands.common import (
    PATTERN_HELP,
    CheckpointOpt,
    ExcludeOpt,
    ForceOpt,
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
from nmcli.commands.progress import with_byte_progress
from nmcli.nm import CONVENTION, parse_pattern


def export(
    source: Source,
    fmt: Annotated[str, typer.Option("--format", "-f", help="nm | compressed-tensors | onnx | dense")] = "nm",
    out_path: Annotated[Path, typer.Option("--out", "-o", help="output file (.safetensors / .onnx) or folder")] = ...,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    pattern: Annotated[
        Optional[str], typer.Option("--pattern", "-p", help=PATTERN_HELP + "; default: the one the file declares")
    ] = None,
    prune_first: Annotated[bool, typer.Option("--prune", help="prune to --pattern on the way")] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    external_data: Annotated[
        Optional[bool], typer.Option("--external-data/--no-external-data", help="ONNX: weights in a .data file (auto over 2 GB)")
    ] = None,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a sparse checkpoint as nm (compressed, any N:M), compressed-tensors (2:4), ONNX, or dense."""
    from nmcli.export.service import run_export
    from nmcli.models.resolve import resolve

    with user_errors():
        nm = parse_pattern(pattern) if pattern is not None else None
        resolved = resolve(source, model=model, checkpoint=checkpoint, seed=seed)
        infos = resolved.checkpoint.infos
        result = with_byte_progress(
            "exporting", infos, not (quiet or as_json),
            lambda progress: run_export(
                resolved, fmt, out_path, pattern=nm, include=include or (), exclude=exclude or (), prune=prune_first,
                force=force, external_data=external_data, progress=progress,
            ),
        )
        dense_bytes = sum(i.nbytes for i in infos.values())
        written = _size([result.out, *result.extra_files])
    payload = {
        "out": str(result.out), "format": result.format, "nm_layers": result.nm_layers, "dense_layers": result.dense_layers,
        "bytes": written, "dense_bytes": dense_bytes, "notes": result.notes, "convention": CONVENTION,
    }
    if as_json:
        print_json(payload)
        return
    for note in result.notes if not quiet else []:
        out.print(f"note: {note}")
    out.print(
        f"exported {len(result.nm_layers)} N:M layers as {result.format} -> {result.out} "
        f"({written / 2**20:.2f} MiB, {100 * written / max(dense_bytes, 1):.1f}% of the dense checkpoint)"
    )


def _size(paths: list[Path]) -> int:
    """Bytes written: files, and every file inside folders."""
    files = [f for p in paths for f in ([q for q in p.rglob("*") if q.is_file()] if p.is_dir() else [p])]
    return sum(f.stat().st_size for f in files)
