"""`finetune --shard` under torchrun: torch's FSDP2 (`fully_shard`) for the student and the frozen teacher.

Each transformer block (the classes a transformers model lists in `_no_split_modules`) is one FSDP unit and the
root the last, so a block's weights are gathered just before it runs and freed after. Every weight is sharded by
rows (dim 0); the N:M mask parametrizations see the gathered weight inside the forward pass, so masks, SR-STE's
term, MDGF/SDGF and LoRA compute exactly what one process computes. Gradients are averaged over ranks (as DDP's).
Optimizer state lives on the shards. Checkpoints and the output are gathered on rank 0 (full state dicts);
resuming broadcasts them from rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from nmcli.errors import NMSparseError
from nmcli.methods.plan import StepPlan
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models.architecture import transformer_blocks
from nmcli.nm import NMPattern
from nmcli.methods.schedules import Phase
from nmcli.train.distributed import DistEnv, sum_over_ranks

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def check_shard(world: int, grad_log_every: int) -> None:
    """--shard settings that cannot work, refused before anything is loaded (a timm model: engine._task)."""
    if world < 2:
        raise NMSparseError("--shard splits the model over torchrun's processes: run under torchrun --nproc_per_node K "
                            "(K >= 2), or drop --shard")
    if grad_log_every:
        raise NMSparseError("--grad-log-every reads whole gradients, which --shard splits over the ranks; drop one of the two")


def shard_model(model: nn.Module) -> nn.Module:
    """Apply fully_shard to every transformer block, then to the root (embeddings, final norm, head, tied weights)."""
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (parametrized) model state on rank 0's CPU, {} on the others; every rank must call it."""
    return get_model_state_dict(model, options=GATHER)


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=GATHER)


def scatter_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Rank 0's full states into every rank's shards (the other ranks pass what they read; only rank 0's counts)."""
    set_model_state_dict(model, model_state, options=SCATTER)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=SCATTER)


def _check_finite_shards(model: nn.Module, env: DistEnv) -> None:
    """engine._check_finite over the shards: every rank counts its own and all learn the total, so that all of
    them stop together."""
    names = [name for name, _ in model.named_parameters()]
    local = torch.tensor([float((~torch.isfinite(p.to_local().detach())).sum()) for _, p in model.named_parameters()],
                         dtype=torch.float64)
    for name, bad in zip(names, sum_over_ranks(local, env).tolist()):
        if bad:
            raise NMSparseError(f"{name}: {int(bad)} NaN/Inf weights after training; the run diverged, so no model is "
                                "written (lower --lr or the recipe's optimizer.lr)")


def finish_sharded(model: nn.Module, sparsifier: Sparsifier, target: NMPattern | None, evaluate: Callable[[], dict],
                   env: DistEnv) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The final quality, measured with every layer at its final mask (the forward pass then computes exactly the
    weights `Sparsifier.finalized_state` writes), and the gathered state (rank 0; {} elsewhere)."""
    _check_finite_shards(model, env)
    if target is not None:  # freeze: a frozen mask stays (set_plan drops it otherwise), a missing one is the magnitude's
        sparsifier.set_plan(StepPlan(Phase.FINETUNE, (target,), 0, freeze=True))
    final = evaluate()
    return final, gathered_model_state(model)
