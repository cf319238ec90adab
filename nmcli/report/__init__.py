"""Per-layer N:M compliance, sparsity and FLOPs of a checkpoint."""

from nmcli.report.render import render_report
from nmcli.report.summary import Report, build_report

__all__ = ["Report", "build_report", "render_report"]
