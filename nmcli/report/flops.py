"""FLOPs of a model at its real input shape: dense, theoretical sparse and 2:4-hardware-effective.

Counted with `torch.utils.flop_counter` (FLOPs = 2 x multiply-accumulates) on tensors without storage: the meta
device for timm models, fake CPU tensors for Hugging Face models (their forward enters `torch.autocast` for the
input's device type, which the meta device does not support). Each weight layer's GEMM/conv FLOPs are then scaled by
its weight density (methods.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from nmcli.errors import NMSparseError
from nmcli.models.architecture import ModelRef, build_model, data_config


@dataclass
class Flops:
    input_shape: tuple[int, ...]
    dense: int
    sparse: int  # each weight layer scaled by its density
    hw24: int  # layers that run on 2:4 sparse tensor cores count at half
    per_layer: dict[str, int]  # module name -> dense FLOPs of its weight op


def example_inputs(
    model: torch.nn.Module, ref: ModelRef, seq_len: int, device: str = "meta", batch: int = 1
) -> dict[str, torch.Tensor]:
    """The model's real input shape (timm data config; token ids for Hugging Face), on `device`."""
    if ref.source == "timm":
        generator = torch.Generator().manual_seed(0) if device != "meta" else None
        return {"x": torch.randn(batch, *data_config(model, ref)["input_size"], generator=generator, device=device)}
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len) or seq_len)
    ids = torch.arange(batch * seq_len, device=device).reshape(batch, seq_len) % 100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def per_layer_flops(ref: ModelRef, seq_len: int = 128) -> tuple[tuple[int, ...], int, dict[str, int]]:
    """(input shape, total FLOPs, FLOPs of each module) for one forward pass at batch 1."""
    fake = ref.source == "hf"
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        model = build_model(ref, device="cpu" if fake else "meta").eval()
        inputs = example_inputs(model, ref, seq_len, device="cpu" if fake else "meta")
        shape = tuple(next(iter(inputs.values())).shape)
        try:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(**inputs)
        except Exception as exc:  # any model's forward may fail on tensors without storage: say why, go on
            raise NMSparseError(f"cannot trace {ref.name} on input {list(shape)}: {exc}") from None
    root = type(model).__name__ + "."
    counts = {
        key.removeprefix(root): sum(ops.values())
        for key, ops in counter.get_flop_counts().items()
        if key.startswith(root)
    }
    return shape, counter.get_total_flops(), counts


def target_costs(ref: ModelRef, k_lengths: dict[str, int], seq_len: int = 128) -> tuple[int, dict[str, tuple[int, int]]]:
    """(dense forward FLOPs of the model, target module -> (its dense forward FLOPs, its reduction length K)): what
    the training-FLOPs account of methods §5 needs, given each target module's K."""
    _, total, per_layer = per_layer_flops(ref, seq_len)
    return total, {module: (per_layer.get(module, 0), k) for module, k in k_lengths.items()}


def count_flops(
    ref: ModelRef, densities: dict[str, float], hw24_modules: set[str], seq_len: int = 128
) -> Flops:
    """`densities`: module name -> weight density; `hw24_modules`: modules exactly 2:4 and tensor-core eligible."""
    shape, total, counts = per_layer_flops(ref, seq_len)
    layers = {module: counts.get(module, 0) for module in densities}
    sparse = total - sum(round(flops * (1 - densities[m])) for m, flops in layers.items())
    hw24 = total - sum(flops // 2 for m, flops in layers.items() if m in hw24_modules)
    return Flops(shape, total, sparse, hw24, layers)
