"""Sequential calibration, as in the reference implementations of Wanda and SparseGPT (methods.md §7).

The model's transformer blocks (the longest ModuleList of same-class modules) are processed in order. The
calibration activations entering block 0 are captured once; for block i, each target layer's H = 2·XᵀX / n is
accumulated from the block's forward pass on the current activations (at real tokens: rows of padding are left
out), the layers are pruned (and, for SparseGPT, updated), and the block is run again: its outputs, computed by the
already-pruned block, are what block i+1 sees. With --reconstruct the pruned block is then trained to the dense
model's activations at its depth (reconstruct.py), the dense stream carried alongside.
Target layers outside the blocks (e.g. BERT's pooler) are pruned by magnitude and listed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nmcli.runtime.device import model_device, place
from nmcli.errors import NMSparseError
from nmcli.models.targets import LayerInfo
from nmcli.nm import CONV, HF_CONV1D, NMPattern, apply_nm
from nmcli.oneshot.reconstruct import (
    DEFAULT_RELATIVE_RATE,
    BlockFit,
    block_output,
    one_sample_batches,
    reconstruct_block,
)
from nmcli.oneshot.solvers import SingularHessian, alps, reconstruction_error, refine_kept, sparsegpt, wanda

MAX_DAMP = 1.0  # a singular Hessian gets 10x more damping per try, up to this


class OneShotMethod(enum.Enum):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"
    ALPS = "alps"


def one_shot_start(start: str | None) -> OneShotMethod | None:
    """The method `finetune --start` names (`--start sparsegpt`: pruned in memory), None for a checkpoint or none."""
    return next((m for m in OneShotMethod if m.value == start), None)


@dataclass(frozen=True)
class SolverSettings:
    method: OneShotMethod
    pattern: NMPattern
    damp: float = 0.01
    block_size: int = 128
    own: dict[str, NMPattern] = field(default_factory=dict)  # module -> its pattern where not `pattern` (--budget)
    refine: int = 0  # conjugate-gradient steps re-fitting the kept weights after the mask (0: none)
    reconstruct: int = 0  # passes over the calibration batches training each pruned block to the dense one (0: none)
    reconstruct_lr: float = DEFAULT_RELATIVE_RATE  # their Adam learning rate over each matrix's kept-weight RMS

    def pattern_for(self, module: str) -> NMPattern:
        return self.own.get(module, self.pattern)


@dataclass
class OneShotResult:
    weights: dict[str, torch.Tensor]  # module name -> pruned weight (the module's own tensor and layout)
    errors: dict[str, float]  # module name -> ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs
    by_magnitude: list[str] = field(default_factory=list)  # no calibration input reached them, or no row view
    damped: dict[str, float] = field(default_factory=dict)  # layers whose Hessian needed more than --damp: damp used
    activation_bytes: int = 0  # the calibration activations held between blocks
    samples: int = 0  # calibration samples (sequences or images) the layers were fitted on
    seconds: float = 0.0
    permutation: dict | None = None  # prune --permute: what the channel reorder did (PermutationReport.to_dict)
    budget: dict | None = None  # prune --budget: the patterns chosen (BudgetReport.to_dict)
    block_fits: dict[str, BlockFit] = field(default_factory=dict)  # prune --reconstruct: block -> output error


class _Captured(Exception):
    """Raised by the capture hook: everything after block 0's inputs is not needed."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList whose children all share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise NMSparseError(f"{type(model).__name__}: no list of blocks found to calibrate block by block; use --method magnitude")
    return best


def capture_inputs(model: nn.Module, first: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) that the first block receives, one entry per calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**place(batch, device))
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class Hessian:
    """Running mean of 2·xᵀx over every row of inputs a layer sees, kept in float64; each batch's xᵀx is a float32
    product, as in the reference implementation (a float64 product costs twice as much on a CPU). Rows come from
    `input_rows`; H lives on the device of the rows (the model's device)."""

    def __init__(self, k: int, device: torch.device):
        self.h = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        x = rows.float()
        t = x.shape[0]
        self.h *= self.n / (self.n + t)
        self.n += t
        self.h += (2 / self.n) * (x.T @ x).double()


class _BlockHessians:
    """The Hessians of one block's target layers. Layers that read the very same input tensor in a forward call
    (q/k/v, gate/up) share one Hessian, computed once per batch. Each call's inputs are held until the next call
    starts, so a freed tensor's address cannot be taken for another's."""

    def __init__(self, layers: dict[str, LayerInfo]):
        self.layers = layers
        self.of: dict[str, Hessian] = {}
        self._this_call: dict[tuple, tuple[torch.Tensor, Hessian]] = {}
        self._tokens: torch.Tensor | None = None  # [batch, seq]: True at real tokens, False at padding; None: all

    def new_call(self, tokens: torch.Tensor | None = None) -> None:
        self._this_call = {}
        self._tokens = tokens

    def _rows(self, module: nn.Module, x: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
        return real_rows(input_rows(module, x, layer), self._tokens)

    def hook(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride())
        shared = self._this_call.get(key, (None, None))[1]
        if name not in self.of:
            self.of[name] = shared or Hessian(weight_rows(module.weight, self.layers[name]).shape[1], x.device)
        if self.of[name] is not shared:
            self.of[name].add(self._rows(module, x, self.layers[name]))
            self._this_call[key] = (x, self.of[name])


def real_rows(rows: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The rows [batch·seq, K] of a layer's input at real tokens (`tokens`: the batch's attention mask), without
    padding: what a model computes at padding is never used, and counting it tilts Hessians and norms towards it.
    Rows that are not one per token (`tokens` None, or another count), or with no padding, are returned as they
    are."""
    if tokens is None or rows.shape[0] != tokens.numel() or bool(tokens.all()):
        return rows
    return rows[tokens.reshape(-1).to(rows.device, torch.bool)]


def input_rows(module: nn.Module, x: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
    """What the layer multiplies its weight with, as [rows, K] in the column order of `weight_rows`: the tokens
    of a Linear / Conv1D input, or the receptive fields of a Conv2d (channels-last: tap-major, channel-minor)."""
    if layer.layout is not CONV:
        return x.reshape(-1, x.shape[-1])
    patches = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    batch, _, places = patches.shape  # [N, C·kh·kw, L], channel-major
    taps = module.kernel_size[0] * module.kernel_size[1]
    return patches.reshape(batch, -1, taps, places).permute(0, 3, 2, 1).reshape(batch * places, -1)


def solvable(module: nn.Module, layer: LayerInfo) -> bool:
    """Can this layer's inputs be turned into rows? Linear, Conv1D, and ungrouped Conv2d with zero padding."""
    if layer.layout is not CONV:
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def weight_rows(weight: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
    """The weight as [rows, K]: a Linear already is; an HF Conv1D [in, out] is transposed; a Conv2d [O, C, kh, kw]
    becomes [O, kh·kw·C] (the N:M groups of M consecutive channels at each tap stay consecutive)."""
    if layer.layout is HF_CONV1D:
        return weight.T
    if layer.layout is CONV:
        return weight.movedim(1, -1).reshape(weight.shape[0], -1)
    return weight


def from_weight_rows(rows: torch.Tensor, like: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
    """Inverse of `weight_rows`, to `like`'s shape."""
    if layer.layout is HF_CONV1D:
        return rows.T
    if layer.layout is CONV:
        return rows.reshape(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return rows


def _sparsegpt_damped(weight: torch.Tensor, hessian: torch.Tensor, settings: SolverSettings, name: str,
                      result: OneShotResult) -> torch.Tensor:
    """SparseGPT; a Hessian that is singular at --damp gets 10x more damping per try (recorded), up to MAX_DAMP."""
    damp = settings.damp
    while True:
        try:
            pruned = sparsegpt(weight, hessian, settings.pattern_for(name), damp=damp, block=settings.block_size, where=name)
        except SingularHessian:
            if damp >= MAX_DAMP:
                raise NMSparseError(
                    f"{name}: the calibration Hessian is singular even at --damp {MAX_DAMP}; use more calibration "
                    "samples, or --method wanda"
                ) from None
            damp = min(MAX_DAMP, damp * 10 if damp > 0 else 0.01)
            continue
        if damp != settings.damp:
            result.damped[name] = damp
        return pruned


def solve_layer(module: nn.Module, name: str, layer: LayerInfo, hessian: torch.Tensor, settings: SolverSettings,
                result: OneShotResult) -> None:
    """Prune `module`'s weight in place from its calibration Hessian; record the weight and its error."""
    if not torch.isfinite(hessian).all():
        raise NMSparseError(
            f"{name}: the calibration activations reaching this layer hold NaN/Inf; check the weights before it "
            "(nmsparse report) and the calibration data"
        )
    weight = weight_rows(module.weight.detach(), layer).float()
    if settings.method is OneShotMethod.WANDA:
        pruned = weight * wanda(weight, hessian.diagonal(), settings.pattern_for(name))
    elif settings.method is OneShotMethod.ALPS:
        pruned = alps(weight, hessian, settings.pattern_for(name), damp=settings.damp)
    else:
        pruned = _sparsegpt_damped(weight, hessian, settings, name, result)
    if settings.refine:
        pruned = refine_kept(weight, pruned, hessian, settings.refine, damp=result.damped.get(name, settings.damp))
    result.errors[name] = reconstruction_error(weight, pruned, hessian)
    module.weight.data.copy_(from_weight_rows(pruned, module.weight, layer).to(module.weight.dtype))
    result.weights[name] = module.weight.detach()  # the model's own tensor: nothing changes it afterwards


def prune_by_magnitude(model: nn.Module, layers: dict[str, LayerInfo], settings: SolverSettings,
                       result: OneShotResult) -> None:
    """Target layers calibration did not solve (no input reached them, or no row view): magnitude, listed."""
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        if name not in result.weights:
            weight = modules[name].weight
            weight.data.copy_(apply_nm(weight.detach(), settings.pattern_for(name), layer.layout))
            result.weights[name] = weight.detach()
            result.by_magnitude.append(name)


def _prune_block(block: nn.Module, prefix: str, layers: dict[str, LayerInfo], inputs: list[tuple[tuple, dict]],
                 tokens: list[torch.Tensor | None], settings: SolverSettings, result: OneShotResult) -> list[nn.Parameter]:
    """Accumulate H for the block's target layers over all inputs (the real tokens of each: `tokens`), then prune
    them; returns the weights pruned."""
    modules = {name: block.get_submodule(name.removeprefix(prefix)) for name in layers}
    modules = {name: m for name, m in modules.items() if solvable(m, layers[name])}
    hessians = _BlockHessians(layers)
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: hessians.hook(name, mod, inp[0]))
               for name, m in modules.items()]
    try:
        with torch.no_grad():
            for (args, kwargs), real in zip(inputs, tokens):
                hessians.new_call(real)
                block(*args, **kwargs)
    finally:
        hessians.new_call()
        for handle in handles:
            handle.remove()
    solved = [name for name in modules if name in hessians.of]  # a layer no input reached is left to magnitude
    for name in solved:
        solve_layer(modules[name], name, layers[name], hessians.of[name].h, settings, result)
    return [modules[name].weight for name in solved]


def _block_outputs(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    with torch.no_grad():
        return [_with_hidden(args, kwargs, block_output(block, args, kwargs)) for args, kwargs in inputs]


def calibrate_and_prune(
    model: nn.Module,
    layers: dict[str, LayerInfo],
    batches: list[dict[str, torch.Tensor]],
    settings: SolverSettings,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> OneShotResult:
    """Prune `layers` (keyed by module name) of `model` in place, block by block; returns the pruned weights."""
    started = time.perf_counter()
    model.eval()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache would grow each time a block is run again on the same inputs
    prefix, blocks = find_blocks(model)
    result = OneShotResult({}, {}, samples=sum(len(next(iter(batch.values()))) for batch in batches))
    if settings.reconstruct:
        batches = one_sample_batches(batches)  # --reconstruct: one optimizer step per sample
    inputs = capture_inputs(model, blocks[0], batches)
    tokens = [batch.get("attention_mask") for batch in batches]
    result.activation_bytes = sum(_hidden(a, k).numel() * _hidden(a, k).element_size() for a, k in inputs)
    dense = inputs if settings.reconstruct else None  # --reconstruct: the dense model's own stream, the targets
    result.activation_bytes *= 2 if dense is not None else 1
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}.{index}."
        mine = {name: layer for name, layer in layers.items() if name.startswith(block_prefix)}
        if dense is not None:
            dense = _block_outputs(block, dense)
        pruned = _prune_block(block, block_prefix, mine, inputs, tokens, settings, result) if mine else []
        if pruned and dense is not None:
            fit, outputs = reconstruct_block(block, pruned, inputs, [_hidden(a, k) for a, k in dense], tokens,
                                             settings.reconstruct, settings.reconstruct_lr)
            result.block_fits[block_prefix.rstrip(".")] = fit
            inputs = [_with_hidden(a, k, output) for (a, k), output in zip(inputs, outputs)]
        elif index + 1 < len(blocks):
            inputs = _block_outputs(block, inputs)
        progress(index + 1, len(blocks))
    prune_by_magnitude(model, layers, settings, result)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def describe(result: OneShotResult) -> dict[str, Any]:
    errors = list(result.errors.values())
    return {
        "mean_reconstruction_error": sum(errors) / len(errors) if errors else None,
        "by_magnitude": result.by_magnitude,
        "activation_mib": round(result.activation_bytes / 2**20, 1),
        "samples": result.samples,
        "seconds": result.seconds,
        **({"permutation": result.permutation} if result.permutation is not None else {}),
        **({"budget": result.budget} if result.budget is not None else {}),
        **({"block_output_error": {block: [round(fit.before, 6), round(fit.after, 6)]
                                   for block, fit in result.block_fits.items()}} if result.block_fits else {}),
    }
