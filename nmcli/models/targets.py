"""Which layers are N:M targets: the single definition (methods.md §4), used by prune, finetune, report and export
alike, from a built architecture or, with none known, from tensor shapes and names."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from nmcli.errors import NMSparseError
from nmcli.io.sources import TensorInfo
from nmcli.models.architecture import ModelRef
from nmcli.nm import CONV, HF_CONV1D, LINEAR, Layout

# Name patterns that mark a layer as not targeted by default when no architecture is known.
HEURISTIC_EXCLUDES = {
    "*embed*": "embedding",
    "*stem*": "stem",
    "*norm*": "norm",
    "head": "classifier head",
    "head.*": "classifier head",
    "*.head": "classifier head",
    "*classifier*": "classifier head",
    "*lm_head*": "LM head",
}
HF_HEAD_PATTERNS = ("*classifier*", "*lm_head*", "score", "qa_outputs", "cls", "cls.*")


@dataclass(frozen=True)
class LayerInfo:
    """A weight that N:M can apply to: Linear, ConvNd or HF Conv1D."""

    tensor: str
    module: str
    layout: Layout
    excluded_by_default: str | None = None  # why it is not a default target ("stem", "classifier head", ...)


def _layout_of(module: nn.Module) -> Layout | None:
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return HF_CONV1D
    return None


def _default_exclusions(model: nn.Module, ref: ModelRef) -> dict[str, str]:
    """Module-name prefixes that are not default targets, with the reason (methods.md §4)."""
    out: dict[str, str] = {}
    if ref.source == "timm":
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        for key, why in (("first_conv", "stem"), ("classifier", "classifier head")):
            names = cfg.get(key) or ()
            for name in (names,) if isinstance(names, str) else names:
                out[name] = why
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            if head is not None and module is head:
                out[name] = "LM head"
            elif any(fnmatch.fnmatchcase(name, p) for p in HF_HEAD_PATTERNS):
                out[name] = "classifier head"
    return out


def _excluded(module: str, prefixes: dict[str, str]) -> str | None:
    for prefix, why in prefixes.items():
        if module == prefix or module.startswith(prefix + "."):
            return why
    return None


def layers_of_model(model: nn.Module, ref: ModelRef) -> dict[str, LayerInfo]:
    """Every N:M-capable weight of the model, keyed by state-dict name."""
    prefixes = _default_exclusions(model, ref)
    out = {}
    for name, module in model.named_modules():
        layout = _layout_of(module)
        if layout is None or getattr(module, "weight", None) is None:
            continue
        tensor = f"{name}.weight"
        out[tensor] = LayerInfo(tensor, name, layout, _excluded(name, prefixes))
    return out


def layers_from_shapes(infos: Iterable[TensorInfo]) -> dict[str, LayerInfo]:
    """Without an architecture: 2-D `.weight` tensors are Linear, 3-5-D are convs; names mark stems/heads."""
    out = {}
    for info in infos:
        if not info.name.endswith(".weight") or not (2 <= len(info.shape) <= 5) or not info.dtype.is_floating_point:
            continue
        module = info.name[: -len(".weight")]
        layout = LINEAR if len(info.shape) == 2 else CONV
        why = next((w for p, w in HEURISTIC_EXCLUDES.items() if fnmatch.fnmatchcase(module, p)), None)
        out[info.name] = LayerInfo(info.name, module, layout, why)
    return out


def select_targets(
    layers: dict[str, LayerInfo], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, LayerInfo]:
    """Targets: the default set (or, with `include`, the layers whose module name matches), minus `exclude`."""

    def matches(layer: LayerInfo, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(layer.module, p) or fnmatch.fnmatchcase(layer.tensor, p) for p in patterns)

    chosen = {
        name: layer
        for name, layer in layers.items()
        if (matches(layer, include) if include else layer.excluded_by_default is None) and not matches(layer, exclude)
    }
    for pattern in include:
        if not any(matches(layer, [pattern]) for layer in layers.values()):
            raise NMSparseError(f"--include {pattern!r} matches no Linear/Conv layer; check the layer names with report")
    return chosen
