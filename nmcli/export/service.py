"""`nmsparse export`: choose the N:M tensors, check (or prune) them, and write the requested format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nmcli.models.resolve import Resolved
from nmcli.errors import NMSparseError
from nmcli.export.formats import (
    ExportResult,
    check_compliance,
    export_compressed_tensors,
    export_dense,
    export_nm,
    fits_two_four,
    sparsity_plan,
)
from nmcli.io.atomic import check_writable
from nmcli.io.rewrite import Progress
from nmcli.nm import NMPattern

FORMATS = ("nm", "compressed-tensors", "onnx", "dense")


def run_export(
    resolved: Resolved,
    fmt: str,
    out: Path,
    *,
    pattern: NMPattern | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    prune: bool = False,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = lambda name, done: None,
) -> ExportResult:
    if fmt not in FORMATS:
        raise NMSparseError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_writable(out, force)
    if prune and pattern is None:
        raise NMSparseError("--prune needs --pattern N:M: the pattern to prune to")
    plan = sparsity_plan(resolved, pattern, include, exclude)
    if fmt == "compressed-tensors" and not any(fits_two_four(p) for p in plan.patterns()):
        raise NMSparseError(
            f"compressed-tensors sparse-24-bitmask stores 2:4 (or sparser N:M that fits it); "
            f"{', '.join(map(str, plan.patterns()))} does not fit: use --format nm"
        )
    check_compliance(resolved, plan, prune)
    if fmt == "nm":
        if resolved.checkpoint.folder is None and out.suffix != ".safetensors":
            raise NMSparseError(f"--out {out}: the nm export of a single checkpoint is a .safetensors file")
        return export_nm(resolved, plan, out, prune=prune, force=force, progress=progress)
    if fmt == "dense":
        return export_dense(resolved, plan, out, prune=prune, force=force, progress=progress)
    if fmt == "compressed-tensors":
        return export_compressed_tensors(resolved, plan, out, prune=prune, force=force, progress=progress)
    from nmcli.export.onnx_export import export_onnx

    if out.suffix != ".onnx":
        raise NMSparseError(f"--out {out}: an ONNX export is a .onnx file")
    return export_onnx(resolved, plan, out, prune=prune, force=force, external_data=external_data)
