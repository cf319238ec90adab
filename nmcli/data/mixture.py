"""Training text from several sources in chosen proportions: `--data python-help:0.3,wiki:0.7`.

A mixture is a comma-separated list of `SOURCE:PROPORTION` items (any source `--data` takes but the generated
`teacher:N` and `writer:FOLDER:N`);
proportions are relative weights. Each source gives its training samples; the mixture draws from each its share,
seeded, without repeating a sample, so it is as large as the proportions allow: the source that runs out first at
its share sets the size (a source of weight 0 gives none). Batches are then drawn from the mixed samples in a
seeded order, so each holds the sources in proportion on average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nmcli.data.tokens import TokenSamples
from nmcli.errors import NMSparseError

EXAMPLE = "python-help:0.3,wiki:0.7"
# What a Hugging Face model trains on without --data: Python's help texts and general-English Wikipedia articles. On
# Python help alone the example's embedder recovered its own domain but not general English (README's benchmarks).
GENERAL_USE = EXAMPLE


@dataclass(frozen=True)
class Share:
    source: str
    weight: float


def parse_mixture(spec: str) -> list[Share] | None:
    """The sources and weights of a mixture; None when `spec` names one source (no comma)."""
    if "," not in spec:
        return None
    shares = []
    for item in (part.strip() for part in spec.split(",")):
        source, colon, weight = item.rpartition(":")
        if not colon or not source:
            raise NMSparseError(f"--data {spec}: {item!r} has no proportion; write SOURCE:PROPORTION items, e.g. {EXAMPLE}")
        try:
            value = float(weight)
        except ValueError:
            raise NMSparseError(f"--data {spec}: the proportion {weight!r} of {source} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise NMSparseError(f"--data {spec}: the proportion of {source} is {weight}; proportions are numbers >= 0")
        if source.startswith(("teacher:", "writer:")):
            raise NMSparseError(f"--data {spec}: {source} (text a model writes) cannot be mixed yet; use it alone")
        if any(share.source == source for share in shares):
            raise NMSparseError(f"--data {spec}: {source} is listed twice; give each source once")
        shares.append(Share(source, value))
    if sum(share.weight for share in shares) <= 0:
        raise NMSparseError(f"--data {spec}: the proportions add up to 0; give at least one source a weight above 0")
    return shares


def mix(parts: list[TokenSamples], shares: list[Share], seed: int) -> tuple[TokenSamples, list[int]]:
    """Each part's share of samples (a seeded choice of its samples, none repeated), and how many came from each."""
    total_weight = sum(share.weight for share in shares)
    fractions = [share.weight / total_weight for share in shares]
    for part, share, fraction in zip(parts, shares, fractions):
        if fraction > 0 and len(part) == 0:
            raise NMSparseError(f"--data {share.source}: no training samples in it (it tokenizes to nothing)")
    size = min(len(part) / fraction for part, fraction in zip(parts, fractions) if fraction > 0)
    counts = [min(len(part), round(size * fraction)) for part, fraction in zip(parts, fractions)]
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for part, count in zip(parts, counts):
        chosen += [part.ids[i] for i in torch.randperm(len(part), generator=generator)[:count].tolist()]
    return TokenSamples(chosen), counts
