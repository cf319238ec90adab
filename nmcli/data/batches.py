"""Training batches of samples of similar length.

Text samples are padded to the longest sample of their batch, and the padding costs as much compute as real
tokens. MiniLM's training mix of paragraphs (up to 128 tokens) and single sentences (most under 40) fills random
batches of 16 with 35 % real tokens; grouped by length, 97 %. The losses exclude padding, so grouping changes
which samples share a step, not what a sample contributes.

Written by hand: transformers' `LengthGroupedSampler` has no distributed form, and its megabatches run from the
longest batch to the shortest in order; here each rank groups its own share and the batches are shuffled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler

GROUP = 50  # batches per megabatch, as in transformers' LengthGroupedSampler
BATCH_ORDER_SEED = 1 << 32  # added to seed + epoch: the batch order is drawn apart from the sample order


class LengthGroupedBatches(Sampler[list[int]]):
    """This rank's shuffled share of the samples (`order`, a DistributedSampler: seed and epoch fix it), cut into
    megabatches of GROUP batches; each megabatch sorted by length (stable) and cut into batches; the epoch's
    batches shuffled (seed and epoch). Every sample once per epoch, the same number of batches on every rank."""

    def __init__(self, order: DistributedSampler, lengths: Sequence[int], batch_size: int, seed: int):
        self.order, self.lengths, self.batch_size, self.seed = order, lengths, batch_size, seed

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices, size = list(self.order), self.batch_size
        batches = []
        for start in range(0, len(indices), size * GROUP):
            group = sorted(indices[start : start + size * GROUP], key=lambda i: -self.lengths[i])
            batches += [group[j : j + size] for j in range(0, len(group), size)]
        shuffle = torch.Generator().manual_seed(self.seed + self.order.epoch + BATCH_ORDER_SEED)
        yield from (batches[i] for i in torch.randperm(len(batches), generator=shuffle).tolist())
