"""One-shot magnitude N:M pruning that streams: read, prune and write one tensor at a time."""

from __future__ import annotations

import json
import threading
from collections import deque
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nmcli.checkpoints import Resolved
from nmcli.errors import NMSparseError
from nmcli.io.atomic import atomic_output
from nmcli.io.metadata import SparsityMetadata
from nmcli.io.safetensors_stream import write_streaming
from nmcli.io.sources import INDEX_NAME, Checkpoint
from nmcli.models import LayerInfo, select_targets
from nmcli.nm import NMPattern, apply_nm_, count_nonfinite, reduction_length

Progress = Callable[[str, int], None]  # (tensor name, bytes done for it)


@dataclass
class PrunePlan:
    """Which tensors get the pattern and which targets cannot take it (with the reason)."""

    pattern: NMPattern
    targets: dict[str, LayerInfo]
    skipped: dict[str, str] = field(default_factory=dict)

    def metadata(self, resolved: Resolved) -> SparsityMetadata:
        return SparsityMetadata(
            pattern=self.pattern,
            layers={
                name: {"layout": layer.layout.name, "k_axis": layer.layout.k_axis, "pattern": str(self.pattern)}
                for name, layer in self.targets.items()
            },
            skipped=self.skipped,
            model=resolved.model.to_json() if resolved.model else None,
        )


@dataclass
class PruneResult:
    out: Path
    plan: PrunePlan
    tensors: int
    bytes: int


def plan_prune(
    resolved: Resolved, pattern: NMPattern, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> PrunePlan:
    """Targets per methods.md §4; a layer whose K is not divisible by M is skipped, never padded."""
    plan = PrunePlan(pattern, {})
    for name, layer in select_targets(resolved.layers, include, exclude).items():
        k = reduction_length(resolved.checkpoint.infos[name].shape, layer.layout)
        if k % pattern.m:
            plan.skipped[name] = f"K={k} not divisible by M={pattern.m}"
        else:
            plan.targets[name] = layer
    return plan


class _BufferPool:
    """Reusable read buffers: a fresh 100 MB allocation per tensor costs as much in page faults as the read."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)


def _load_and_prune(ckpt: Checkpoint, name: str, plan: PrunePlan, buffer: torch.Tensor | None) -> torch.Tensor:
    tensor = ckpt.read(name, into=buffer)
    layer = plan.targets.get(name)
    if layer is None:
        return tensor
    bad = count_nonfinite(tensor)
    if bad:
        raise NMSparseError(
            f"{ckpt.where}: layer {name} has {bad} NaN/Inf weights; prune will not hide them "
            "(nmsparse report lists them): fix or re-export the checkpoint"
        )
    return apply_nm_(tensor.clone() if ckpt.is_in_memory else tensor, plan.pattern, layer.layout)


def _pruned_tensors(ckpt: Checkpoint, names: list[str], plan: PrunePlan, progress: Progress) -> Iterator[torch.Tensor]:
    """Read and prune the next tensors in a worker thread while the caller writes the current one.

    I/O and torch kernels release the GIL, so reading/masking overlaps writing. The worker runs ahead only
    while it holds less than the largest tensor's size: peak memory is about twice the largest tensor
    (under three times in the worst case), and small tensors such as biases do not stall the pipeline.
    """
    sizes = [ckpt.infos[n].numel * ckpt.infos[n].dtype.itemsize for n in names]
    budget = max(sizes, default=0)
    pool = None if ckpt.is_in_memory else _BufferPool()
    queue: deque[tuple[Future, torch.Tensor | None]] = deque()
    ahead = submitted = 0  # bytes submitted but not yet handed over; tensors submitted

    def refill() -> None:
        nonlocal ahead, submitted
        while submitted < len(names) and ahead < budget:
            buffer = pool.take(sizes[submitted]) if pool else None
            queue.append((worker.submit(_load_and_prune, ckpt, names[submitted], plan, buffer), buffer))
            ahead += sizes[submitted]
            submitted += 1

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmsparse-read") as worker:
        refill()
        for name, size in zip(names, sizes):
            future, buffer = queue.popleft()
            tensor = future.result()
            ahead -= size
            refill()  # the worker reads ahead while the caller writes this tensor
            yield tensor
            del tensor
            if pool and buffer is not None:
                pool.give(buffer)
            progress(name, size)


def _write_file(path: Path, ckpt: Checkpoint, names: list[str], plan: PrunePlan, meta: dict, progress: Progress) -> None:
    layout = [(n, ckpt.infos[n].shape, ckpt.infos[n].dtype) for n in names]
    write_streaming(path, layout, _pruned_tensors(ckpt, names, plan, progress), meta)


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
    meta = {**kept, **plan.metadata(resolved).to_strings()}
    if ckpt.folder is None:
        if out.suffix != ".safetensors":
            raise NMSparseError(f"--out {out}: the output of a single checkpoint is a .safetensors file")
        with atomic_output(out, force=force) as tmp:
            _write_file(tmp, ckpt, list(ckpt.infos), plan, meta, progress)
    else:
        with atomic_output(out, force=force, directory=True) as tmp:
            for item in sorted(ckpt.folder.iterdir()):
                if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_NAME:
                    shutil.copy2(item, tmp / item.name)
            for shard, names in ckpt.shards.items():
                _write_file(tmp / shard, ckpt, names, plan, meta, progress)
            if (ckpt.folder / INDEX_NAME).is_file():
                index = json.loads((ckpt.folder / INDEX_NAME).read_text())
                index.setdefault("metadata", {}).update(plan.metadata(resolved).to_strings())
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    total = sum(i.numel * i.dtype.itemsize for i in ckpt.infos.values())
    return PruneResult(out, plan, len(ckpt.infos), total)
