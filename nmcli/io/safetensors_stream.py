"""A streaming safetensors writer: header first, then one tensor at a time.

safetensors' own `save_file` needs every tensor in memory at once; pruning a checkpoint larger than memory
needs to write tensor by tensor. The format is simple (8-byte little-endian header length, a JSON header with
dtype/shape/data_offsets, then raw little-endian bytes), so this is written by hand; files it writes are read
back by the safetensors library in the tests.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
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


def write_streaming(
    path: Path,
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (yielded in `layout` order, each matching its declared shape and dtype) to `path`."""
    # Not open(path, "wb"): atomic_output hands over an empty temporary file, and truncating an existing file (even
    # an empty one) makes ext4 write every byte to disk when it is closed (auto_da_alloc): 1 s per 2 GiB here.
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666), "wb") as f:
        if f.seek(0, os.SEEK_END):
            f.seek(0)
            f.truncate()
        f.write(encode_header(layout, metadata))
        for (name, shape, dtype), tensor in zip(layout, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise NMSparseError(
                    f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(shape)} {dtype}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)
            del tensor, data  # let the producer's next tensor reuse this memory
