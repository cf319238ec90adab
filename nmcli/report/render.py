"""Render a Report as a rich table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nmcli.nm import CONVENTION
from nmcli.report.summary import Report


def _fmt_flops(value: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}FLOPs"
    return f"{value} FLOPs"


def render_report(report: Report, console: Console) -> None:
    table = Table(title=f"N:M report — {report.source}", title_justify="left")
    for header, justify in (
        ("layer", "left"), ("shape", "left"), ("K", "right"), ("pattern", "left"), ("compliance", "right"),
        ("violating", "right"), ("max nz/grp", "right"), ("density", "right"), ("2:4 TC", "left"),
        ("status", "left"),
    ):
        table.add_column(header, justify=justify, overflow="fold")
    for row in report.rows:
        style = "dim" if row.status == "excluded" else ("yellow" if row.status == "skipped" else None)
        if row.compliance is not None and row.compliance < 1.0:
            style = "red"
        status = row.status if not row.reason else f"{row.status}: {row.reason}"
        if row.nonfinite:
            status += f" ({row.nonfinite} NaN/Inf)"
        table.add_row(
            row.name,
            "x".join(map(str, row.shape)),
            str(row.k_axis),
            f"{row.pattern} {row.pattern_source}" if row.pattern else "-",
            f"{100 * row.compliance:.2f}%" if row.compliance is not None else "-",
            str(row.violating_groups) if row.violating_groups is not None else "-",
            str(row.max_nonzeros_per_group) if row.max_nonzeros_per_group is not None else "-",
            f"{row.density:.4f}",
            row.tc24,
            status,
            style=style,
        )
    console.print(table)
    summary = report.to_json()["summary"]
    console.print(
        f"params {summary['params']:,} | N:M target params {summary['target_params']:,} "
        f"({summary['target_layers']} layers, {summary['skipped_layers']} skipped) | "
        f"target sparsity {100 * summary['target_sparsity']:.2f}% | overall sparsity "
        f"{100 * summary['overall_sparsity']:.2f}%"
    )
    if report.flops is not None:
        f = report.flops
        console.print(
            f"FLOPs (2 x MACs, one forward, input {list(f.input_shape)}): dense {_fmt_flops(f.dense)} | "
            f"theoretical sparse {_fmt_flops(f.sparse)} ({f.sparse / f.dense:.3f}x) | "
            f"2:4 tensor-core effective {_fmt_flops(f.hw24)} ({f.hw24 / f.dense:.3f}x)"
        )
    console.print(f"convention: N:M = {CONVENTION}", style="dim")
    for note in report.notes:
        console.print(Text.assemble(("note:", "yellow"), f" {note}"))
    if report.check is not None:
        if report.passed:
            console.print(f"check {report.check}: all {len(report.targets)} target layers comply", style="green")
        else:
            names = ", ".join(r.name for r in report.failing[:5]) or "no target layers"
            console.print(f"check {report.check}: {len(report.failing)} layer(s) do not comply: {names}", style="red")
