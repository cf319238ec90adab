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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from nmcli.nm import NMPattern

MAX_ROUNDS = 48
CHANNELS_PER_TASK = 8  # rows of the gain matrix a worker thread takes at a time


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
        grouped = s[:, order].reshape(s.shape[0], -1, pattern.m)
        total += float(grouped.topk(pattern.n, dim=-1).values.double().sum())
    return total


def _snake_order(scores: Sequence[torch.Tensor], pattern: NMPattern) -> torch.Tensor:
    """Channels by total importance, dealt 0..G-1, G-1..0, ... so every group gets one of each tier."""
    total = sum(s.double().sum(0) for s in scores)
    ranked = torch.sort(total, descending=True, stable=True).indices
    groups = len(ranked) // pattern.m
    slots = ranked.reshape(pattern.m, groups).clone()
    slots[1::2] = slots[1::2].flip(-1)
    return slots.T.reshape(-1)


@numba.njit(nogil=True, cache=True)
def _relu_gain_rows(values: np.ndarray, threshold: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
    """out[c, g] += Σ_rows max(0, values[row, c] − threshold[row, g]) for c in [start, stop): one pass, no temporaries."""
    rows, groups = threshold.shape
    for c in range(start, stop):
        acc = np.zeros(groups, dtype=np.float64)
        for r in range(rows):
            v = values[r, c]
            for g in range(groups):
                d = v - threshold[r, g]
                if d > 0:
                    acc[g] += d
        out[c] += acc


def _add_relu_gain(values: np.ndarray, threshold: np.ndarray, out: np.ndarray) -> None:
    """`_relu_gain_rows` over every channel, chunks taken one at a time by torch's thread count of threads (a busy
    core takes fewer chunks, as in nm/mask.py)."""
    groups = out.shape[0]
    chunks = iter(range(0, groups, CHANNELS_PER_TASK))

    def worker() -> None:
        for start in chunks:  # next() on a shared iterator: each chunk goes to exactly one thread
            _relu_gain_rows(values, threshold, start, min(start + CHANNELS_PER_TASK, groups), out)

    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        for future in [pool.submit(worker) for _ in range(torch.get_num_threads())]:
            future.result()


def _gains(scores: Sequence[torch.Tensor], assign: torch.Tensor, slot: int, pattern: NMPattern) -> torch.Tensor:
    """gain[c, g]: importance kept by group g's other M−1 channels plus channel c (the one taken from group c's slot),
    summed over matrices and rows, less what the other channels keep alone (a constant per group)."""
    groups = assign.shape[0]
    others = torch.cat([assign[:, :slot], assign[:, slot + 1 :]], dim=1)  # [G, M-1]
    gain = np.zeros((groups, groups), dtype=np.float64)
    for s in scores:
        rest = s[:, others.reshape(-1)].reshape(s.shape[0], groups, pattern.m - 1)
        threshold = rest.topk(pattern.n, dim=-1).values[..., -1]  # [rows, G]: the N-th largest of the rest
        values = s[:, assign[:, slot]]  # [rows, G]
        _add_relu_gain(values.contiguous().numpy(), threshold.contiguous().numpy(), gain)
    return torch.from_numpy(gain)


def _refine(scores: Sequence[torch.Tensor], order: torch.Tensor, pattern: NMPattern) -> tuple[torch.Tensor, int]:
    assign = order.reshape(-1, pattern.m).clone()
    quiet, rounds = 0, 0
    while quiet < pattern.m and rounds < MAX_ROUNDS:
        slot = rounds % pattern.m
        gain = _gains(scores, assign, slot, pattern)
        rows, cols = linear_sum_assignment(gain.numpy(), maximize=True)
        better = float(gain[rows, cols].sum()) > float(gain.diagonal().sum()) * (1 + 1e-9) + 1e-12
        if better:
            taken = assign[:, slot].clone()
            assign[torch.as_tensor(cols), slot] = taken[torch.as_tensor(rows)]
        quiet = 0 if better else quiet + 1
        rounds += 1
    return assign.reshape(-1), rounds


def search_order(scores: Sequence[torch.Tensor], pattern: NMPattern) -> SearchResult:
    """The channel order that keeps the most importance found; `scores` are [rows, K] matrices over the same K."""
    k = scores[0].shape[1]
    if k % pattern.m or any(s.shape[1] != k for s in scores):
        raise ValueError(f"every importance matrix needs the same K, a multiple of {pattern.m}")
    scores = [s.float().abs() for s in scores]
    identity = torch.arange(k)
    before = kept_importance(scores, identity, pattern)
    snake = _snake_order(scores, pattern)
    start = snake if kept_importance(scores, snake, pattern) > before else identity
    if pattern.n == pattern.m:
        return SearchResult(identity, before, before, 0)
    order, rounds = _refine(scores, start, pattern)
    after = kept_importance(scores, order, pattern)
    if after <= before:  # float sums: never hand back an order that is not measurably better
        return SearchResult(identity, before, before, rounds)
    return SearchResult(order, before, after, rounds)
