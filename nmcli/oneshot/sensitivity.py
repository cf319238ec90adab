"""`prune --budget`'s measure: how much the model's output moves when one layer alone is pruned to one pattern.

For every target layer and every sparse candidate, the layer's weight is masked by the method's own criterion
(|W| for magnitude, Wanda's |W|·‖x_j‖ for the calibrated methods, ‖x_j‖ from the dense model), the base model runs
on a probe of calibration tokens, and the cost is the relative squared change of its last hidden state over the
real (unpadded) tokens, ‖H' − H‖² / ‖H‖²; the weight is then restored. The blocks before the probed layer's are
replayed from the dense pass, not run again. The costs feed allocation.py, which treats
them as additive across layers (they are measured one layer at a time).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nmcli.runtime.device import model_device, place
from nmcli.errors import NMSparseError
from nmcli.models.architecture import base_model
from nmcli.models.targets import LayerInfo
from nmcli.nm import NMPattern, nm_mask, reduction_length
from nmcli.oneshot.calibrate import find_blocks

PROBE_SAMPLES = 8
PROBE_TOKENS = 128  # the probe's sequences are cut to this length: the cost is layers x candidates forward passes


@dataclass
class Sensitivity:
    costs: dict[str, dict[NMPattern, float]]  # module -> pattern -> relative output change (dense patterns: 0)
    seconds: float


def probe_batch(batches: list[dict]) -> dict[str, torch.Tensor]:
    """The first calibration batch, at most PROBE_SAMPLES sequences of at most PROBE_TOKENS tokens."""
    return {key: value[:PROBE_SAMPLES, :PROBE_TOKENS] for key, value in batches[0].items()}


def base_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model's last hidden state on the batch's real tokens [tokens, hidden] (no LM head: its logits are
    the largest tensor of a small LM and add nothing a ranking of layers needs)."""
    with torch.no_grad():
        hidden = base_model(model)(**place(batch, model_device(model))).last_hidden_state
    mask = batch.get("attention_mask")
    return hidden[mask.bool().to(hidden.device)] if mask is not None else hidden.reshape(-1, hidden.shape[-1])


def criterion(weight: torch.Tensor, layer: LayerInfo, norms: torch.Tensor | None) -> torch.Tensor:
    """What the mask ranks: |W|, or |W|·‖x_j‖ along the K axis when the input norms are known."""
    score = weight.detach().float().abs()
    if norms is None:
        return score
    shape = [1] * score.dim()
    shape[layer.layout.k_axis] = -1
    return score * norms.to(score.device).reshape(shape)


class BlockReplay:
    """The dense outputs of the model's blocks on the probe, replayed: while a layer of block b is probed, blocks
    0..b-1 return what they returned in the dense pass instead of running (their inputs have not changed), so a
    probe costs the blocks from b on, and the output is exactly what a full forward pass would give."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        try:
            self.prefix, self.blocks = find_blocks(model)
        except NMSparseError:
            self.prefix, self.blocks = "", []
        self.outputs: list[Any] = []
        handles = [block.register_forward_hook(lambda _m, _args, out: self.outputs.append(out)) for block in self.blocks]
        try:
            self.dense = base_output(model, batch)
        finally:
            for handle in handles:
                handle.remove()

    def block_of(self, module: str) -> int:
        """How many blocks come before `module`'s (0 for a layer outside the blocks)."""
        for index in range(len(self.blocks)):
            if module.startswith(f"{self.prefix}.{index}."):
                return index
        return 0

    @contextlib.contextmanager
    def skipping(self, count: int) -> Iterator[None]:
        for block, out in zip(self.blocks[:count], self.outputs):
            block.forward = lambda *_args, out=out, **_kwargs: out  # the instance's attribute shadows the class's
        try:
            yield
        finally:
            for block in self.blocks[:count]:
                del block.forward


def measure_sensitivity(model: nn.Module, layers: dict[str, LayerInfo], candidates: dict[str, list[NMPattern]],
                        batch: dict[str, torch.Tensor], norms: dict[str, torch.Tensor] | None,
                        progress: Callable[[int, int], None] = lambda done, total: None) -> Sensitivity:
    """`costs[module][pattern]` for every target module (keyed by module name) and each of its candidates."""
    started = time.perf_counter()
    modules = dict(model.named_modules())
    replay = BlockReplay(model, batch)
    energy = replay.dense.float().pow(2).sum().clamp_min(1e-30)
    total, done = sum(len(c) for c in candidates.values()), 0
    costs: dict[str, dict[NMPattern, float]] = {}
    for name, layer in layers.items():
        weight = modules[name].weight
        original = weight.detach().clone()
        score = criterion(original, layer, (norms or {}).get(name))
        costs[name] = {}
        for pattern in candidates[name]:
            if pattern.is_dense:
                costs[name][pattern] = 0.0
            else:
                with torch.no_grad():
                    weight.mul_(nm_mask(score, pattern, layer.layout).to(weight.dtype))
                with replay.skipping(replay.block_of(name)):
                    moved = base_output(model, batch).float() - replay.dense.float()
                costs[name][pattern] = float(moved.pow(2).sum() / energy)
                with torch.no_grad():
                    weight.copy_(original)
            done += 1
            progress(done, total)
    return Sensitivity(costs, round(time.perf_counter() - started, 2))


def layer_candidates(shapes: dict[str, torch.Size], layers: dict[str, LayerInfo],
                     candidates: list[NMPattern]) -> dict[str, list[NMPattern]]:
    """Each layer's candidates: those whose M divides its K (dense always fits)."""
    return {name: [p for p in candidates if p.is_dense or reduction_length(shapes[name], layer.layout) % p.m == 0]
            for name, layer in layers.items()}
