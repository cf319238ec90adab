"""Build timm / Hugging Face models and decide which layers are N:M targets.

This is the single definition of "which layers are targets" (methods.md §4), used by prune, finetune, report and
export alike. Models are built on the meta device where only their structure is needed, so this is instant and
allocates nothing.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from nmcli.errors import NMSparseError
from nmcli.io.sources import TensorInfo
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
class ModelRef:
    """An architecture: a timm model name (+ create_model kwargs) or a Hugging Face config."""

    source: str  # "timm" | "hf"
    name: str
    kwargs: dict = field(default_factory=dict, hash=False)
    hf_config: dict | None = field(default=None, hash=False, compare=False)

    def to_json(self) -> dict:
        """Self-describing: a Hugging Face model carries its config, so a lone file (or ONNX) can be rebuilt."""
        data = {"source": self.source, "name": self.name, "kwargs": self.kwargs}
        if self.hf_config is not None:
            data["config"] = self.hf_config
        return data

    @classmethod
    def from_json(cls, data: dict, hf_config: dict | None = None) -> ModelRef:
        return cls(data["source"], data["name"], dict(data.get("kwargs") or {}), hf_config or data.get("config"))


class ModelKind(enum.Enum):
    """What a model computes, which decides its training loss and its quality metric."""

    IMAGE_CLASSIFIER = "image classifier"  # timm
    CAUSAL_LM = "causal LM"
    ENCODER = "encoder"  # base models, masked LMs, sentence embedders: compared on hidden states
    SEQUENCE_CLASSIFIER = "sequence classifier"


def model_kind(ref: ModelRef) -> ModelKind:
    if ref.source == "timm":
        return ModelKind.IMAGE_CLASSIFIER
    if ref.name.endswith(("ForCausalLM", "LMHeadModel")):
        return ModelKind.CAUSAL_LM
    if ref.name.endswith("ForSequenceClassification"):
        return ModelKind.SEQUENCE_CLASSIFIER
    return ModelKind.ENCODER


@dataclass(frozen=True)
class LayerInfo:
    """A weight that N:M can apply to: Linear, ConvNd or HF Conv1D."""

    tensor: str
    module: str
    layout: Layout
    excluded_by_default: str | None = None  # why it is not a default target ("stem", "classifier head", ...)


def timm_model_exists(name: str) -> bool:
    import timm

    return timm.is_model(name)


def build_model(ref: ModelRef, *, device: str | torch.device = "meta") -> nn.Module:
    """Instantiate the architecture (random init on CPU, or structure only on meta)."""
    with torch.device(device):
        if ref.source == "timm":
            import timm

            if not timm.is_model(ref.name):
                close = timm.list_models(f"*{ref.name.split('.')[0][:12]}*")[:5]
                hint = f"; similar: {', '.join(close)}" if close else ""
                raise NMSparseError(f"unknown timm model {ref.name!r}{hint}")
            try:
                return timm.create_model(ref.name, pretrained=False, **ref.kwargs)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise NMSparseError(f"cannot build timm model {ref.name!r} with {ref.kwargs}: {exc}") from None
        if ref.source == "hf":
            return _build_hf(ref)
    raise NMSparseError(f"unknown model source {ref.source!r}")


def _build_hf(ref: ModelRef) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise NMSparseError(
            "this is a Hugging Face model folder: install the extra with pip install 'nmsparse[hf]'"
        ) from None
    if ref.hf_config is None:
        raise NMSparseError(f"{ref.name}: no config.json to build the Hugging Face model from")
    config_dict = dict(ref.hf_config)
    model_type = config_dict.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NMSparseError(
            f"config.json (architecture {ref.name}): transformers {transformers.__version__} cannot build a config for "
            f"model_type {model_type!r} ({first}); a newer transformers or the model's own code may be needed"
        ) from None
    config._attn_implementation = "eager"  # sdpa's mask checks call .item(), which meta tensors cannot
    arch = (config.architectures or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    try:
        return model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NMSparseError(f"config.json: transformers cannot build {arch or model_type} from it ({first})") from None


def data_config(model: nn.Module, ref: ModelRef) -> dict:
    """timm's data config (input size, mean/std, interpolation), corrected for `img_size` / `in_chans` kwargs,
    which timm's pretrained config does not reflect."""
    import timm.data

    config = dict(timm.data.resolve_model_data_config(model))
    channels, height, width = config["input_size"]
    size = ref.kwargs.get("img_size")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    config["input_size"] = (ref.kwargs.get("in_chans", channels), height, width)
    return config


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


def hf_ref(config: dict) -> ModelRef:
    """Named by architecture, not by path: the config itself travels with the checkpoint folder."""
    name = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    return ModelRef("hf", name, {}, config)
