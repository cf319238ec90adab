"""Where tensors live. A run's device comes from `run_device` alone, and every batch, metric and collective reaches
it through `place`, so a CUDA or multi-GPU run differs from a CPU run only here.

Under `torchrun` each process takes the GPU of its local rank (`cuda:LOCAL_RANK`, made the current device), which
is what nccl needs: one device per rank, and collectives over tensors on that device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nmcli.errors import NMSparseError


def run_device(requested: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """The device this process computes on: `cpu`, or `cuda` (`cuda:LOCAL_RANK` under torchrun)."""
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise NMSparseError(f"--device {requested!r}: not a device; use cpu or cuda") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise NMSparseError(f"--device {requested}: nmsparse computes on cpu or cuda")
    if not torch.cuda.is_available():
        raise NMSparseError(f"--device {requested}: no CUDA device is visible to this process; use --device cpu")
    if device.index is not None and world > 1:
        raise NMSparseError(
            f"--device {requested}: with {world} processes every rank would share one GPU; pass --device cuda "
            "and each rank takes the GPU of its local rank"
        )
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise NMSparseError(
            f"--device {requested}: this process needs cuda:{index} but {torch.cuda.device_count()} GPU(s) are visible; "
            "start at most one process per GPU"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run on hardware made for them: a CUDA GPU that supports bf16, or a CPU with
    oneDNN's bf16 path (AVX512 / AVX512-BF16 / AMX). Without it torch computes bf16 products element by element (on
    an AVX2 CPU, bench/bf16_speed.py: tens of times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_warning(device: torch.device) -> str | None:
    """The line a run asked to compute in bf16 prints where bf16 is emulated; None where it is native."""
    if bf16_is_native(device):
        return None
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    return (f"warning: --bf16 on a {device.type} without native bf16 ({capability}): bf16 matrix products are emulated "
            "here and run many times slower than fp32 (bench/bf16_speed.py measures it); drop --bf16 (and "
            "training.bf16) on this machine")


def place(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, tuple/list or dict of tensors, or anything else unchanged) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: place(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(place(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
