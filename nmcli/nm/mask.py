"""Exact N:M magnitude masks: keep the N largest |w| of each group, ties to the lower index.

Fast path: find each group's N-th largest magnitude with a cheap reduction (max for N = 1, a min/max network
for M = 4, topk values otherwise), keep everything at or above it, and count the kept entries once. Only the
groups where ties at the threshold (or NaNs) kept a wrong count are redone exactly with a stable sort. This is
several times faster than topk + scatter, and gets ties right where `>= kthvalue` alone does not.
The groups are processed in cache-sized chunks written into one preallocated mask: large temporaries cost more
in page faults than in arithmetic.
NaN counts as the largest magnitude, so it is kept and later reported rather than silently hidden.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nmcli.nm.layout import Layout, from_groups, to_groups
from nmcli.nm.pattern import NMPattern


def _exact_group_mask(magnitudes: torch.Tensor, n: int) -> torch.Tensor:
    """Slow exact path: a stable descending sort puts equal values in index order (and NaN first)."""
    order = torch.sort(magnitudes, dim=1, descending=True, stable=True).indices[:, :n]
    return torch.zeros_like(magnitudes, dtype=torch.bool).scatter_(1, order, True)


def _nth_largest(magnitudes: torch.Tensor, n: int) -> torch.Tensor:
    m = magnitudes.shape[1]
    if n == 1:
        return magnitudes.amax(dim=1)
    if m == 4:
        a, b, c, d = magnitudes.unbind(1)
        hi1, lo1 = torch.maximum(a, b), torch.minimum(a, b)
        hi2, lo2 = torch.maximum(c, d), torch.minimum(c, d)
        if n == 2:
            return torch.maximum(torch.minimum(hi1, hi2), torch.maximum(lo1, lo2))
        return torch.minimum(torch.maximum(lo1, lo2), torch.minimum(hi1, hi2))  # n == 3
    return magnitudes.topk(n, dim=1, sorted=False).values.amin(dim=1)


CHUNK_ELEMENTS = 1 << 18  # about 1 MB of fp32: measured fastest on 2-core CPUs (bench/mask.py)


def _chunk_masks(groups: torch.Tensor, n: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Keep masks of consecutive cache-sized chunks of a [G, M] tensor of groups (with the chunk's |w|)."""
    g, m = groups.shape
    step = max(1, CHUNK_ELEMENTS // m)
    for start in range(0, g, step):
        rows = slice(start, start + step)
        magnitudes = groups[rows].abs()
        keep = magnitudes >= _nth_largest(magnitudes, n).unsqueeze(1)
        if int(keep.count_nonzero()) != keep.shape[0] * n:  # ties at the threshold, or NaN
            wrong = (keep.view(torch.uint8).sum(dim=1, dtype=torch.int16) != n).nonzero().squeeze(1)
            keep[wrong] = _exact_group_mask(magnitudes[wrong], n)
        yield rows, keep, magnitudes


def group_mask(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep mask for a [G, M] tensor of groups: exactly `n` True per row."""
    if n >= groups.shape[1]:
        return torch.ones_like(groups, dtype=torch.bool)
    mask = torch.empty_like(groups, dtype=torch.bool)
    for rows, keep, _ in _chunk_masks(groups, n):
        mask[rows] = keep
    return mask


def nm_mask(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> torch.Tensor:
    """Boolean keep mask of `weight`'s shape: `pattern` along the layout's reduction axis."""
    groups = to_groups(weight.detach(), layout, pattern.m)
    return from_groups(group_mask(groups, pattern.n), weight.shape, layout)


def apply_nm(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> torch.Tensor:
    """`weight` with everything outside the N:M mask set to exact zeros (same dtype and shape)."""
    return weight.masked_fill(~nm_mask(weight, pattern, layout), 0)


def apply_nm_(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> torch.Tensor:
    """In-place `apply_nm`, chunk by chunk: no full-size mask, so peak memory stays near the tensor itself
    (plus one copy for conv layouts, whose K axis is not contiguous).

    Used by the streaming prune, where the largest tensor of a checkpoint bounds the memory needed.
    """
    groups = to_groups(weight, layout, pattern.m)
    if pattern.n < pattern.m:
        for rows, keep, magnitudes in _chunk_masks(groups, pattern.n):
            # multiplying by the mask is ~8x faster than masked_fill, but 0 * inf is NaN: finite chunks only
            if bool(torch.isfinite(magnitudes.amax())):
                groups[rows].mul_(keep)
            else:
                groups[rows].masked_fill_(keep.logical_not_(), 0)
    if groups.data_ptr() != weight.data_ptr() or not groups.is_contiguous():
        weight.copy_(from_groups(groups, weight.shape, layout))
    return weight
