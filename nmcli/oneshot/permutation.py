"""Channel permutation search for N:M (methods.md §9): reorder the K channels that several weight matrices share so
that the importance kept under the pattern is as large as it can be found. Pure functions of tensors.

The channels are dealt into G = K/M groups of M. Importance matrices S_l [rows, K] (non-negative: |W|, or Wanda's
|W|·‖x‖) all read the same channels; the objective is Σ_l Σ_rows Σ_groups (sum of the N largest S in the group).

Search (as RIA's channel reallocation, with an exact gain):
1. start from the identity, or from the channels sorted by total importance and dealt round-robin (snake order) so
   that heavy channels fall into different groups, whichever keeps more;
2. refine in rounds: take one channel out of every group (the one in slot s), leaving M−1 in each. Putting channel c
   back into group g keeps top_N(rest_g) + relu(S[:, c] − t_g) per row, t_g the N-th largest of the rest (N < M), so
   the gain of every (channel, group) pair is one G×G matrix, and the best one-channel-per-group reassignment is a
   linear assignment (scipy's). The identity reassignment is among the candidates: a round never loses importance.
   Slots are taken in turn until M rounds in a row find nothing better, or MAX_ROUNDS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from nmcli.nm import NMPattern
from nmcli.runtime.chunks import in_chunks

MAX_ROUNDS = 48
CHANNELS_PER_TASK = 8  # rows of the gain matrix a worker thread takes at a time
ROW_BLOCK = 64  # importance rows summed in float32 before the float64 total
ROWS_PER_TASK = 4096  # importance rows whose thresholds a worker thread takes at a time
BLOCK_ROWS = 4 * ROWS_PER_TASK  # importance rows taken at a time: temporaries stay small next to a stacked matrix


@dataclass(frozen=True)
class SearchResult:
    order: torch.Tensor  # new channel order: position p holds the original channel order[p]
    kept_before: float  # importance kept by the pattern in the original order
    kept_after: float
    rounds: int


def kept_importance(scores: Sequence[torch.Tensor], order: torch.Tensor, pattern: NMPattern) -> float:
    """Σ over matrices, rows and groups of the N largest importances of each group, channels taken in `order`."""
    total = 0.0
    for s in scores:
        for rows in s.split(BLOCK_ROWS):
            grouped = rows[:, order].reshape(rows.shape[0], -1, pattern.m)
            total += float(grouped.topk(pattern.n, dim=-1).values.double().sum())
    return total


def _snake_order(score: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Channels by total importance, dealt 0..G-1, G-1..0, ... so every group gets one of each tier."""
    total = sum(rows.double().sum(0) for rows in score.split(BLOCK_ROWS))
    ranked = torch.sort(total, descending=True, stable=True).indices
    groups = len(ranked) // pattern.m
    slots = ranked.reshape(pattern.m, groups).clone()
    slots[1::2] = slots[1::2].flip(-1)
    return slots.T.reshape(-1)


@numba.njit(nogil=True, cache=True)
def _relu_gain_rows(values: np.ndarray, threshold: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
    """out[c, g] += Σ_rows max(0, values[row, c] − threshold[row, g]) for c in [start, stop).

    Each threshold row is read once for all the chunk's channels, the max is branch-free (the g loop vectorizes), and
    float32 partial sums over ROW_BLOCK rows are added into float64."""
    rows, groups = threshold.shape
    count = stop - start
    total = np.zeros((count, groups), dtype=np.float64)
    partial = np.zeros((count, groups), dtype=np.float32)
    zero = np.float32(0.0)
    for first in range(0, rows, ROW_BLOCK):
        partial[:] = 0
        for r in range(first, min(first + ROW_BLOCK, rows)):
            for i in range(count):
                v = values[r, start + i]
                for g in range(groups):
                    partial[i, g] += max(v - threshold[r, g], zero)
        total += partial
    for i in range(count):
        out[start + i] += total[i]


@numba.njit(nogil=True, cache=True)
def _nth_largest_rows(scores: np.ndarray, columns: np.ndarray, n: int, start: int, stop: int, out: np.ndarray) -> None:
    """out[r, g] = the n-th largest of scores[r, columns[g, :]] for r in [start, stop) (a partial selection sort of
    each group's few values: torch's topk over a last axis of M−1 is many times slower)."""
    groups, width = columns.shape
    picked = np.empty(width, dtype=np.float32)
    for r in range(start, stop):
        for g in range(groups):
            for j in range(width):
                picked[j] = scores[r, columns[g, j]]
            for a in range(n):
                best = a
                for b in range(a + 1, width):
                    if picked[b] > picked[best]:
                        best = b
                picked[a], picked[best] = picked[best], picked[a]
            out[r, g] = picked[n - 1]


def _gains(score: torch.Tensor, assign: torch.Tensor, slot: int, pattern: NMPattern) -> torch.Tensor:
    """gain[c, g]: importance kept by group g's other M−1 channels plus channel c (the one taken from group c's slot),
    summed over the rows of `score` (float32, contiguous), less what the other channels keep alone (a constant per
    group)."""
    groups = assign.shape[0]
    others = torch.cat([assign[:, :slot], assign[:, slot + 1 :]], dim=1).numpy()  # [G, M-1]
    gain = np.zeros((groups, groups), dtype=np.float64)
    for block in score.split(BLOCK_ROWS):
        matrix, rows = block.numpy(), block.shape[0]
        threshold = np.empty((rows, groups), dtype=np.float32)  # the N-th largest of the rest
        in_chunks(lambda a, b: _nth_largest_rows(matrix, others, pattern.n, a, b, threshold), rows, ROWS_PER_TASK)
        values = block[:, assign[:, slot]].contiguous().numpy()  # [rows, G]
        in_chunks(lambda a, b: _relu_gain_rows(values, threshold, a, b, gain), groups, CHANNELS_PER_TASK)
    return torch.from_numpy(gain)


def _refine(score: torch.Tensor, order: torch.Tensor, pattern: NMPattern) -> tuple[torch.Tensor, int]:
    assign = order.reshape(-1, pattern.m).clone()
    quiet, rounds = 0, 0
    while quiet < pattern.m and rounds < MAX_ROUNDS:
        slot = rounds % pattern.m
        gain = _gains(score, assign, slot, pattern)
        rows, cols = linear_sum_assignment(gain.numpy(), maximize=True)
        better = float(gain[rows, cols].sum()) > float(gain.diagonal().sum()) * (1 + 1e-9) + 1e-12
        if better:
            taken = assign[:, slot].clone()
            assign[torch.as_tensor(cols), slot] = taken[torch.as_tensor(rows)]
        quiet = 0 if better else quiet + 1
        rounds += 1
    return assign.reshape(-1), rounds


def _stacked_abs(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """|S| of every matrix stacked along the rows in one float32 matrix, without a second copy of the stack."""
    stacked = torch.empty(sum(s.shape[0] for s in scores), scores[0].shape[1])
    row = 0
    for s in scores:
        stacked[row : row + s.shape[0]].copy_(s).abs_()
        row += s.shape[0]
    return stacked


def search_order(scores: Sequence[torch.Tensor], pattern: NMPattern) -> SearchResult:
    """The channel order that keeps the most importance found; `scores` are [rows, K] matrices over the same K (the
    objective sums over their rows, so they are searched as one matrix)."""
    k = scores[0].shape[1]
    if k % pattern.m or any(s.shape[1] != k for s in scores):
        raise ValueError(f"every importance matrix needs the same K, a multiple of {pattern.m}")
    score = _stacked_abs(scores)
    identity = torch.arange(k)
    before = kept_importance([score], identity, pattern)
    snake = _snake_order(score, pattern)
    start = snake if kept_importance([score], snake, pattern) > before else identity
    if pattern.n == pattern.m:
        return SearchResult(identity, before, before, 0)
    order, rounds = _refine(score, start, pattern)
    after = kept_importance([score], order, pattern)
    if after <= before:  # float sums: never hand back an order that is not measurably better
        return SearchResult(identity, before, before, rounds)
    return SearchResult(order, before, after, rounds)
