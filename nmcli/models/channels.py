"""Which parameters share a channel axis that one permutation may reorder without changing what the model computes
(methods.md §9), for the families whose wiring is known here:

- Llama-like decoders (llama, mistral, qwen2, qwen3): per block, the MLP's intermediate features (gate/up rows,
  down_proj's K) and each key/value head's value features (v_proj rows, and o_proj's K columns of every query head
  that reads that value head); for a causal LM also the residual stream: embedding columns, every norm, o_proj and
  down_proj rows, and the K axis of q/k/v, gate/up and an untied LM head. q/k rows are never permuted (rotary
  embeddings act on them in pairs).
- BERT-like encoders (bert, roberta): per block the MLP's intermediate features (intermediate.dense rows and bias,
  output.dense's K) and each head's value features (value rows and bias, attention.output.dense's K). The residual
  stream is the encoder's output (the embedding a user reads), so it keeps its order.

Everything else keeps its order, and the plan says which target layers and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nmcli.errors import NMSparseError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
RESIDUAL = "residual stream"
BERT_LIKE = ("bert", "roberta")


@dataclass(frozen=True)
class Axis:
    """One parameter's axis that holds the channel set, once at each offset ([o, o + size) for o in offsets)."""

    key: str  # parameter name in the model
    dim: int
    offsets: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that one permutation reorders: the consumers read them along K (their N:M axis: what the search
    scores), the producers make them (rows, biases, norm weights, embedding columns: reordered alike)."""

    name: str
    size: int
    consumers: tuple[Axis, ...]
    producers: tuple[Axis, ...]


@dataclass
class ChannelPlan:
    groups: list[ChannelGroup] = field(default_factory=list)
    unpermuted: dict[str, str] = field(default_factory=dict)  # target layer (module) -> why it keeps its order


def _weight(module: str, dim: int, offsets: tuple[int, ...] = (0,)) -> Axis:
    return Axis(f"{module}.weight", dim, offsets)


def _rows(model: nn.Module, module: str, offsets: tuple[int, ...] = (0,)) -> tuple[Axis, ...]:
    """A Linear's output rows and, when it has one, its bias."""
    has_bias = getattr(model.get_submodule(module), "bias", None) is not None
    return (_weight(module, 0, offsets), *((Axis(f"{module}.bias", 0, offsets),) if has_bias else ()))


def _blocks(model: nn.Module, attribute_path: str) -> tuple[str, int] | None:
    """(prefix, count) of the ModuleList at `attribute_path` below the model or its base model, if there is one."""
    for prefix in ("", getattr(model, "base_model_prefix", "") + "."):
        try:
            blocks = model.get_submodule(prefix + attribute_path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return prefix + attribute_path, len(blocks)
    return None


def _llama_block(model: nn.Module, b: str, heads: int, kv_heads: int, head_dim: int, inter: int) -> list[ChannelGroup]:
    groups = [ChannelGroup(f"{b}.mlp", inter, (_weight(f"{b}.mlp.down_proj", 1),),
                           (*_rows(model, f"{b}.mlp.gate_proj"), *_rows(model, f"{b}.mlp.up_proj")))]
    per_kv = heads // kv_heads
    for g in range(kv_heads):
        readers = tuple(h * head_dim for h in range(g * per_kv, (g + 1) * per_kv))
        groups.append(ChannelGroup(f"{b}.self_attn value head {g}", head_dim, (_weight(f"{b}.self_attn.o_proj", 1, readers),),
                                   _rows(model, f"{b}.self_attn.v_proj", (g * head_dim,))))
    return groups


def _llama_residual(model: nn.Module, prefix: str, count: int, hidden: int) -> ChannelGroup:
    base = prefix.removesuffix(".layers")
    consumers, producers = [], [_weight(f"{base}.embed_tokens", 1), _weight(f"{base}.norm", 0)]
    for i in range(count):
        b = f"{prefix}.{i}"
        consumers += [_weight(f"{b}.self_attn.{p}", 1) for p in ("q_proj", "k_proj", "v_proj")]
        consumers += [_weight(f"{b}.mlp.{p}", 1) for p in ("gate_proj", "up_proj")]
        producers += [_weight(f"{b}.input_layernorm", 0), _weight(f"{b}.post_attention_layernorm", 0)]
        producers += [*_rows(model, f"{b}.self_attn.o_proj"), *_rows(model, f"{b}.mlp.down_proj")]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:  # a tied head is the embedding
        consumers.append(Axis(f"{_name_of(model, head)}.weight", 1))
    return ChannelGroup(RESIDUAL, hidden, tuple(consumers), tuple(producers))


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _llama(model: nn.Module, causal: bool) -> list[ChannelGroup]:
    config = model.config
    found = _blocks(model, "layers")
    if found is None:
        return []
    prefix, count = found
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    groups = [g for i in range(count)
              for g in _llama_block(model, f"{prefix}.{i}", heads, kv_heads, head_dim, config.intermediate_size)]
    if causal:
        groups.append(_llama_residual(model, prefix, count, config.hidden_size))
    return groups


def _bert(model: nn.Module) -> list[ChannelGroup]:
    config = model.config
    found = _blocks(model, "encoder.layer")
    if found is None:
        return []
    prefix, count = found
    head_dim = config.hidden_size // config.num_attention_heads
    groups = []
    for i in range(count):
        b = f"{prefix}.{i}"
        groups.append(ChannelGroup(f"{b}.mlp", config.intermediate_size, (_weight(f"{b}.output.dense", 1),),
                                   _rows(model, f"{b}.intermediate.dense")))
        for h in range(config.num_attention_heads):
            groups.append(ChannelGroup(f"{b}.attention value head {h}", head_dim,
                                       (_weight(f"{b}.attention.output.dense", 1, (h * head_dim,)),),
                                       _rows(model, f"{b}.attention.self.value", (h * head_dim,))))
    return groups


def reorder_residual(model: nn.Module, order: list[int]) -> None:
    """Give a dense causal LM the residual order a `prune --permute` checkpoint of it records, so that its hidden
    states line up with the checkpoint's (a teacher whose hidden states are matched); its logits do not change."""
    found = _blocks(model, "layers") if getattr(model.config, "model_type", None) in LLAMA_LIKE else None
    if found is None:
        raise NMSparseError(f"{type(model).__name__}: the start records a residual-stream order, and this model has "
                            "no Llama-like residual stream to reorder; is the start a checkpoint of this model?")
    group = _llama_residual(model, *found, model.config.hidden_size)
    if sorted(order) != list(range(group.size)):
        raise NMSparseError(f"the start's residual order is not a permutation of {group.size} channels; re-run prune --permute")
    apply_order(model, group, torch.tensor(order))


def _wired(model: nn.Module, groups: list[ChannelGroup]) -> bool:
    """Every named parameter exists and holds the channel set where the group says: a family's variant with other
    names or shapes is left alone rather than half permuted."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for group in groups:
        for axis in (*group.consumers, *group.producers):
            p = params.get(axis.key)
            if p is None or p.dim() <= axis.dim or max(axis.offsets) + group.size > p.shape[axis.dim]:
                return False
    return True


def channel_plan(model: nn.Module, targets: dict[str, object], causal: bool) -> ChannelPlan:
    """The channel groups of `model` whose consumers include a target layer (module names in `targets`); every
    target whose K axis no group reorders is listed in `unpermuted` with the reason."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LLAMA_LIKE:
        groups = _llama(model, causal)
    elif model_type in BERT_LIKE:
        groups = _bert(model)
    else:
        groups = []
    family = model_type or type(model).__name__
    if groups and not _wired(model, groups):
        groups, family = [], f"{family} (its parameters are not wired as the {model_type} family's)"
    plan = ChannelPlan()
    for group in groups:
        if any(axis.key.removesuffix(".weight") in targets for axis in group.consumers):
            plan.groups.append(group)
    reordered = {axis.key.removesuffix(".weight") for g in plan.groups for axis in g.consumers}
    for name in targets:
        if name not in reordered:
            plan.unpermuted[name] = ("reads the residual stream, which is the model's output and keeps its order" if groups
                                     else f"no known producer wiring for {family}")
    return plan


def apply_order(model: nn.Module, group: ChannelGroup, order: torch.Tensor) -> None:
    """Reorder every axis of `group` in place: channel `order[p]` moves to position p (a tied parameter once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[tuple[int, int, int]] = set()
    with torch.no_grad():
        for axis in (*group.consumers, *group.producers):
            p = params[axis.key]
            for offset in axis.offsets:
                if (id(p), axis.dim, offset) in done:
                    continue
                done.add((id(p), axis.dim, offset))
                part = p.data.narrow(axis.dim, offset, group.size)
                part.copy_(part.index_select(axis.dim, order.to(p.device)))
