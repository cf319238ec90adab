"""A streaming safetensors writer: header first, then one tensor at a time.

safetensors' own `save_file` needs every tensor in memory at once; pruning a checkpoint larger than memory
needs to write tensor by tensor. The format is simple (8-byte little-endian header length, a JSON header with
dtype/shape/data_offsets, then raw little-endian bytes), so this is written by hand; files it writes are read
back by the safetensors library in the tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nmcli.errors import NMSparseError

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def encode_header(layout: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header of a file holding `layout` in order."""
    if sys.byteorder != "little":
        raise NMSparseError("writing safetensors needs a little-endian machine")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, shape, dtype in layout:
        if dtype not in DTYPE_NAMES:
            raise NMSparseError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        size = nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


@dataclass(frozen=True)
class RowChange:
    """In-place work on a tensor that may be done on any range of its rows (axis 0) on its own, ranges starting at
    multiples of `unit` rows: `apply(rows, which)` changes `rows`, the tensor's rows `which` (prune's mask, whose
    N:M groups lie along a row, or span `unit` rows when axis 0 is the reduction axis)."""

    apply: Callable[[torch.Tensor, slice], None]
    unit: int = 1

    def run(self, tensor: torch.Tensor) -> None:
        """The whole tensor at once."""
        self.apply(tensor, slice(0, tensor.shape[0]))


@dataclass(frozen=True)
class SourceBytes:
    """An output tensor that is the `nbytes` bytes at `offset` of the file `path` (a tensor of the source
    checkpoint), changed (if at all) by `change`. It is never read into the process as a whole: it goes through one
    small buffer, `CHUNK_BYTES` at a time (read, changed, written), which stays in the core's cache: faster than
    safetensors' own copy from its memory map, and much faster than a whole tensor read into memory, masked and
    written (bench/prune.py; README's benchmark section)."""

    path: Path
    offset: int
    nbytes: int
    change: RowChange | None = None


# Half the development VM's 1 MiB L2 per core: smaller buffers cost more calls, larger ones leave the cache (every
# size measured is in README's benchmark section).
CHUNK_BYTES = 512 * 2**10


def _write_all(fd: int, data: memoryview) -> None:
    """All of `data`: write() may take less than it is given."""
    while data:
        data = data[os.write(fd, data) :]


def _unreadable(path: Path, name: str, exc: OSError | None) -> NMSparseError:
    """`exc` None: the file ended early (it is shorter than its header says)."""
    if exc is None:
        return NMSparseError(f"{path}: cannot read tensor {name} (the file ends before it); the file may be truncated")
    return NMSparseError(f"{path}: cannot read tensor {name} ({exc.strerror or exc})")


@contextlib.contextmanager
def opened(path: Path, name: str) -> Iterator[int]:
    """A read-only descriptor of `path`, the file holding tensor `name` (for `read_exactly`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _unreadable(path, name, exc) from None
    try:
        yield fd
    finally:
        os.close(fd)


def read_exactly(fd: int, into: memoryview, offset: int, path: Path, name: str) -> None:
    """`into` filled from byte `offset` of `fd` (`opened(path, name)`): tensor `name`, or a part of it. An I/O
    error or a file that ends early is a one-line error naming both."""
    while into:
        try:
            got = os.preadv(fd, [into], offset)
        except OSError as exc:
            raise _unreadable(path, name, exc) from None
        if not got:
            raise _unreadable(path, name, None)
        into, offset = into[got:], offset + got


def _copy_source(fd: int, name: str, source: SourceBytes, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The source tensor, `CHUNK_BYTES` at a time (whole rows, at least `unit` of them, when it changes): read into
    one buffer, changed there by `source.change`, written."""
    if source.change is None:
        shape, dtype = (source.nbytes,), torch.uint8  # bytes as they are
    assert shape, "a change works on rows"
    row_bytes, unit = nbytes(shape[1:], dtype), source.change.unit if source.change else 1
    step = max(1, CHUNK_BYTES // max(1, row_bytes * unit)) * unit
    buffer = torch.empty(min(step, shape[0]) * row_bytes, dtype=torch.uint8)
    with opened(source.path, name) as src:
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            chunk = buffer[: (stop - start) * row_bytes]
            read_exactly(src, chunk.numpy().data, source.offset + start * row_bytes, source.path, name)
            if source.change is not None:
                source.change.apply(chunk.view(dtype).view(stop - start, *shape[1:]), slice(start, stop))
            _write_all(fd, chunk.numpy().data)


def _bytes_of(name: str, shape: tuple[int, ...], dtype: torch.dtype, tensor: torch.Tensor) -> memoryview:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise NMSparseError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(shape)} {dtype}")
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return data.view(torch.uint8).numpy().data


def write_streaming(
    path: Path,
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[torch.Tensor | SourceBytes],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (yielded in `layout` order, each matching its declared shape and dtype) to `path`."""
    # Not open(path, "wb"): atomic_output hands over an empty temporary file, and truncating an existing file (even
    # an empty one) makes ext4 write every byte to disk when it is closed (auto_da_alloc; README's benchmarks).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        if os.lseek(fd, 0, os.SEEK_END):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        header = encode_header(layout, metadata)
        _write_all(fd, memoryview(header))
        for (name, shape, dtype), tensor in zip(layout, tensors, strict=True):
            if isinstance(tensor, SourceBytes):
                if tensor.nbytes != nbytes(shape, dtype):
                    raise NMSparseError(f"tensor {name}: {tensor.nbytes} bytes in the source, declared {nbytes(shape, dtype)}")
                _copy_source(fd, name, tensor, shape, dtype)
            else:
                _write_all(fd, _bytes_of(name, shape, dtype, tensor))
            del tensor  # let the producer's next tensor reuse this memory
    finally:
        os.close(fd)
