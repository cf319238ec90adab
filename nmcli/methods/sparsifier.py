"""Attach N:M masks to a model's target layers without editing model code, and remove them at the end.

Masks are attached with `torch.nn.utils.parametrize` (as torch.ao.pruning does): each target weight becomes
`original` + an `NMWeight` parametrization that forms the effective weight every forward pass. `finalize`
removes the parametrizations and leaves plain weights with exact zeros at the target pattern. With a recipe's
`lora:` section the chosen layers also hold low-rank factors (methods/lora.py) inside their parametrization, every
other parameter is frozen, and `finalize` merges the factors under the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize

from nmcli.errors import NMSparseError
from nmcli.methods.effective import effective_weight
from nmcli.methods.lora import LoraFactors, lora_delta, lora_weight, mask_scale
from nmcli.methods.plan import StepPlan
from nmcli.models.targets import LayerInfo
from nmcli.nm import Layout, NMPattern, apply_nm_, nm_mask
from nmcli.methods.recipes import LoraSpec
from nmcli.methods.schedules import pattern_for_layer


class NMWeight(nn.Module):
    """Parametrization W -> W_eff for one layer; the sparsifier sets its state before every step."""

    def __init__(self, layout: Layout, reduction_length: int):
        super().__init__()
        self.layout = layout
        self.reduction_length = reduction_length
        self.plan: StepPlan | None = None
        self.frozen: torch.Tensor | None = None
        self.lora: LoraFactors | None = None
        self.lora_masks: dict[NMPattern, torch.Tensor] = {}  # the frozen base's mask at each pattern met
        self.lora_scale: torch.Tensor | None = None  # S of the last forward, for the split adapter term
        self.own: NMPattern | None = None  # this layer's pattern in place of the recipe's last stage (--budget starts)

    def pattern(self) -> NMPattern | None:
        if self.plan is None or self.plan.dense:
            return None
        if self.own is not None and self.plan.at_last_stage:
            return self.own
        return pattern_for_layer(list(self.plan.stages), self.plan.stage, self.reduction_length)

    def final_pattern(self, target: NMPattern | None) -> NMPattern | None:
        """The pattern the run leaves this layer at: its own, else the recipe's (None: a dense recipe)."""
        return None if target is None else self.own or target

    def keep_mask(self, weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
        """The binary mask E in use at `pattern` (this layer's `pattern()`): the frozen one, else from `weight`."""
        if self.frozen is not None:
            return self.frozen
        if self.lora is None:
            return nm_mask(weight.detach(), pattern, self.layout)
        if pattern not in self.lora_masks:  # the base is frozen: its mask at a pattern never changes
            self.lora_masks[pattern] = nm_mask(weight.detach(), pattern, self.layout)
        return self.lora_masks[pattern]

    def final_weight(self, original: torch.Tensor, target: NMPattern, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The exactly N:M weight a run leaves: the base under its frozen mask, else its magnitude mask at `target`;
        with LoRA, E * (W + s delta) (`delta` = B A laid out as W) in the adapters' dtype (a base kept in bf16 for
        training gets back the adapters' precision). No target (a dense recipe): the weight itself."""
        if target is None:
            return original
        keep = (self.frozen if self.frozen is not None else nm_mask(original, target, self.layout)).to(original.device)
        if delta is not None:
            return lora_weight(original, keep, delta.to(original.device), self.lora.scale)
        return original.masked_fill(~keep, 0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        plan, pattern = self.plan, self.pattern()
        if self.lora is not None:
            return self._with_adapter(weight, plan, pattern)
        if plan is None or pattern is None or pattern.is_dense:
            return weight
        if plan.freeze and self.frozen is None:
            self.frozen = nm_mask(weight.detach(), pattern, self.layout)
        return effective_weight(
            weight, self.keep_mask(weight, pattern), alpha=plan.alpha, sr_lambda=plan.sr_lambda, backward=plan.backward
        )

    def _with_adapter(self, weight: torch.Tensor, plan: StepPlan | None, pattern: NMPattern | None) -> torch.Tensor:
        """S * (W + s B A); with adapter dropout in a training step S * W, the module's hook adding the rest."""
        lora = self.lora
        if plan is None or pattern is None or pattern.is_dense:
            keep, alpha = torch.ones_like(weight, dtype=torch.bool), 0.0
        else:
            if plan.freeze and self.frozen is None:
                self.frozen = nm_mask(weight.detach(), pattern, self.layout)
            keep, alpha = self.keep_mask(weight, pattern), plan.alpha
        if lora.split:
            self.lora_scale = mask_scale(keep, alpha, lora.lora_A.dtype)
            return self.lora_scale.to(weight.dtype) * weight
        return lora.masked_weight(weight, keep, alpha)


class Sparsifier:
    """The target layers of one model and their parametrizations; `own`: module -> its pattern where it is not the
    recipe's (a start pruned with per-layer patterns)."""

    def __init__(self, model: nn.Module, targets: dict[str, LayerInfo], own: dict[str, NMPattern] | None = None):
        self.model = model
        self.targets = targets
        self.own = own or {}
        self.params: dict[str, NMWeight] = {}

    def modules(self) -> Iterator[tuple[str, nn.Module]]:
        by_name = dict(self.model.named_modules())
        for layer in self.targets.values():
            yield layer.module, by_name[layer.module]

    def attach(self, lora: LoraSpec | None = None) -> Sparsifier:
        """Parametrize every target layer; with `lora`, give the layers its globs choose adapters and freeze the
        rest of the model (norms and biases stay trainable with `train_norms`)."""
        adapted = adapter_layers(lora, [name for name, _ in self.modules()]) if lora is not None else set()
        for name, module in self.modules():
            layer = self.targets[f"{name}.weight"]
            param = NMWeight(layer.layout, module.weight.shape[layer.layout.k_axis])
            param.own = self.own.get(name)
            if name in adapted:
                param.lora = _factors(name, module, layer.layout, lora)
                module.register_forward_hook(_split_adapter_hook(param))
            parametrize.register_parametrization(module, "weight", param, unsafe=True)
            self.params[name] = param
        if lora is not None:
            freeze_all_but_adapters(self.model, lora.train_norms, getattr(torch, lora.base_dtype))
        return self

    def adapters(self) -> dict[str, LoraFactors]:
        return {name: p.lora for name, p in self.params.items() if p.lora is not None}

    def set_plan(self, plan: StepPlan) -> None:
        for param in self.params.values():
            if not plan.freeze:
                param.frozen = None
            param.plan = plan

    def masks_keep_every_weight(self) -> bool:
        """Whether the masks of the plan set now zero no weight: each target weight is N:M at its layer's pattern
        already (a one-shot start, a pruned checkpoint), so the masked model computes what the unmasked one does.
        A sharded weight is gathered whole first (every rank calls this)."""
        for name, module in self.modules():
            param = self.params[name]
            pattern = param.pattern()
            if pattern is None or pattern.is_dense:
                continue
            weight = module.parametrizations.weight.original.detach()  # not self.original: one module walk in all
            weight = weight.full_tensor() if isinstance(weight, DTensor) else weight
            if bool((weight != 0).logical_and_(~param.keep_mask(weight, pattern)).any()):
                return False
        return True

    def original(self, name: str) -> torch.Tensor:
        """The dense master weight the optimizer updates."""
        return dict(self.model.named_modules())[name].parametrizations.weight.original

    def masks_state(self) -> dict[str, torch.Tensor]:
        """Frozen masks, the only mask state that cannot be re-derived from the weights (for checkpoints)."""
        return {name: p.frozen for name, p in self.params.items() if p.frozen is not None}

    def load_masks_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, mask in state.items():
            self.params[name].frozen = mask.bool()

    def finalize(self, target: NMPattern | None) -> None:
        """Remove the parametrizations; with a target, weights become exactly N:M by `NMWeight.final_weight`'s rule
        (frozen mask, else magnitude; with LoRA the merge), in place where it can be."""
        for name, module in self.modules():
            param = self.params.pop(name)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            pattern = param.final_pattern(target)
            if pattern is None:
                continue
            with torch.no_grad():  # in place where no adapter is merged: no second copy of a large weight
                if param.lora is not None:
                    module.weight.data = param.final_weight(module.weight, pattern, param.lora.delta())
                elif param.frozen is not None:
                    module.weight.masked_fill_(~param.frozen, 0)
                else:
                    apply_nm_(module.weight.data, pattern, param.layout)
            param.lora, param.lora_scale = None, None  # merged: the hook adds nothing any more

    def finalized_state(self, state: dict[str, torch.Tensor], target: NMPattern | None) -> dict[str, torch.Tensor]:
        """`finalize` on a state dict of the parametrized model (a sharded run's, gathered): every target layer's
        `original` (and factors) become its plain, exactly N:M `weight`."""
        out = dict(state)
        for name, param in self.params.items():
            original = out.pop(f"{name}.parametrizations.weight.original")
            delta = None
            if param.lora is not None:
                factors = f"{name}.parametrizations.weight.0.lora.lora_"
                delta = lora_delta(out.pop(factors + "A"), out.pop(factors + "B"), param.lora.fan_in_fan_out)
            out[f"{name}.weight"] = param.final_weight(original, param.final_pattern(target), delta)
        return out


def adapter_layers(lora: LoraSpec, names: list[str]) -> set[str]:
    """The target layers `lora.targets` chooses; a glob that chooses none is an error naming it."""
    chosen = set()
    for glob in lora.targets:
        matched = {name for name in names if fnmatchcase(name, glob)}
        if not matched:
            example = names[0] if names else "(none)"
            raise NMSparseError(f"lora.targets: {glob!r} matches none of the {len(names)} target layers (e.g. {example})")
        chosen |= matched
    return chosen


def _factors(name: str, module: nn.Module, layout: Layout, lora: LoraSpec) -> LoraFactors:
    if module.weight.dim() != 2:
        raise NMSparseError(f"lora.targets: {name} is a {type(module).__name__} with a {module.weight.dim()}-D weight; "
                            "adapters go on Linear layers: narrow lora.targets to them")
    in_features = module.weight.shape[layout.k_axis]
    out_features = module.weight.shape[1 - layout.k_axis]
    if lora.rank > min(out_features, in_features):
        raise NMSparseError(f"lora.rank: {lora.rank} is larger than layer {name} ({out_features} x {in_features}); "
                            f"choose a rank of at most {min(out_features, in_features)}")
    factors = LoraFactors(out_features, in_features, lora.rank, lora.scale, lora.dropout, fan_in_fan_out=layout.k_axis == 0)
    return factors.to(module.weight.device)


def _split_adapter_hook(param: NMWeight) -> Callable:
    """Adds the adapter's term on the dropped-out input when the parametrization left it out (`LoraFactors.split`)."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if param.lora is None or not param.lora.split or param.lora_scale is None:
            return output
        return output + param.lora.adapter_output(inputs[0], param.lora_scale)

    return hook


def freeze_all_but_adapters(model: nn.Module, train_norms: bool, base_dtype: torch.dtype = torch.float32) -> None:
    """Only adapter factors train (and, with `train_norms`, norm weights and biases): the optimizer holds no
    state for anything else. The frozen target weights are kept in `base_dtype` when it is narrower: under bf16
    autocast they enter the masked sum in bf16 anyway, so training computes the same; embeddings and norms keep
    their dtype, and with them the residual stream's precision."""
    norm_modules = {name for name, m in model.named_modules() if type(m).__name__.lower().endswith("norm")}
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        is_factor = name.endswith(("lora_A", "lora_B"))
        is_norm_or_bias = name.endswith(".bias") or owner in norm_modules
        param.requires_grad_(is_factor or (train_norms and is_norm_or_bias))
        if name.endswith(".parametrizations.weight.original") and param.element_size() > base_dtype.itemsize:
            param.data = param.data.to(base_dtype)
