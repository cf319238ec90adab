"""How far a tensor is from an N:M pattern, and which pattern it already satisfies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmcli.nm.layout import Layout, to_groups
from nmcli.nm.pattern import NMPattern

DETECTABLE_GROUP_SIZES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Compliance:
    """Group statistics of one tensor against one pattern."""

    pattern: NMPattern
    groups: int
    violating_groups: int
    max_nonzeros_per_group: int

    @property
    def fraction(self) -> float:
        """Fraction of groups with at most N non-zeros (1.0 when there are no groups)."""
        return 1.0 if self.groups == 0 else 1.0 - self.violating_groups / self.groups

    @property
    def compliant(self) -> bool:
        return self.violating_groups == 0


def _countable(weight: torch.Tensor) -> torch.Tensor:
    """float8 tensors have no CPU reductions (count_nonzero, aminmax, isfinite); their float32 copy is exact."""
    return weight.float() if weight.dtype.is_floating_point and weight.dtype.itemsize == 1 else weight


def nonzero_fraction(weight: torch.Tensor) -> float:
    """Density: the fraction of entries that are not exactly zero (1.0 for an empty tensor)."""
    return float(_countable(weight).count_nonzero()) / weight.numel() if weight.numel() else 1.0


def count_nonfinite(weight: torch.Tensor) -> int:
    """NaN/Inf entries. min/max propagate NaN and expose Inf with no full-size temporary (isfinite makes several)."""
    if weight.numel() == 0 or not weight.dtype.is_floating_point:
        return 0
    weight = _countable(weight)
    low, high = torch.aminmax(weight)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return 0
    return int(weight.numel() - torch.isfinite(weight).count_nonzero())


def group_nonzeros(weight: torch.Tensor, layout: Layout, m: int) -> torch.Tensor:
    """Non-zero count of each group of `m` along K (NaN counts as non-zero)."""
    return to_groups(_countable(weight), layout, m).ne(0).sum(dim=1, dtype=torch.int32)


def compliance(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> Compliance:
    counts = group_nonzeros(weight, layout, pattern.m)
    return Compliance(
        pattern=pattern,
        groups=int(counts.numel()),
        violating_groups=int((counts > pattern.n).sum()),
        max_nonzeros_per_group=int(counts.max()) if counts.numel() else 0,
    )


def detect_pattern(weight: torch.Tensor, layout: Layout) -> NMPattern | None:
    """The sparsest N:M (M in 4, 8, 16, 32) the tensor already satisfies; ties go to the smaller M."""
    k = weight.shape[layout.k_axis]
    best: NMPattern | None = None
    for m in DETECTABLE_GROUP_SIZES:
        if k % m:
            continue
        counts = group_nonzeros(weight, layout, m)
        n = max(int(counts.max()), 1) if counts.numel() else 1
        if n < m and (best is None or n / m < best.density):
            best = NMPattern(n, m)
    return best
