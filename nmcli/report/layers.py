"""Per-layer N:M statistics of a checkpoint: compliance, density, tensor-core eligibility."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nmcli.models.resolve import Resolved
from nmcli.models.targets import LayerInfo, select_targets
from nmcli.nm import (
    TWO_FOUR,
    NMPattern,
    compliance,
    count_nonfinite,
    detect_pattern,
    nonzero_fraction,
    parse_pattern,
    reduction_length,
)

TC_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "tf32", torch.int8: "int8"}


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    k_axis: int
    status: str  # "target" | "skipped" | "excluded"
    reason: str = ""
    pattern: str | None = None
    pattern_source: str = ""  # "declared" | "detected" | "checked"
    compliance: float | None = None
    violating_groups: int | None = None
    max_nonzeros_per_group: int | None = None
    density: float = 1.0
    nonfinite: int = 0
    tc24: str = ""  # "yes" or "no: why"
    params: int = 0


def _tc24(weight: torch.Tensor, layer: LayerInfo) -> str:
    """NVIDIA sparse tensor cores (ASP rules): exactly 2:4 along K, out % 8, K % 16, a supported dtype."""
    shape = weight.shape
    k = reduction_length(shape, layer.layout)
    out = shape[1] if layer.layout.k_axis == 0 else shape[0]
    if weight.dtype not in TC_DTYPES:
        return f"no: dtype {weight.dtype}"
    if k % 4 or not compliance(weight, TWO_FOUR, layer.layout).compliant:
        return "no: not 2:4"
    if out % 8 or k % 16:
        return f"no: out={out}%8 or K={k}%16"
    return "yes"


def _layer_sets(
    resolved: Resolved, check: NMPattern | None, include: Sequence[str], exclude: Sequence[str]
) -> tuple[dict[str, LayerInfo], dict[str, str], dict[str, NMPattern]]:
    """(targets, skipped reasons, declared patterns): from the file's metadata unless told otherwise."""
    declared = resolved.declared
    if declared is not None and not include and not exclude:
        targets = resolved.declared_targets()
        patterns = {name: parse_pattern(entry["pattern"]) for name, entry in declared.layers.items()}
        skipped = dict(declared.skipped)
    else:
        targets, skipped, patterns = select_targets(resolved.layers, include, exclude), {}, {}
    if check is not None:
        for name, layer in list(targets.items()):
            k = reduction_length(resolved.checkpoint.infos[name].shape, layer.layout)
            if k % check.m:
                skipped[name] = f"K={k} not divisible by M={check.m}"
                del targets[name]
    return targets, skipped, patterns


def layer_rows(
    resolved: Resolved,
    *,
    check: NMPattern | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: Callable[[str], None] = lambda name: None,
) -> list[LayerRow]:
    """One row per N:M-capable layer (targets, skipped targets, and layers not targeted by default)."""
    targets, skipped, declared = _layer_sets(resolved, check, include, exclude)
    ckpt = resolved.checkpoint
    rows = []
    names = [n for n in ckpt.infos if n in resolved.layers or n in targets or n in skipped]
    for name in names:
        layer = targets.get(name) or resolved.layers[name]
        weight = ckpt.read(name)
        row = LayerRow(
            name=name,
            shape=tuple(weight.shape),
            dtype=str(weight.dtype).removeprefix("torch."),
            layout=layer.layout.name,
            k_axis=layer.layout.k_axis,
            status="target",
            density=nonzero_fraction(weight),
            nonfinite=count_nonfinite(weight),
            params=weight.numel(),
            tc24=_tc24(weight, layer),
        )
        if name in skipped:
            row.status, row.reason = "skipped", skipped[name]
        elif name not in targets:
            why = layer.excluded_by_default or ("not declared N:M" if resolved.declared else "not selected")
            row.status, row.reason = "excluded", why
        else:
            pattern, row.pattern_source = check, "checked"
            if pattern is None:
                pattern, row.pattern_source = declared.get(name), "declared"
            if pattern is None:
                pattern, row.pattern_source = detect_pattern(weight, layer.layout), "detected"
            if pattern is not None:
                stats = compliance(weight, pattern, layer.layout)
                row.pattern = str(pattern)
                row.compliance = stats.fraction
                row.violating_groups = stats.violating_groups
                row.max_nonzeros_per_group = stats.max_nonzeros_per_group
            else:
                row.pattern_source = ""
        rows.append(row)
        progress(name)
    return rows
