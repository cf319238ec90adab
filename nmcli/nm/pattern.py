"""N:M patterns in nmsparse's keep-N convention."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nmcli.errors import NMSparseError

CONVENTION = (
    "keep-N: at most N non-zero weights in every group of M consecutive weights "
    "along the reduction (K) axis"
)

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class NMPattern:
    """At most `n` non-zeros in every group of `m` consecutive weights along K."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (1 <= self.n <= self.m):
            raise NMSparseError(
                f"invalid N:M pattern {self.n}:{self.m}: need 1 <= N <= M (keep-N convention, e.g. 2:4 or 1:8)"
            )

    @property
    def is_dense(self) -> bool:
        return self.n == self.m

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def zeros_per_group(self) -> int:
        return self.m - self.n

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


TWO_FOUR = NMPattern(2, 4)  # the one pattern NVIDIA sparse tensor cores run


def parse_pattern(text: str, *, allow_dense: bool = False) -> NMPattern:
    """Parse "N:M" (keep-N). Dense N == M is allowed only where the caller says so (SDGF stages)."""
    match = _PATTERN_RE.match(str(text))
    if not match:
        raise NMSparseError(
            f"invalid N:M pattern {text!r}: write it as N:M with whole numbers, e.g. 2:4 "
            "(keep N of every M weights)"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or m < 1 or n > m or (n == m and not allow_dense):
        raise NMSparseError(
            f"invalid N:M pattern {text!r}: need 1 <= N < M (keep-N convention: 2:4 keeps 2 of every 4 weights)"
        )
    return NMPattern(n, m)
