"""`prune --budget`: one pattern per layer from a candidate set, the least summed sensitivity at the overall sparsity
asked for — a multiple-choice knapsack, solved exactly by dynamic programming on a grid of GRID weight units.

Pure functions of numbers: `costs[layer][pattern]` is what pruning that layer alone to that pattern costs (measured
by nmcli/oneshot/sensitivity.py), `sizes[layer]` its weight count. A rounding to the grid that leaves the exact
sparsity short of the target is repaired by the cheapest moves to a sparser candidate (cost per zero added).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nmcli.errors import NMSparseError
from nmcli.nm import NMPattern, parse_pattern

GRID = 4096  # weight units the kept-weights budget is counted in
DENSE = NMPattern(1, 1)
DEFAULT_CANDIDATES = "2:4,1:4,dense"  # every sparse one runs on 2:4 sparse tensor cores (1:4 is 2:4 compliant)


def parse_candidates(text: str) -> list[NMPattern]:
    """`2:4,1:4,dense` -> patterns (dense as 1:1), at least one of them sparse, none twice."""
    found: list[NMPattern] = []
    for part in (p.strip() for p in text.split(",")):
        pattern = DENSE if part.lower() == "dense" else parse_pattern(part)
        if pattern in found:
            raise NMSparseError(f"--candidates {text}: {part} is listed twice")
        found.append(pattern)
    if all(p.is_dense for p in found):
        raise NMSparseError(f"--candidates {text}: name at least one N:M pattern (e.g. 2:4,1:4,dense)")
    return found


@dataclass(frozen=True)
class Allocation:
    patterns: dict[str, NMPattern]  # layer -> its pattern (DENSE: left dense)
    sparsity: float  # zeros / weights over the layers allocated
    cost: float  # summed sensitivity of the choice


def sparsity_of(patterns: dict[str, NMPattern], sizes: dict[str, int]) -> float:
    total = sum(sizes[name] for name in patterns)
    return sum(sizes[name] * (1 - p.density) for name, p in patterns.items()) / total


def allocate(costs: dict[str, dict[NMPattern, float]], sizes: dict[str, int], sparsity: float) -> Allocation:
    """The per-layer patterns of least summed cost whose overall sparsity is at least `sparsity`."""
    names = list(costs)
    total = sum(sizes[name] for name in names)
    sparsest = {name: max(costs[name], key=lambda p: 1 - p.density) for name in names}
    if sparsity_of(sparsest, sizes) < sparsity - 1e-12:
        raise NMSparseError(
            f"--budget {sparsity:g}: the sparsest candidate of every layer reaches {sparsity_of(sparsest, sizes):.4f} "
            "overall; add a sparser candidate to --candidates or lower the budget"
        )
    unit = total / GRID
    capacity = math.floor((1 - sparsity) * GRID + 1e-9)
    chosen = _knapsack(names, costs, sizes, unit, capacity) or sparsest
    while sparsity_of(chosen, sizes) < sparsity - 1e-12:  # grid rounding: the cheapest zeros per unit of cost
        chosen = _sparser_step(chosen, costs, sizes)
    return Allocation(chosen, sparsity_of(chosen, sizes), sum(costs[n][p] for n, p in chosen.items()))


def _knapsack(names: list[str], costs: dict[str, dict[NMPattern, float]], sizes: dict[str, int], unit: float,
              capacity: int) -> dict[str, NMPattern] | None:
    """best[c] = least cost of the layers so far keeping at most c units; one choice table per layer to walk back.
    None when the grid's rounding leaves no choice within the capacity (a budget at the sparsest candidates)."""
    best = np.zeros(capacity + 1)
    choices: list[tuple[list[NMPattern], np.ndarray]] = []
    for name in names:
        options = list(costs[name])
        table = np.full((len(options), capacity + 1), np.inf)
        for row, pattern in enumerate(options):
            kept = round(sizes[name] * pattern.density / unit)
            if kept <= capacity:
                table[row, kept:] = best[: capacity + 1 - kept] + costs[name][pattern]
        choices.append((options, table.argmin(0)))
        best = table.min(0)
    if not np.isfinite(best[capacity]):
        return None
    chosen, left = {}, capacity
    for name, (options, pick) in zip(reversed(names), reversed(choices)):
        pattern = options[pick[left]]
        chosen[name] = pattern
        left -= round(sizes[name] * pattern.density / unit)
    return {name: chosen[name] for name in names}


def _sparser_step(chosen: dict[str, NMPattern], costs: dict[str, dict[NMPattern, float]],
                  sizes: dict[str, int]) -> dict[str, NMPattern]:
    """`chosen` with the one move to a sparser candidate that adds zeros at the least cost per zero."""
    moves = []
    for name, now in chosen.items():
        for pattern, cost in costs[name].items():
            zeros = sizes[name] * (now.density - pattern.density)
            if zeros > 0:
                moves.append(((cost - costs[name][now]) / zeros, name, pattern))
    _, name, pattern = min(moves, key=lambda move: move[0])
    return {**chosen, name: pattern}
