"""Sequential calibration of image models (timm) in a single forward pass.

Every calibration image goes through the model once, as one batch. Just before each target layer runs, a hook
accumulates its Hessian from the inputs it is about to see and prunes (and, for SparseGPT, updates) its weight
in place; the layer then runs with its pruned weight. So every layer is calibrated on the outputs of the layers
before it *already pruned*, as in the block-by-block calibration of transformers (calibrate.py), here down to
single layers, without any list of blocks to find: ResNet stages, ViT blocks and ConvNeXt stages alike.

Memory: one batch of activations (the input batch is reported; the peak is the model's own activation memory at
`--calib-samples` images). Layers calibration cannot reach or view as rows (grouped convolutions) are pruned by
magnitude and listed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from nmcli.runtime.device import model_device, place
from nmcli.models.targets import LayerInfo
from nmcli.oneshot.calibrate import (
    Hessian,
    OneShotResult,
    SolverSettings,
    input_rows,
    prune_by_magnitude,
    solvable,
    solve_layer,
    weight_rows,
)

ROWS_PER_STEP = 1 << 16  # receptive-field rows turned into Hessian terms at a time (bounds the unfold's memory)


def _hessian_of(module: nn.Module, layer: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    """H of the inputs `x` of one layer, built a few images at a time."""
    hessian = Hessian(weight_rows(module.weight, layer).shape[1], x.device)
    per_image = max(1, input_rows(module, x[:1], layer).shape[0])
    step = max(1, ROWS_PER_STEP // per_image)
    for start in range(0, x.shape[0], step):
        hessian.add(input_rows(module, x[start : start + step], layer))
    return hessian.h


def calibrate_in_one_pass(
    model: nn.Module,
    layers: dict[str, LayerInfo],
    images: torch.Tensor,
    settings: SolverSettings,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> OneShotResult:
    """Prune `layers` (keyed by module name) of `model` in place, each on the inputs its pruned predecessors give."""
    started = time.perf_counter()
    model.eval()
    result = OneShotResult({}, {}, activation_bytes=images.numel() * images.element_size(),
                           samples=len(images))
    modules = dict(model.named_modules())
    solving = {name: layer for name, layer in layers.items() if solvable(modules[name], layer)}

    def before(module: nn.Module, args: tuple, name: str) -> None:
        if name in result.weights:  # a layer used twice is solved at its first use
            return
        solve_layer(module, name, solving[name], _hessian_of(module, solving[name], args[0]), settings, result)
        progress(len(result.weights), len(solving))

    handles = [modules[name].register_forward_pre_hook(lambda m, args, name=name: before(m, args, name))
               for name in solving]
    try:
        with torch.no_grad():
            model(place(images, model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    prune_by_magnitude(model, layers, settings, result)
    result.seconds = round(time.perf_counter() - started, 2)
    return result
