"""How a checkpoint's tensor names map onto a model's state, the way `from_pretrained` maps them.

A timm checkpoint must fit its model exactly. A Hugging Face folder is real-world data and is read as
transformers reads it:
- a tensor the model keeps as a non-persistent buffer (`embeddings.position_ids`, saved by older transformers) is
  not loaded; it is carried through to outputs unchanged and listed;
- a checkpoint saved from a task model and read as its base model (`bert.` in front of every name), or the other way
  round, is matched through the model's `base_model_prefix`; tensors outside the base model (a task head) are
  carried and listed;
- a tied weight (an LM head tied to the input embeddings) has one tensor in the file and stays one tensor;
- a model parameter the checkpoint lacks is initialised as the model initialises it, and listed.
A checkpoint that shares too little with the architecture, or a tensor of the wrong shape, is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from nmcli.errors import NMSparseError
from nmcli.io.sources import TensorInfo


@dataclass(frozen=True)
class StateMatch:
    to_model: dict[str, str]  # checkpoint tensor -> model state key
    carried: dict[str, str] = field(default_factory=dict)  # checkpoint tensor -> why it is not loaded
    missing: tuple[str, ...] = ()  # model parameters the checkpoint lacks (initialised by the model)

    def notes(self) -> list[str]:
        out = []
        by_reason: dict[str, list[str]] = {}
        for name, why in self.carried.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            out.append(f"carried through unchanged ({why}): {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
        renamed = [f"{a} -> {b}" for a, b in self.to_model.items() if a != b]
        if renamed:
            out.append(f"{len(renamed)} tensor names matched through the base-model prefix, e.g. {renamed[0]}")
        if self.missing:
            out.append(
                f"{len(self.missing)} model parameter(s) not in the checkpoint, initialised by the model: "
                + ", ".join(self.missing[:5])
            )
        return out

    def to_checkpoint(self) -> dict[str, str]:
        """Model state key -> checkpoint tensor."""
        return {model_key: name for name, model_key in self.to_model.items()}


def _exact(model: nn.Module, infos: dict[str, TensorInfo], where: str) -> StateMatch:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, info in infos.items():
        if name not in expected:
            raise NMSparseError(f"{where}: tensor {name} is not part of the model; is this the right --model?")
        _check_shape(where, name, info.shape, expected[name])
    missing = [k for k in expected if k not in infos]
    if missing:
        raise NMSparseError(f"{where}: tensor {missing[0]} of the model is missing from the checkpoint")
    return StateMatch({name: name for name in infos})


def _check_shape(where: str, name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise NMSparseError(
            f"{where}: tensor {name} has shape {list(shape)} but the model expects {list(expected)}; "
            "is this the right model (or config.json / --num-classes)?"
        )


def _prefix_rename(model_keys: set[str], names: list[str], prefix: str):
    """A function checkpoint name -> candidate model key, adding or removing `prefix.` as from_pretrained does."""
    dotted = prefix + "."
    if not prefix:
        return lambda name: name
    model_has = any(k.startswith(dotted) for k in model_keys)
    file_has = any(n.startswith(dotted) for n in names)
    if file_has and not model_has:  # a task checkpoint read as its base model
        return lambda name: name[len(dotted) :] if name.startswith(dotted) else None
    if model_has and not file_has:  # a base checkpoint read as a task model
        return lambda name: dotted + name if dotted + name in model_keys else name
    return lambda name: name


def _tied_to_loaded(model: nn.Module, loaded: set[str]) -> set[str]:
    """Model state keys that share their tensor with a loaded key (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(value), []).append(key)
    return {key for keys in by_id.values() if loaded & set(keys) for key in keys}


def _loose(model: nn.Module, infos: dict[str, TensorInfo], where: str) -> StateMatch:
    state = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    arch = type(model).__name__
    rename = _prefix_rename(set(state) | buffers, list(infos), getattr(model, "base_model_prefix", ""))
    to_model: dict[str, str] = {}
    carried: dict[str, str] = {}
    for name, info in infos.items():
        key = rename(name)
        if key in state:
            _check_shape(where, name, info.shape, tuple(state[key].shape))
            to_model[name] = key
        elif key in buffers:
            carried[name] = f"a buffer {arch} does not save"
        else:
            carried[name] = f"not used by {arch}"
    params = dict(model.named_parameters(remove_duplicate=False))
    covered = _tied_to_loaded(model, set(to_model.values()))
    missing = tuple(k for k in params if k not in covered)
    found = sum(params[k].numel() for k in params if k in covered)
    total = sum(p.numel() for p in params.values()) or 1
    if found < total / 2:
        example = next(iter(missing), "?")
        raise NMSparseError(
            f"{where}: does not fit {arch}: only {found / total:.0%} of its parameters are in the checkpoint "
            f"(e.g. {example} is missing); is config.json the checkpoint's own?"
        )
    return StateMatch(to_model, carried, missing)


def match_state(model: nn.Module, infos: dict[str, TensorInfo], where: str, *, exact: bool) -> StateMatch:
    """`exact` (timm): every tensor must be the model's and every model tensor present."""
    return _exact(model, infos, where) if exact else _loose(model, infos, where)
