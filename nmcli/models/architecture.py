"""Architectures: a timm name or a Hugging Face config (`ModelRef`), what the model computes (`ModelKind`), and
building it — on the meta device where only its structure is needed, which is instant and allocates nothing."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import nn

from nmcli.errors import NMSparseError


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


def base_model(model: nn.Module) -> nn.Module:
    """A Hugging Face model's body without its task head (an LM head's logits are the largest tensor of a small
    LM); the model itself when it has none."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """A Hugging Face model's repeated blocks: the modules of the classes it lists in `_no_split_modules` (the units
    transformers itself keeps whole when it splits a model over devices)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if module is not model and type(module).__name__ in names]


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


def hf_ref(config: dict) -> ModelRef:
    """Named by architecture, not by path: the config itself travels with the checkpoint folder."""
    name = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    return ModelRef("hf", name, {}, config)
