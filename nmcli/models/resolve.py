"""Turn a command line's SOURCE (+ --model / --checkpoint) into tensors and the layers they hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nmcli.errors import NMSparseError
from nmcli.io.metadata import SparsityMetadata, model_from_strings
from nmcli.io.opener import open_path
from nmcli.io.sources import Checkpoint, in_memory, load_state_dict_file
from nmcli.nm import layout_by_name
from nmcli.models.architecture import ModelRef, build_model, hf_ref, timm_model_exists
from nmcli.models.targets import LayerInfo, layers_from_shapes, layers_of_model
from nmcli.models.state_match import StateMatch, match_state


@dataclass
class Resolved:
    """A checkpoint with its architecture (when known) and its N:M-capable layers."""

    checkpoint: Checkpoint
    model: ModelRef | None
    layers: dict[str, LayerInfo]
    declared: SparsityMetadata | None
    match: StateMatch | None = None  # checkpoint names -> model state keys (None without an architecture)
    # N:M-capable layers of the architecture whose weight the checkpoint does not hold under their own name (a tied
    # LM head shares the input embeddings' tensor; a parameter the file lacks): never targets, but a format that
    # picks layers by class (compressed-tensors' "Linear") must be told to leave them alone.
    unstored: dict[str, LayerInfo] = field(default_factory=dict)

    def declared_targets(self) -> dict[str, LayerInfo]:
        """The N:M layers the file's metadata declares (empty when it declares none)."""
        if self.declared is None:
            return {}
        out = {}
        for name, entry in self.declared.layers.items():
            base = self.layers.get(name)
            module = base.module if base else name.removesuffix(".weight")
            out[name] = LayerInfo(name, module, layout_by_name(entry["layout"]))
        return out

    @property
    def layers_exact(self) -> bool:
        """False when targets were guessed from tensor shapes and names (no architecture known)."""
        return self.model is not None


def _timm_ref_for(name: str, ckpt: Checkpoint, kwargs: dict) -> ModelRef:
    """Match the classifier width to the checkpoint, so fine-tuned heads load without extra flags."""
    meta_model = build_model(ModelRef("timm", name, kwargs))
    classifier = (getattr(meta_model, "pretrained_cfg", {}) or {}).get("classifier")
    head = ckpt.infos.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if head is not None and len(head.shape) >= 2 and head.shape[0] != meta_model.num_classes:
        return ModelRef("timm", name, {**kwargs, "num_classes": int(head.shape[0])})
    return ModelRef("timm", name, kwargs)


def _open_timm(name: str, checkpoint: Path | None, seed: int, kwargs: dict) -> tuple[Checkpoint, ModelRef]:
    if checkpoint is None:
        ref = ModelRef("timm", name, kwargs)
        torch.manual_seed(seed)
        model = build_model(ref, device="cpu")
        where = f"timm:{name} (random init, seed {seed}; no pretrained download)"
        return in_memory(where, model.state_dict()), ref
    ckpt = in_memory(str(checkpoint), load_state_dict_file(checkpoint))
    return ckpt, _timm_ref_for(name, ckpt, kwargs)


def resolve(
    source: str,
    *,
    model: str | None = None,
    checkpoint: Path | None = None,
    seed: int = 0,
    model_kwargs: dict | None = None,
) -> Resolved:
    """SOURCE is a safetensors file, a sharded or Hugging Face folder, or a timm model name.

    `model_kwargs` go to `timm.create_model` (e.g. img_size, in_chans) for a timm name or `--model`.
    """
    kwargs = dict(model_kwargs or {})
    path = Path(source)
    timm_name = source.removeprefix("timm:")
    if path.exists():
        if checkpoint is not None:
            raise NMSparseError(f"--checkpoint goes with a timm model name as SOURCE, not with the path {source}")
        ckpt = open_path(path)
        if model is not None:
            ref: ModelRef | None = _timm_ref_for(model, ckpt, kwargs)
        elif (declared_model := model_from_strings(ckpt.metadata)) is not None:
            ref = ModelRef.from_json(declared_model, ckpt.hf_config)
        elif ckpt.hf_config is not None:
            ref = hf_ref(ckpt.hf_config)
        else:
            ref = None
    elif source.startswith("timm:") or timm_model_exists(timm_name):
        ckpt, ref = _open_timm(timm_name, checkpoint, seed, kwargs)  # an unknown "timm:" name fails with suggestions
    else:
        raise NMSparseError(f"SOURCE {source!r} is neither an existing file/folder nor a timm model name")

    match, unstored = None, {}
    if ckpt.graph_layouts is not None:  # ONNX: names are the graph's, layouts come from the graph
        layers = {n: LayerInfo(n, n, layout_by_name(l)) for n, l in ckpt.graph_layouts.items()}
    elif ref is not None:
        arch = build_model(ref)
        match = match_state(arch, ckpt.infos, ckpt.where, exact=ref.source == "timm")
        model_layers = layers_of_model(arch, ref)
        layers = _layers_by_checkpoint_name(model_layers, match)
        stored = match.to_checkpoint()
        unstored = {key: layer for key, layer in model_layers.items() if key not in stored}
    else:
        layers = layers_from_shapes(ckpt.infos.values())
    declared = SparsityMetadata.from_strings(ckpt.metadata, ckpt.where)
    return Resolved(ckpt, ref, layers, declared, match, unstored)


def _layers_by_checkpoint_name(layers: dict[str, LayerInfo], match: StateMatch) -> dict[str, LayerInfo]:
    """The model's N:M-capable layers that the checkpoint holds, under the checkpoint's own tensor names."""
    names = match.to_checkpoint()
    return {
        names[key]: LayerInfo(names[key], layer.module, layer.layout, layer.excluded_by_default)
        for key, layer in layers.items()
        if key in names
    }


def load_model(resolved: Resolved, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture on the CPU with the checkpoint's weights (cast to `dtype` on the way in, when given: no
    float32 copy first); a checkpoint that does not fit is an error.

    A timm model must match exactly; a Hugging Face folder is matched as `from_pretrained` matches it
    (nmcli/state_match.py).
    """
    if resolved.model is None or resolved.match is None:
        raise NMSparseError(
            f"{resolved.checkpoint.where}: the model's architecture is unknown: pass --model TIMM_NAME "
            "(files written by prune/finetune and Hugging Face folders carry it)"
        )
    model = build_model(resolved.model, device="cpu")
    if dtype is not None:
        model.to(dtype)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():  # one tensor at a time: peak memory is the model plus its largest tensor, not two models
        for name, key in resolved.match.to_model.items():
            targets[key].copy_(resolved.checkpoint.read(name))
    return model
