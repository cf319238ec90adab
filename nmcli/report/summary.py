"""A whole-checkpoint report: per-layer rows, parameter totals, FLOPs and the --check verdict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from nmcli.models.resolve import Resolved
from nmcli.errors import NMSparseError
from nmcli.nm import CONVENTION, NMPattern
from nmcli.report.flops import Flops, count_flops
from nmcli.report.layers import LayerRow, layer_rows


@dataclass
class Report:
    source: str
    model: str | None
    rows: list[LayerRow]
    params: int
    target_params: int
    target_zeros: int
    zeros: int
    flops: Flops | None = None
    check: NMPattern | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[LayerRow]:
        return [r for r in self.rows if r.status == "target"]

    @property
    def failing(self) -> list[LayerRow]:
        """Target layers that do not comply with the checked pattern."""
        return [r for r in self.targets if r.compliance is None or r.compliance < 1.0]

    @property
    def passed(self) -> bool:
        return bool(self.targets) and not self.failing

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "model": self.model,
            "convention": CONVENTION,
            "summary": {
                "params": self.params,
                "target_params": self.target_params,
                "target_sparsity": self.target_zeros / self.target_params if self.target_params else 0.0,
                "overall_sparsity": self.zeros / self.params if self.params else 0.0,
                "target_layers": len(self.targets),
                "skipped_layers": sum(r.status == "skipped" for r in self.rows),
                "nonfinite_weights": sum(r.nonfinite for r in self.rows),
            },
            "flops": None
            if self.flops is None
            else {
                "unit": "FLOPs (2 x multiply-accumulates), one forward pass",
                "input_shape": list(self.flops.input_shape),
                "dense": self.flops.dense,
                "sparse_theoretical": self.flops.sparse,
                "hw_2to4_effective": self.flops.hw24,
            },
            "check": None if self.check is None else {"pattern": str(self.check), "passed": self.passed},
            "layers": [asdict(r) for r in self.rows],
            "notes": self.notes,
        }


def build_report(
    resolved: Resolved,
    *,
    check: NMPattern | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    flops: bool = True,
    seq_len: int = 128,
    progress: Callable[[str], None] = lambda name: None,
) -> Report:
    ckpt = resolved.checkpoint
    rows = layer_rows(resolved, check=check, include=include, exclude=exclude, progress=progress)
    by_name = {r.name: r for r in rows}
    params = zeros = 0
    for name, info in ckpt.infos.items():
        params += info.numel
        if name in by_name:
            zeros += round(by_name[name].params * (1 - by_name[name].density))
        elif info.dtype.is_floating_point:
            zeros += int(info.numel - ckpt.read(name).count_nonzero())
    targets = [r for r in rows if r.status == "target"]
    report = Report(
        source=ckpt.where,
        model=f"{resolved.model.source}:{resolved.model.name}" if resolved.model else None,
        rows=rows,
        params=params,
        target_params=sum(r.params for r in targets),
        target_zeros=sum(round(r.params * (1 - r.density)) for r in targets),
        zeros=zeros,
        check=check,
    )
    if not resolved.layers_exact and resolved.declared is None:
        report.notes.append(
            "no architecture known: layers were chosen by tensor shape and name; pass --model for exact targets"
        )
    if any(r.nonfinite for r in rows):
        bad = [r.name for r in rows if r.nonfinite]
        report.notes.append(f"non-finite (NaN/Inf) weights in {len(bad)} layer(s): {', '.join(bad[:5])}")
    if resolved.match is not None:
        report.notes.extend(resolved.match.notes())
    if flops and resolved.model is not None:
        _add_flops(report, resolved, seq_len)
    return report


def _add_flops(report: Report, resolved: Resolved, seq_len: int) -> None:
    """FLOPs per weight layer under the model's module names; an architecture that cannot be traced gets a note."""
    modules = {
        (resolved.layers[r.name].module if r.name in resolved.layers else r.name.removesuffix(".weight")): r
        for r in report.rows
    }
    try:
        report.flops = count_flops(
            resolved.model,
            {m: r.density for m, r in modules.items()},
            {m for m, r in modules.items() if r.tc24 == "yes"},
            seq_len,
        )
    except NMSparseError as exc:
        report.notes.append(f"FLOPs not counted: {exc}")
