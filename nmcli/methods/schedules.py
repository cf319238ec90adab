"""Pure functions of the training step: phase boundaries, MDGF alpha(t), SDGF structure stages (methods.md §2-3).

Nothing here touches tensors or models, so every schedule is unit-testable against the worked examples.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from nmcli.errors import NMSparseError
from nmcli.nm import NMPattern

GEOMETRIC_STAGES = 4
EXPONENTIAL_FLOOR = 0.01  # "reach_at" for the exponential schedule means alpha = 0.01 there


class Phase(str, enum.Enum):
    """The three training phases of methods.md §2 (a str: metrics and JSON hold the value itself)."""

    DENSE = "dense"
    DECAY = "decay"  # methods.md's "sparse / decay": the method acts (a fixed mask or SR-STE decays nothing)
    FINETUNE = "finetune"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Phases:
    """dense [0, dense_end) -> decay [dense_end, finetune_start) -> fine-tune [finetune_start, total)."""

    total: int
    dense_end: int
    finetune_start: int

    @classmethod
    def from_fractions(cls, total: int, dense: float, finetune: float) -> Phases:
        if total < 1:
            raise NMSparseError(f"training needs at least one step, got {total}")
        if not (0 <= dense <= 1 and 0 <= finetune <= 1 and dense + finetune <= 1):
            raise NMSparseError(
                f"phase fractions dense={dense}, finetune={finetune} must lie in [0, 1] and sum to at most 1"
            )
        dense_end = round(dense * total)
        finetune_start = max(dense_end, total - round(finetune * total))
        return cls(total, dense_end, finetune_start)

    @property
    def decay_length(self) -> int:
        return self.finetune_start - self.dense_end

    def phase(self, step: int) -> Phase:
        if step < self.dense_end:
            return Phase.DENSE
        return Phase.DECAY if step < self.finetune_start else Phase.FINETUNE

    def clock(self, step: int) -> int:
        """t: steps since the decay phase began (t = 0 at its first step)."""
        return step - self.dense_end


def decay_rate(schedule: str, length: int, reach_at: float) -> float:
    """c such that alpha reaches 0 (linear) or 0.01 (exponential) at fraction `reach_at` of `length` steps."""
    steps = max(reach_at * length, 1e-9)
    if schedule == "linear":
        return 1.0 / steps
    if schedule == "exponential":
        return math.log(1.0 / EXPONENTIAL_FLOOR) / steps
    raise NMSparseError(f"reach_at applies to linear or exponential schedules, not {schedule!r}")


def alpha(schedule: str, t: int, *, rate: float = 0.0, interval: int = 1, step_size: float = 0.0) -> float:
    """MDGF mask value of pruned weights at decay clock t."""
    if t < 0:
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - rate * t)
    if schedule == "exponential":
        return math.exp(-rate * t)
    if schedule == "stepped":
        return max(0.0, 1.0 - (t // interval) * step_size)
    raise NMSparseError(f"unknown alpha schedule {schedule!r}; use linear, exponential or stepped")


def stepwise_stages(target: NMPattern) -> list[NMPattern]:
    """M fixed, N shrinks: M-1, M/2, M/4, ... while larger than the target N, then N (1:8 -> 7:8 4:8 2:8 1:8)."""
    ns = [target.m - 1] if target.m - 1 > target.n else []
    n = target.m // 2
    while n > target.n:
        if not ns or n < ns[-1]:
            ns.append(n)
        n //= 2
    return [NMPattern(n, target.m) for n in ns] + [target]


def geometric_stages(target: NMPattern, count: int = GEOMETRIC_STAGES) -> list[NMPattern]:
    """Density fixed, groups shrink: stage i is (N 2^(K-1-i)):(M 2^(K-1-i)) (1:8 -> 8:64 4:32 2:16 1:8)."""
    return [NMPattern(target.n * 2 ** (count - 1 - i), target.m * 2 ** (count - 1 - i)) for i in range(count)]


def stage_index(t: int, decay_length: int, stages: int) -> int:
    """Which of `stages` equal frames of the decay phase clock t falls in; the last frame is the target."""
    if decay_length <= 0 or t >= decay_length:
        return stages - 1
    return min(stages - 1, max(0, t * stages // decay_length))


def stage_bounds(index: int, decay_length: int, stages: int) -> tuple[int, int]:
    """[start, end) of frame `index` on the decay clock (the inverse of `stage_index`)."""
    start = -(-index * decay_length // stages)
    end = -(-(index + 1) * decay_length // stages)
    return start, end


def pattern_for_layer(stages: list[NMPattern], index: int, reduction_length: int) -> NMPattern:
    """A layer whose K does not divide a stage's M holds at the first later stage it can take."""
    for stage in stages[index:]:
        if reduction_length % stage.m == 0:
            return stage
    return stages[-1]
