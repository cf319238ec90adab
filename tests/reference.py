"""Independent slow implementations the tests compare against: plain Python over each group."""

from __future__ import annotations

import math

import torch


def brute_force_group_mask(values: list[float], n: int) -> list[bool]:
    """Keep the n largest |v|; NaN counts as largest; ties go to the lower index."""

    def key(i: int) -> tuple[int, float, int]:
        v = values[i]
        return (0 if math.isnan(v) else 1, -abs(v) if not math.isnan(v) else 0.0, i)

    keep = set(sorted(range(len(values)), key=key)[:n])
    return [i in keep for i in range(len(values))]


def brute_force_mask(weight: torch.Tensor, n: int, m: int, k_axis: int) -> torch.Tensor:
    """Mask built by walking every group explicitly with index arithmetic (no reshapes)."""
    w = weight.detach().double()
    mask = torch.zeros(w.shape, dtype=torch.bool)
    other_axes = [a for a in range(w.ndim) if a != k_axis]
    k = w.shape[k_axis]
    for other in torch.cartesian_prod(*[torch.arange(w.shape[a]) for a in other_axes]).reshape(-1, len(other_axes)).tolist() if other_axes else [[]]:
        for start in range(0, k, m):
            positions = []
            for j in range(start, start + m):
                idx = list(other)
                idx.insert(k_axis, j)
                positions.append(tuple(idx))
            keep = brute_force_group_mask([w[p].item() for p in positions], n)
            for p, kept in zip(positions, keep):
                mask[p] = kept
    return mask
