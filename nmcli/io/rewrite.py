"""Stream a checkpoint into a new one, item by item: read some tensors, turn them into others, write them.

One pipeline serves prune (a tensor -> its pruned self), the `nm` export (a tensor -> values + positions), the
`dense` export (values + positions -> a tensor) and the compressed-tensors export. A worker thread reads and
transforms the next items while the caller writes the current one (I/O and torch kernels release the GIL); it runs
ahead only while it holds less than the largest item, so peak memory is about twice the largest item. In-place work
on an item (prune's masking) comes in independent pieces that both threads take, whichever is free: the reading
thread after reading the item, the writing thread before writing it, so neither waits while the other is busy,
whether writing or reading is the slower side on this machine at this moment. A tensor kept as it is (a copy
item of a file source) is not read at all: the writer writes it from the file's memory map (`SourceBytes`). Output is
written atomically: a file, or a folder with the same shards (index rewritten) for a folder source.
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
from nmcli.io.safetensors_stream import SourceBytes, nbytes, write_streaming
from nmcli.io.sources import INDEX_NAME, Checkpoint

Spec = tuple[str, tuple[int, ...], torch.dtype]
Progress = Callable[[str, int], None]  # (item name, bytes read for it)


Piece = Callable[[], None]


def _as_is(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


@dataclass
class Item:
    """`produce(inputs)` turns the tensors named `inputs` into tensors matching `outputs`, on the reading thread;
    `pieces(produced)` is then in-place work on those tensors in independent pieces, run by whichever thread is free
    (see `_Pieces`) before they are written. `as_source`: the output is the one input's bytes, changed (if at all)
    only by `pieces`; with no pieces and a file source it is written from the file (`SourceBytes`), never read."""

    inputs: list[str]
    outputs: list[Spec]
    produce: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    pieces: Callable[[list[torch.Tensor]], list[Piece]] | None = None
    as_source: bool = False


def copy_item(ckpt: Checkpoint, name: str) -> Item:
    info = ckpt.infos[name]
    return Item([name], [(name, info.shape, info.dtype)], _as_is, as_source=True)


class _Pieces:
    """One item's pieces of work, each taken by exactly one thread: the reading thread `help`s after reading the
    item, the writing thread `finish`es (helps, then waits for pieces still running elsewhere) before writing it."""

    def __init__(self) -> None:
        self._todo: deque[Piece] = deque()
        self._running = 0
        self._idle = threading.Condition()

    def add(self, pieces: list[Piece]) -> None:
        with self._idle:
            self._todo.extend(pieces)

    def help(self) -> None:
        while True:
            with self._idle:
                if not self._todo:
                    return
                piece = self._todo.popleft()
                self._running += 1
            try:
                piece()
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

    def finish(self) -> None:
        self.help()
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0)


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
    """An item kept unchanged, as the writer copies it from the source file: never read into the process (so it
    takes no room either). None for every other item."""
    stored = ckpt.stored_at(item.inputs[0]) if item.as_source and item.pieces is None else None
    return None if stored is None else SourceBytes(*stored, ckpt.infos[item.inputs[0]].nbytes)


def _produced(ckpt: Checkpoint, items: list[Item], progress: Progress) -> Iterator[torch.Tensor | SourceBytes]:
    sources = [_source_bytes(ckpt, item) for item in items]
    read_bytes = [0 if source is not None else _input_bytes(ckpt, item) for item, source in zip(items, sources)]
    budget = max(read_bytes, default=0)
    pool = None if ckpt.is_in_memory else _BufferPool()
    queue: deque[tuple[Future, _Pieces, Future, list[torch.Tensor]]] = deque()
    ahead = submitted = 0  # bytes submitted but not yet handed over; items submitted

    def work(item: Item, source: SourceBytes | None, buffers: list[torch.Tensor], pieces: _Pieces) -> list[torch.Tensor]:
        if source is not None:
            return []
        tensors = [ckpt.read(n, into=b) for n, b in zip(item.inputs, buffers)] if pool else [ckpt.read(n) for n in item.inputs]
        produced = item.produce(tensors)
        pieces.add(item.pieces(produced) if item.pieces else [])
        return produced

    def refill() -> None:
        nonlocal ahead, submitted
        while submitted < len(items) and (ahead < budget or not queue):  # at least one, even if all are empty
            item, pieces = items[submitted], _Pieces()
            source = sources[submitted]
            buffers = [pool.take(ckpt.infos[n].nbytes) for n in item.inputs] if pool and source is None else []
            read = worker.submit(work, item, source, buffers, pieces)
            queue.append((read, pieces, worker.submit(pieces.help), buffers))  # the reader's share, right after reading
            ahead += read_bytes[submitted]
            submitted += 1

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmsparse-read") as worker:
        refill()
        for item, size, source in zip(items, read_bytes, sources):
            read, pieces, helped, buffers = queue.popleft()
            produced = read.result()
            ahead -= size
            refill()  # the worker reads ahead while the caller finishes and writes this item
            pieces.finish()
            helped.result()  # a piece the reading thread ran may have failed
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
    """The worker's torch kernels on one core, the writer's copies on the other: with two OpenMP threads the
    worker competes with the writer for both cores (measured on 2 cores, 2 GiB: 1.1-2.0x the time of a plain
    copy, against 1.2-2.3x with two threads and 1.7-2.6x when reading into a memory-mapped output instead)."""
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
