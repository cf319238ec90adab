"""Checkpoint sources: read tensor headers without loading data, and one tensor at a time on demand.

Supported: a safetensors file; a folder of sharded safetensors with `model.safetensors.index.json`; a Hugging Face
model folder (config.json + safetensors); an in-memory state dict (timm model + `.pth`/safetensors checkpoint).
Which reader a path needs (these, nm_format's or onnx_source's) is io/opener.py's choice.
Nothing here unpickles untrusted data: `.pth` files go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nmcli.errors import NMSparseError
from nmcli.io.safetensors_stream import DTYPES_BY_NAME, nbytes, opened, read_exactly

INDEX_NAME = "model.safetensors.index.json"
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state", "module")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str  # file name inside the source ("" for in-memory sources)
    offset: int = 0  # byte offset of the data in the file (safetensors sources)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass
class Checkpoint:
    """A set of named tensors, readable one at a time. `shards` keeps the file grouping for sharded output."""

    where: str
    infos: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    shards: dict[str, list[str]] = field(default_factory=dict)
    folder: Path | None = None  # set for folder sources: other files (config, tokenizer) live here
    hf_config: dict | None = None
    _tensors: Mapping[str, torch.Tensor] | None = None
    graph_layouts: dict[str, str] | None = None  # ONNX: initializer -> layout name, from how the graph uses it

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """A tensor the caller owns (in-memory sources return theirs: do not modify it in place).

        Read with plain file I/O rather than through a memory map, so reading a tensor costs its size in
        memory once, not twice (mapped pages plus the copy). `into`, a uint8 buffer of at least the tensor's
        size, is reused instead of a fresh allocation, whose page faults cost as much as the read itself.
        """
        info = self.infos[name]
        if self._tensors is not None:
            return self._tensors[name]
        path, _ = self.stored_at(name)
        if into is None:
            tensor = torch.empty(info.shape, dtype=info.dtype)
        else:
            tensor = into[: info.nbytes].view(info.dtype).view(info.shape)
        with opened(path, name) as fd:
            read_exactly(fd, tensor.view(-1).view(torch.uint8).numpy().data, info.offset, path, name)
        return tensor

    def stored_at(self, name: str) -> tuple[Path, int] | None:
        """The file (its shard, for a folder) and byte offset where tensor `name` lies as it is read; None when it
        is not stored as such (in memory, or decoded on read)."""
        if self._tensors is not None:
            return None
        info = self.infos[name]
        return (self.folder / info.shard) if self.folder is not None else Path(self.where), info.offset

    @property
    def is_in_memory(self) -> bool:
        """In-memory tensors belong to the caller and must not be changed in place."""
        return self._tensors is not None


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The safetensors library validates the file (header, offsets, size); the offsets come from the header."""
    if not path.is_file():
        raise NMSparseError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        with open(path, "rb") as raw:
            header_len = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_len))
    except (SafetensorError, OSError, ValueError) as exc:
        raise NMSparseError(
            f"{path}: not a readable safetensors file ({exc}); check that it is complete and not corrupt"
        ) from None
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES_BY_NAME:
            raise NMSparseError(f"{path}: tensor {name} has dtype {entry['dtype']}, which nmsparse cannot read")
        infos[name] = TensorInfo(
            name, tuple(entry["shape"]), DTYPES_BY_NAME[entry["dtype"]], path.name, 8 + header_len + entry["data_offsets"][0]
        )
    return infos, metadata


def open_safetensors_file(path: Path) -> Checkpoint:
    infos, metadata = _read_header(path)
    return Checkpoint(where=str(path), infos=infos, metadata=metadata, shards={path.name: list(infos)})


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NMSparseError(f"{path}: not valid JSON ({exc})") from None


def _inside(folder: Path, name: str, where: Path) -> None:
    """Accept a plain file name that resolves to a regular file in `folder` itself, else an error:
    names read from a file never lead outside the source folder (no `..`, no absolute path, no sub-folder, no
    symlink pointing elsewhere)."""
    path = folder / name
    if not name or Path(name).name != name or name in (".", ".."):
        raise NMSparseError(f"{where}: shard {name!r} is not a plain file name in {folder}; shards must sit beside the index")
    if path.resolve().parent != folder.resolve() or (path.exists() and not path.resolve().is_file()):
        raise NMSparseError(f"{where}: shard {name!r} does not resolve to a regular file inside {folder}")


def _index_shards(folder: Path, index_path: Path) -> tuple[dict[str, str], list[str]]:
    data = _load_json(index_path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise NMSparseError(
            f"{index_path}: no 'weight_map' object of tensor name -> shard file name; is this a Hugging Face sharded index?"
        )
    shard_names = list(dict.fromkeys(weight_map.values()))
    for shard in shard_names:
        _inside(folder, shard, index_path)
    return weight_map, shard_names


def open_folder(folder: Path) -> Checkpoint:
    """A sharded folder (index.json) or a Hugging Face folder with a single model.safetensors."""
    index_path = folder / INDEX_NAME
    weight_map: dict[str, str] = {}
    if index_path.is_file():
        weight_map, shard_names = _index_shards(folder, index_path)
    else:
        shard_names = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(shard_names) != 1:
            raise NMSparseError(
                f"{folder}: expected {INDEX_NAME} or exactly one .safetensors file, found {len(shard_names)}"
            )
        _inside(folder, shard_names[0], folder)
    infos: dict[str, TensorInfo] = {}
    shards: dict[str, list[str]] = {}
    metadata: dict[str, str] = {}
    for shard in shard_names:
        shard_infos, shard_meta = _read_header(folder / shard)
        for name in shard_infos:
            if name in infos:
                raise NMSparseError(
                    f"{folder}: tensor {name} is stored in both {infos[name].shard} and {shard}; "
                    "a checkpoint must hold each tensor once"
                )
            if weight_map and weight_map.get(name, shard) != shard:
                raise NMSparseError(f"{index_path}: tensor {name} is listed in {weight_map[name]} but stored in {shard}")
        infos.update(shard_infos)
        shards[shard] = list(shard_infos)
        metadata = metadata or shard_meta
    missing = sorted(set(weight_map) - set(infos))
    if missing:
        raise NMSparseError(f"{index_path}: tensor {missing[0]} is listed but not found in its shard")
    config_path = folder / "config.json"
    hf_config = _load_json(config_path) if config_path.is_file() else None
    if hf_config is not None and not isinstance(hf_config, dict):
        raise NMSparseError(f"{config_path}: expected a JSON object")
    return Checkpoint(
        where=str(folder), infos=infos, metadata=metadata, shards=shards, folder=folder, hf_config=hf_config
    )


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise NMSparseError(f"{path}: no state dict found (looked under {', '.join(STATE_DICT_WRAPPERS)})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely: safetensors, or a torch file with weights_only=True."""
    if not path.is_file():
        raise NMSparseError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        source = open_safetensors_file(path)
        return {name: source.read(name) for name in source.infos}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise NMSparseError(
            f"{path}: refused to load: it holds more than tensors and nmsparse never unpickles untrusted "
            f"code ({str(exc).splitlines()[0]}); re-save it as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise NMSparseError(f"{path}: not a readable torch checkpoint ({exc}); it may be truncated") from None
    return _unwrap_state_dict(obj, path)


def in_memory(where: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Checkpoint:
    infos = {name: TensorInfo(name, tuple(t.shape), t.dtype, "") for name, t in tensors.items()}
    return Checkpoint(where=where, infos=infos, metadata=metadata or {}, shards={}, _tensors=tensors)
