"""torch.distributed, launched with `torchrun`: gloo on CPU, nccl on GPU. World size 1 needs no process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """This rank's share for evaluation: every `world`-th sample from its rank, so each sample is counted exactly
    once over all ranks (DistributedSampler pads the set to equal shares, counting some twice)."""
    if not env.enabled:
        return dataset
    return Subset(dataset, range(env.rank, len(dataset), env.world))


def init_distributed(device: torch.device) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_equal(value: torch.Tensor, env: DistEnv) -> bool:
    """True when every rank holds the same tensor (used to check that masks agree)."""
    if not env.enabled:
        return True
    gathered = [torch.empty_like(value) for _ in range(env.world)]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, value) for g in gathered)


def mean_over_ranks(value: float, env: DistEnv) -> float:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / env.world


def sum_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(values)
    return values


def shutdown(env: DistEnv) -> None:
    """Wait for every rank (rank 0 may still be writing) before tearing the group down: a rank that leaves
    while a peer still holds its gloo connection can abort the peer."""
    if env.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
