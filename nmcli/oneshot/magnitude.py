"""One-shot magnitude N:M pruning that streams: read, prune and write one tensor at a time."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nmcli.errors import NMSparseError
from nmcli.io.rewrite import Item, Progress, copy_item, rewrite
from nmcli.io.safetensors_stream import RowChange
from nmcli.io.sources import Checkpoint
from nmcli.models.resolve import Resolved
from nmcli.nm import apply_nm_
from nmcli.oneshot.plan import PrunePlan


@dataclass
class PruneResult:
    out: Path
    plan: PrunePlan
    tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)


def prune_rows_(ckpt: Checkpoint, name: str, plan: PrunePlan, tensor: torch.Tensor, rows: slice) -> None:
    """`tensor`, rows `rows` (of axis 0) of target `name`, pruned in place to the plan's pattern; the caller keeps
    every N:M group inside one range (`RowChange.unit`). NaN/Inf weights are refused, not hidden (they are counted
    by the mask's own pass, and the output is abandoned)."""
    bad = apply_nm_(tensor, plan.pattern_of(name), plan.targets[name].layout)
    if bad:
        total = ckpt.infos[name].shape[0]
        part = "" if rows == slice(0, total) else f" in rows {rows.start}-{rows.stop - 1} (of {total})"
        raise NMSparseError(
            f"{ckpt.where}: layer {name} has {bad} NaN/Inf weights{part}; prune will not hide them "
            "(nmsparse report lists them): fix or re-export the checkpoint"
        )


def _own(ckpt: Checkpoint, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor prune may change in place: an in-memory checkpoint's own tensors are copied first."""
    return tensor.clone() if ckpt.is_in_memory else tensor


def prune_items(ckpt: Checkpoint, plan: PrunePlan, names: list[str]) -> list[Item]:
    """Each target tensor becomes its pruned self; everything else is copied."""
    items = []
    for name in names:
        item = copy_item(ckpt, name)
        if name in plan.targets:  # masked row by row; when axis 0 is the reduction axis, M rows at a time
            unit = plan.pattern_of(name).m if plan.targets[name].layout.k_axis == 0 else 1
            item.produce = lambda tensors: [_own(ckpt, tensors[0])]
            item.change = RowChange(functools.partial(prune_rows_, ckpt, name, plan), unit)
        items.append(item)
    return items


def prune(
    resolved: Resolved,
    plan: PrunePlan,
    out: Path,
    *,
    force: bool = False,
    progress: Progress = lambda name, done: None,
) -> PruneResult:
    """Write the pruned checkpoint to `out`: a file for a file source, a folder (same shards) for a folder."""
    ckpt = resolved.checkpoint
    kept = {k: v for k, v in ckpt.metadata.items() if not k.startswith("nmsparse.")}
    meta = {**kept, **plan.metadata(resolved.model).to_strings()}
    if ckpt.folder is None and out.suffix != ".safetensors":
        raise NMSparseError(f"--out {out}: the output of a single checkpoint is a .safetensors file")
    notes = resolved.match.notes() if resolved.match is not None else []
    notes += rewrite(ckpt, lambda names: prune_items(ckpt, plan, names), out, meta, force=force, progress=progress)
    total = sum(i.nbytes for i in ckpt.infos.values())
    return PruneResult(out, plan, len(ckpt.infos), total, notes)
