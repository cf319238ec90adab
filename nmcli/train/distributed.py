"""torch.distributed, launched with `torchrun`: gloo on CPU, nccl on GPU (one GPU per local rank). World size 1
needs no process group. Every collective's tensor is placed on the rank's device first (nccl takes no CPU tensor)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from nmcli.runtime.device import place, run_device


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

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


def init_distributed(requested_device: str) -> DistEnv:
    """This process's rank and device (`--device cuda` under torchrun: the GPU of its local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    device = run_device(requested_device, local_rank, world)
    if world <= 1:
        return DistEnv(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_equal(value: torch.Tensor, env: DistEnv) -> bool:
    """True when every rank holds the same tensor (used to check that masks agree)."""
    if not env.enabled:
        return True
    value = place(value, env.device)
    gathered = [torch.empty_like(value) for _ in range(env.world)]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, value) for g in gathered)


def mean_over_ranks(value: float, env: DistEnv) -> float:
    if not env.enabled:
        return value
    t = place(torch.tensor([value], dtype=torch.float64), env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world


def sum_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks, on `values`' own device."""
    if not env.enabled:
        return values
    summed = place(values, env.device)
    dist.all_reduce(summed)
    return summed.to(values.device)


def shutdown(env: DistEnv) -> None:
    """Wait for every rank (rank 0 may still be writing) before tearing the group down: a rank that leaves
    while a peer still holds its gloo connection can abort the peer."""
    if env.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
