"""nmsparse's own compressed N:M layout (`nm`), for any N:M. Specified in docs/format.md.

Per N:M tensor `T` (dense shape S, reduction axis k, pattern N:M), with the K axis moved last (channels-last for
convs) and cut into groups of M:
- `T.nm_values`: the N kept values of every group, in ascending position order, original dtype, shape
  S' = S with K moved last and replaced by K*N/M.
- `T.nm_positions`: uint8, 1-D: the in-group position (0..M-1) of each kept value, b = ceil(log2 M) bits each,
  concatenated as a little-endian bit stream (bit 0 = least significant bit of byte 0).
Everything else is stored as is. A group with fewer than N non-zeros stores zeros at the lowest free positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import json
from dataclasses import dataclass

from nmcli.errors import NMSparseError
from nmcli.io.metadata import FORMAT
from nmcli.io.sources import Checkpoint, TensorInfo
from nmcli.io.safetensors_stream import DTYPE_NAMES, DTYPES_BY_NAME
from nmcli.nm import Layout, NMPattern, group_mask, layout_by_name, parse_pattern
from nmcli.nm.layout import from_groups, to_groups

FORMAT_NAME = "nm-compressed"
FORMAT_VERSION = "1"
VERSION_KEY = "nmsparse.nm_format_version"
TENSORS_KEY = "nmsparse.nm_tensors"  # {dense name: {"pattern", "layout", "k_axis", "shape", "dtype", "index_bits"}}
VALUES_SUFFIX = ".nm_values"
POSITIONS_SUFFIX = ".nm_positions"


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def packed_shapes(shape: tuple[int, ...], pattern: NMPattern, layout: Layout) -> tuple[tuple[int, ...], int]:
    """(values shape, positions byte count) of a dense tensor of `shape`: known before reading any data."""
    moved = list(shape)
    k = moved.pop(layout.k_axis)
    values_shape = (*moved, k * pattern.n // pattern.m)
    codes = math.prod(values_shape)
    return values_shape, (codes * index_bits(pattern.m) + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit stream of `codes` (each < 2**bits, any width: M > 256 needs more than 8 bits)."""
    c = codes.to(torch.int64).reshape(-1, 1).numpy()
    planes = ((c >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)  # [codes, bits], bit 0 first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    planes = np.unpackbits(stream.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy((planes.astype(np.int64) << np.arange(bits)).sum(axis=1))


def compress(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, packed positions) of an N:M-compliant tensor: the non-zeros are always among the N kept."""
    groups = to_groups(weight, layout, pattern.m)
    keep = group_mask(groups, pattern.n)  # exactly N per group; for a compliant tensor it covers every non-zero
    positions = keep.nonzero()[:, 1].reshape(-1, pattern.n)  # row-major: ascending within each group
    values = groups[keep].reshape(-1, pattern.n)
    values_shape, _ = packed_shapes(tuple(weight.shape), pattern, layout)
    return values.reshape(values_shape).contiguous(), pack_bits(positions, index_bits(pattern.m))


def decompress(
    values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, ...], pattern: NMPattern, layout: Layout
) -> torch.Tensor:
    """The dense tensor; positions that are out of range or not strictly increasing in a group are refused
    (a corrupt file would otherwise decode to other weights that still look N:M)."""
    groups_count = values.numel() // pattern.n
    index = unpack_bits(positions, index_bits(pattern.m), groups_count * pattern.n).reshape(groups_count, pattern.n)
    bad = (index >= pattern.m).any(dim=1) | (index[:, 1:] <= index[:, :-1]).any(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise NMSparseError(
            f"corrupt positions in group {first} ({index[first].tolist()} for {pattern}): each group needs "
            f"{pattern.n} strictly increasing positions below {pattern.m}"
        )
    groups = torch.zeros(groups_count, pattern.m, dtype=values.dtype)
    groups.scatter_(1, index, values.reshape(groups_count, pattern.n))
    return from_groups(groups, shape, layout).contiguous()


def tensor_entry(name: str, shape: tuple[int, ...], dtype: torch.dtype, pattern: NMPattern, layout: Layout) -> dict:
    return {
        "pattern": str(pattern), "layout": layout.name, "k_axis": layout.k_axis, "shape": list(shape),
        "dtype": DTYPE_NAMES[dtype], "index_bits": index_bits(pattern.m),
        "values": name + VALUES_SUFFIX, "positions": name + POSITIONS_SUFFIX,
    }


def is_nm_compressed(metadata: dict[str, str]) -> bool:
    return metadata.get(FORMAT) == FORMAT_NAME


@dataclass
class _Entry:
    pattern: NMPattern
    layout: Layout
    info: TensorInfo


class DenseView(Checkpoint):
    """An `nm`-compressed checkpoint seen as its dense tensors, decompressed one at a time on read."""

    def __init__(self, packed: Checkpoint, entries: dict[str, _Entry]):
        infos: dict[str, TensorInfo] = {}
        shards: dict[str, list[str]] = {}
        for shard, names in (packed.shards or {"": list(packed.infos)}).items():
            for name in names:
                logical = self._logical(name, entries)
                if logical is None:
                    continue
                infos[logical] = entries[logical].info if logical in entries else packed.infos[name]
                shards.setdefault(shard, []).append(logical)
        super().__init__(packed.where, infos, packed.metadata, shards if packed.shards else {}, packed.folder, packed.hf_config)
        self.packed = packed
        self.entries = entries

    @staticmethod
    def _logical(name: str, entries: dict[str, _Entry]) -> str | None:
        """The dense name a stored tensor stands for (None for positions, which travel with the values)."""
        if name.endswith(VALUES_SUFFIX) and name.removesuffix(VALUES_SUFFIX) in entries:
            return name.removesuffix(VALUES_SUFFIX)
        if name.endswith(POSITIONS_SUFFIX) and name.removesuffix(POSITIONS_SUFFIX) in entries:
            return None
        return name

    def stored_at(self, name: str) -> tuple[Path, int] | None:
        return None if name in self.entries else self.packed.stored_at(name)

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            return self.packed.read(name, into=into)
        values = self.packed.read(name + VALUES_SUFFIX)
        positions = self.packed.read(name + POSITIONS_SUFFIX)
        try:
            return decompress(values, positions, entry.info.shape, entry.pattern, entry.layout)
        except NMSparseError as exc:
            raise NMSparseError(f"{self.where}: tensor {name}: {exc}; the file is damaged, re-export it") from None


def dense_view(packed: Checkpoint) -> DenseView:
    try:
        table = json.loads(packed.metadata[TENSORS_KEY])
        entries = {
            name: _Entry(
                parse_pattern(e["pattern"]),
                layout_by_name(e["layout"]),
                TensorInfo(name, tuple(e["shape"]), DTYPES_BY_NAME[e["dtype"]], ""),
            )
            for name, e in table.items()
        }
    except (KeyError, ValueError, TypeError, NMSparseError) as exc:
        raise NMSparseError(f"{packed.where}: broken nm-compressed metadata ({exc}); re-export it") from None
    for name, entry in entries.items():
        values_shape, positions_bytes = packed_shapes(entry.info.shape, entry.pattern, entry.layout)
        got_values = packed.infos.get(name + VALUES_SUFFIX)
        got_positions = packed.infos.get(name + POSITIONS_SUFFIX)
        if got_values is None or got_positions is None:
            raise NMSparseError(f"{packed.where}: tensor {name} is listed as nm-compressed but its data is missing")
        if got_values.shape != values_shape or got_positions.numel != positions_bytes or len(got_positions.shape) != 1:
            raise NMSparseError(f"{packed.where}: tensor {name}: stored sizes do not match its pattern {entry.pattern}")
        if got_values.dtype != entry.info.dtype or got_positions.dtype != torch.uint8:
            raise NMSparseError(
                f"{packed.where}: tensor {name}: stored as {got_values.dtype} values / {got_positions.dtype} positions, "
                f"but the table says {entry.info.dtype} / torch.uint8; the file is damaged, re-export it"
            )
    return DenseView(packed, entries)
