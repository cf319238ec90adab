"""Which axis of a weight is the reduction (GEMM K) axis, and the [groups, M] view along it.

This module is the single definition of "which axis is K" used by prune, finetune, report and export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmcli.errors import NMSparseError


@dataclass(frozen=True)
class Layout:
    """How a layer stores its weight: `name` for metadata, `k_axis` the reduction axis of the stored tensor."""

    name: str
    k_axis: int


LINEAR = Layout("linear", 1)  # nn.Linear [out, in]
CONV = Layout("conv", 1)  # nn.ConvNd [O, I/groups, *k]: channels at each kernel tap
HF_CONV1D = Layout("hf_conv1d", 0)  # transformers Conv1D [in, out]
LINEAR_T = Layout("linear_t", 0)  # a Linear weight stored transposed [in, out], e.g. an ONNX MatMul initializer
LAYOUTS = {layout.name: layout for layout in (LINEAR, CONV, HF_CONV1D, LINEAR_T)}


def layout_by_name(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise NMSparseError(f"unknown weight layout {name!r}; known: {', '.join(LAYOUTS)}") from None


def reduction_length(shape: tuple[int, ...] | torch.Size, layout: Layout) -> int:
    return int(shape[layout.k_axis])


def to_groups(weight: torch.Tensor, layout: Layout, m: int) -> torch.Tensor:
    """View `weight` as [groups, m], each row m consecutive weights along K (channels-last for convs)."""
    moved = weight.movedim(layout.k_axis, -1)
    if moved.shape[-1] % m:
        raise NMSparseError(f"reduction length K={moved.shape[-1]} is not divisible by M={m}")
    return moved.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: tuple[int, ...] | torch.Size, layout: Layout) -> torch.Tensor:
    """Inverse of `to_groups`: back to the stored `shape`."""
    moved_shape = list(shape)
    k = moved_shape.pop(layout.k_axis)
    moved_shape.append(k)
    return groups.reshape(moved_shape).movedim(-1, layout.k_axis)
