"""A streaming safetensors writer: header first, then one tensor at a time.

safetensors' own `save_file` needs every tensor in memory at once; pruning a checkpoint larger than memory
needs to write tensor by tensor. The format is simple (8-byte little-endian header length, a JSON header with
dtype/shape/data_offsets, then raw little-endian bytes), so this is written by hand; files it writes are read
back by the safetensors library in the tests.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from collections.abc import Iterable
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
class SourceBytes:
    """An output tensor that is, unchanged, the `nbytes` bytes at `offset` of the file `path` (a tensor of the
    source checkpoint): written from the file's memory map, so the kernel copies page cache to page cache and
    the tensor is never read into the process (bench/prune.py's `stream` job: about the time of safetensors' own
    copy, where reading into a buffer and writing from it took 1.3-1.5x that on the development VM)."""

    path: Path
    offset: int
    nbytes: int


MAP_WINDOW = 16 * 2**20  # bytes of the source mapped at a time: the mapping's resident pages stay few


def _write_all(fd: int, data: memoryview) -> None:
    """All of `data`: write() may take less than it is given."""
    while data:
        data = data[os.write(fd, data) :]


def _unreadable(source: SourceBytes, name: str, exc: OSError | ValueError) -> NMSparseError:
    if isinstance(exc, ValueError):  # mmap: the file is shorter than its header says
        return NMSparseError(f"{source.path}: cannot read tensor {name} ({exc}); the file may be truncated")
    return NMSparseError(f"{source.path}: cannot read tensor {name} ({exc.strerror or exc})")


def _copy_region(fd: int, name: str, source: SourceBytes) -> None:
    """The source bytes, window by window; only reading the source is reported as such (a full disk is not)."""
    try:
        f = open(source.path, "rb")
    except OSError as exc:
        raise _unreadable(source, name, exc) from None
    with f:
        for start in range(source.offset, source.offset + source.nbytes, MAP_WINDOW):
            end = min(start + MAP_WINDOW, source.offset + source.nbytes)
            base = start - start % mmap.ALLOCATIONGRANULARITY
            try:
                window = mmap.mmap(f.fileno(), end - base, offset=base, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise _unreadable(source, name, exc) from None
            with window, memoryview(window) as view:
                _write_all(fd, view[start - base : end - base])


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
    # an empty one) makes ext4 write every byte to disk when it is closed (auto_da_alloc): 1 s per 2 GiB here.
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
                _copy_region(fd, name, tensor)
            else:
                _write_all(fd, _bytes_of(name, shape, dtype, tensor))
            del tensor  # let the producer's next tensor reuse this memory
    finally:
        os.close(fd)
