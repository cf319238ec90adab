"""The one opener of checkpoints on disk: it picks the reader a path needs and calls it.

The readers (io/sources.py: safetensors files and folders; io/nm_format.py: the `nm` layout, opened as its dense
tensors; io/onnx_source.py: an ONNX graph's initializers) import only the `Checkpoint` they return, never each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nmcli.errors import NMSparseError
from nmcli.io.nm_format import dense_view, is_nm_compressed
from nmcli.io.onnx_source import open_onnx
from nmcli.io.sources import Checkpoint, open_folder, open_safetensors_file


def open_path(path: Path) -> Checkpoint:
    """Any checkpoint on disk; an `nm`-compressed one opens as its dense tensors (see io/nm_format.py)."""
    if path.is_dir():
        ckpt = open_folder(path)
    elif not path.exists():
        raise NMSparseError(f"{path}: no such file or folder")
    elif path.suffix == ".safetensors":
        ckpt = open_safetensors_file(path)
    elif path.suffix == ".onnx":
        return open_onnx(path)
    else:
        ckpt = None
    if ckpt is not None:
        return dense_view(ckpt) if is_nm_compressed(ckpt.metadata) else ckpt
    raise NMSparseError(
        f"{path}: expected a .safetensors file or a model folder; for a .pth checkpoint give "
        "the timm model name as SOURCE and the file with --checkpoint"
    )


def load_nm(path: str | Path) -> dict[str, torch.Tensor]:
    """Public loader: the exact dense tensors of an `nm`-compressed (or any) nmsparse safetensors file."""
    ckpt = open_path(Path(path))
    return {name: ckpt.read(name) for name in ckpt.infos}
