"""Stream a checkpoint into a new one, item by item: read some tensors, turn them into others, write them.

One pipeline serves prune (a tensor -> its pruned self), the `nm` export (a tensor -> values + positions), the
`dense` export (values + positions -> a tensor) and the compressed-tensors export. A worker thread reads and
transforms the next items while the caller writes the current one (I/O and torch kernels release the GIL); it runs
ahead only while it holds less than the largest item, so peak memory is about twice the largest item. A tensor of a
file source written as it is, or changed only row by row in place (prune's mask: a `RowChange`), is not read as a
whole at all: the writer copies it from the file through one small buffer, changing it on the way (`SourceBytes`).
Output is written atomically: a file, or a folder with the same shards (index rewritten) for a folder source.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from nmcli.errors import NMSparseError
from nmcli.io.atomic import atomic_output
from nmcli.io.safetensors_stream import RowChange, SourceBytes, nbytes, write_streaming
from nmcli.io.sources import INDEX_NAME, Checkpoint

Spec = tuple[str, tuple[int, ...], torch.dtype]
Progress = Callable[[str, int], None]  # (item name, bytes read for it)


def _as_is(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


@dataclass
class Item:
    """`produce(inputs)` turns the tensors named `inputs` into tensors matching `outputs`, on the reading thread;
    `change` then works in place on the one output's rows. `as_source`: the output is the one input's bytes,
    changed (if at all) only by `change`; from a file source the writer copies it from the file (`SourceBytes`)
    and `produce` is not called."""

    inputs: list[str]
    outputs: list[Spec]
    produce: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    change: RowChange | None = None
    as_source: bool = False

    def made(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs of `tensors` (the inputs), produced and changed."""
        produced = self.produce(tensors)
        if self.change is not None:
            self.change.run(produced[0])
        return produced


def copy_item(ckpt: Checkpoint, name: str) -> Item:
    info = ckpt.infos[name]
    return Item([name], [(name, info.shape, info.dtype)], _as_is, as_source=True)


class _BufferPool:
    """Reusable read buffers: a fresh 100 MB allocation per tensor costs as much in page faults as the read."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= size]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(max(size, 1), dtype=torch.uint8)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(buffers)


def _input_bytes(ckpt: Checkpoint, item: Item) -> int:
    return sum(ckpt.infos[n].nbytes for n in item.inputs)


def _source_bytes(ckpt: Checkpoint, item: Item) -> SourceBytes | None:
    """An item the writer copies from the source file (changing it row by row on the way, if it changes): never
    read into the process as a whole (so it takes no room here either). None for every other item."""
    stored = ckpt.stored_at(item.inputs[0]) if item.as_source else None
    return None if stored is None else SourceBytes(*stored, ckpt.infos[item.inputs[0]].nbytes, item.change)


def _produced(ckpt: Checkpoint, items: list[Item], progress: Progress) -> Iterator[torch.Tensor | SourceBytes]:
    sources = [_source_bytes(ckpt, item) for item in items]
    read_bytes = [0 if source is not None else _input_bytes(ckpt, item) for item, source in zip(items, sources)]
    budget = max(read_bytes, default=0)
    pool = None if ckpt.is_in_memory else _BufferPool()
    queue: deque[tuple[Future | None, list[torch.Tensor]]] = deque()  # None: the writer copies the item itself
    ahead = submitted = 0  # bytes submitted but not yet handed over; items submitted

    def work(item: Item, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        tensors = [ckpt.read(n, into=b) for n, b in zip(item.inputs, buffers)] if pool else [ckpt.read(n) for n in item.inputs]
        return item.made(tensors)

    def refill() -> None:
        nonlocal ahead, submitted
        while submitted < len(items) and (ahead < budget or not queue):  # at least one, even if all are empty
            item, source = items[submitted], sources[submitted]
            buffers = [pool.take(ckpt.infos[n].nbytes) for n in item.inputs] if pool and source is None else []
            queue.append((worker.submit(work, item, buffers) if source is None else None, buffers))
            ahead += read_bytes[submitted]
            submitted += 1

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmsparse-read") as worker:
        refill()
        for item, size, source in zip(items, read_bytes, sources):
            read, buffers = queue.popleft()
            produced = read.result() if read is not None else []
            ahead -= size
            refill()  # the worker reads ahead while the caller writes this item
            if source is not None:
                yield source
            else:
                yield from produced
            del produced
            if pool:
                pool.give(buffers)
            progress(item.inputs[0] if item.inputs else "", _input_bytes(ckpt, item))


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch kernels on one thread while a checkpoint is rewritten: the worker's (exports' packing) and the writer's
    (prune's mask, one chunk at a time) each keep to one core instead of OpenMP spreading each over both, against
    the other thread (slower with two; README's benchmark section)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_unique(ckpt: Checkpoint, layout: list[Spec]) -> None:
    """A layout's added names (`X.nm_values`, `P.compressed`, ...) must not collide with tensors already there."""
    seen: set[str] = set()
    for name, _, _ in layout:
        if name in seen:
            raise NMSparseError(
                f"{ckpt.where}: the output would hold two tensors named {name} (the source already has a tensor of "
                "the name this format adds); rename that tensor or choose another format"
            )
        seen.add(name)


def _write(path: Path, ckpt: Checkpoint, items: list[Item], metadata: dict[str, str], progress: Progress) -> None:
    layout = [spec for item in items for spec in item.outputs]
    _check_unique(ckpt, layout)
    with _one_torch_thread():
        write_streaming(path, layout, _produced(ckpt, items, progress), metadata)


def rewrite(
    ckpt: Checkpoint,
    items_of: Callable[[list[str]], list[Item]],
    out: Path,
    metadata: dict[str, str],
    *,
    force: bool,
    progress: Progress = lambda name, done: None,
    single_file: bool = False,
) -> list[str]:
    """Write `out`: one file (file sources, or `single_file`), else a folder with the source's shards and its
    other regular files. Returns notes for the user (side files not copied, and why).

    `items_of(names)` says what to write for a group of source tensors (one shard, or all of them).
    """
    if ckpt.folder is None or single_file:
        with atomic_output(out, force=force) as tmp:
            _write(tmp, ckpt, items_of(list(ckpt.infos)), metadata, progress)
        return []
    with atomic_output(out, force=force, directory=True) as tmp:
        notes = copy_side_files(ckpt.folder, tmp, {INDEX_NAME})
        weight_map: dict[str, str] = {}
        total = 0
        for shard, names in ckpt.shards.items():
            items = items_of(names)
            _write(tmp / shard, ckpt, items, metadata, progress)
            for name, shape, dtype in (spec for item in items for spec in item.outputs):
                weight_map[name] = shard
                total += nbytes(shape, dtype)
        if (ckpt.folder / INDEX_NAME).is_file():
            index = json.loads((ckpt.folder / INDEX_NAME).read_text())
            index["metadata"] = {**index.get("metadata", {}), **metadata, "total_size": total}
            index["weight_map"] = weight_map
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return notes


def copy_side_files(folder: Path, out: Path, skip: set[str], shown: str = "") -> list[str]:
    """Copy the source folder's other files (config, tokenizer, sentence-transformers' `1_Pooling/`, ...) into
    `out`: regular files and real sub-folders only, never what a symlink points to (it could be any file on the
    machine), never hidden entries (`.git`, caches). Returns notes naming what was skipped."""
    notes: list[str] = []
    for item in sorted(folder.iterdir()):
        if item.name in skip or item.name.startswith(".") or (item.suffix == ".safetensors" and item.parent == folder):
            continue
        if item.is_symlink() or not (item.is_file() or item.is_dir()):
            notes.append(f"not copied (a symlink or special file, not a regular file of the source folder): {shown}{item.name}")
        elif item.is_dir():
            (out / item.name).mkdir(exist_ok=True)
            notes += copy_side_files(item, out / item.name, set(), f"{shown}{item.name}/")
        else:
            shutil.copy2(item, out / item.name)
    return notes
