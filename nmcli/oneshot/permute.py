"""`prune --permute`: reorder channels before the mask (methods.md §9) so that the model computes what it computed
before, and the N:M pattern keeps more of what matters.

For each channel group of the model (nmcli/models/channels.py) the importance of its consumers' K columns is
scored — |W| for magnitude, Wanda's |W|·‖x_j‖ for the calibrated methods, ‖x_j‖ measured on the dense model over the
first NORM_BATCHES calibration batches — and the order that keeps the most (nmcli/oneshot/permutation.py) is
folded into the weights. Calibration then runs on the reordered model as usual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from nmcli.runtime.device import model_device, place
from nmcli.errors import NMSparseError
from nmcli.models.architecture import base_model
from nmcli.models.channels import RESIDUAL, ChannelGroup, ChannelPlan, apply_order
from nmcli.models.targets import LayerInfo
from nmcli.nm import NMPattern
from nmcli.oneshot.calibrate import real_rows
from nmcli.oneshot.permutation import search_order

NORM_BATCHES = 2  # calibration batches (of 8 samples) that measure the input norms of the dense model
PROBE_TOKENS = 16
PROBE_TOLERANCE = 1e-4  # relative to the largest output: float32 sums in another order stay far below it


@dataclass
class PermutationReport:
    importance: str  # "magnitude" or "wanda" (|W|·‖x‖)
    groups: int = 0  # channel groups reordered
    kept_before: float = 0.0  # importance the pattern keeps, summed over the scored groups
    kept_after: float = 0.0
    unpermuted: dict[str, str] = field(default_factory=dict)  # target layer -> why its K axis keeps its order
    residual_order: list[int] | None = None  # the residual stream's new order, when it was reordered
    seconds: float = 0.0

    def note(self) -> str:
        """One line for prune's output."""
        gain = 100 * (self.kept_after / self.kept_before - 1) if self.kept_before else 0.0
        line = (f"channels permuted in {self.groups} groups ({self.seconds:.1f}s): {self.importance} importance kept "
                f"by the pattern {gain:+.2f}%")
        if self.unpermuted:
            reasons: dict[str, list[str]] = {}
            for name, why in self.unpermuted.items():
                reasons.setdefault(why, []).append(name)
            line += "; kept in their order: " + "; ".join(
                f"{len(names)} layer(s) ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): {why}"
                for why, names in reasons.items())
        return line

    def to_dict(self) -> dict:
        gain = self.kept_after / self.kept_before - 1 if self.kept_before else 0.0
        return {"importance": self.importance, "groups": self.groups, "kept_gain": round(gain, 6),
                "unpermuted": self.unpermuted, "residual_order": self.residual_order, "seconds": self.seconds}


def input_column_norms(model: nn.Module, modules: set[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """‖X_:,j‖₂ of every input column of `modules` (Linear layers) over the tokens of `batches`, run through the base
    model (a target outside it, which no input then reaches, gets no norms: its importance stays |W|)."""
    sums: dict[str, torch.Tensor] = {}
    found = {name: m for name, m in model.named_modules() if name in modules}

    tokens: list[torch.Tensor | None] = [None]  # the running batch's attention mask: padding is left out

    def hook(name: str, x: torch.Tensor) -> None:
        rows = real_rows(x.detach().reshape(-1, x.shape[-1]).float(), tokens[0])
        sums[name] = sums.get(name, 0) + rows.pow(2).sum(0)

    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0])) for name, m in found.items()]
    body = base_model(model)  # no LM head: its logits would set the peak
    try:
        with torch.no_grad():
            for batch in batches:
                tokens[0] = batch.get("attention_mask")
                body(**place(batch, model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt().cpu() for name, s in sums.items()}


def _scores(model: nn.Module, group: ChannelGroup, targets: set[str], norms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[rows, size] importance of each target consumer (one block of rows per offset)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for axis in group.consumers:
        module = axis.key.removesuffix(".weight")
        if module not in targets:
            continue
        score = params[axis.key].detach().float().abs().cpu()
        if module in norms:
            score = score * norms[module]
        out.append(torch.cat([score[:, o : o + group.size] for o in axis.offsets], dim=0))
    return out


def _probe(model: nn.Module) -> torch.Tensor:
    """The model's output (logits, or the encoder's hidden states) on a fixed random token sequence."""
    ids = torch.randint(0, model.config.vocab_size, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids.to(model_device(model)))
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def check_same_outputs(model: nn.Module, before: torch.Tensor, family: str) -> None:
    """The reordered model must compute what it computed: a variant with parameters the channel rules do not know
    (an extra norm or bias on a reordered axis) is caught here instead of being written out broken."""
    after = _probe(model)
    error = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if error > PROBE_TOLERANCE:
        raise NMSparseError(f"--permute: the reordered {family} model computes other outputs (relative difference "
                            f"{error:.2g} on a probe sequence): its wiring differs from the rules of "
                            "nmcli/models/channels.py; prune without --permute")


def permute_channels(model: nn.Module, plan: ChannelPlan, targets: dict[str, LayerInfo], pattern: NMPattern,
                     norms: dict[str, torch.Tensor] | None) -> PermutationReport:
    """Reorder the channel groups of `plan` (nmcli/models/channels.py) in `model`, in place, for `pattern`; `norms`
    (module -> input column norms) make the importance Wanda's, None keeps it |W|."""
    started = time.perf_counter()
    before = _probe(model) if plan.groups else None
    report = PermutationReport("wanda" if norms else "magnitude", unpermuted=dict(plan.unpermuted))
    for group in plan.groups:
        if group.size % pattern.m:
            for axis in group.consumers:
                report.unpermuted.setdefault(axis.key.removesuffix(".weight"),
                                             f"{group.name}: {group.size} channels are not whole groups of {pattern.m}")
            continue
        result = search_order(_scores(model, group, set(targets), norms or {}), pattern)
        report.kept_before += result.kept_before
        report.kept_after += result.kept_after
        if result.kept_after > result.kept_before:
            apply_order(model, group, result.order)
            report.groups += 1
            if group.name == RESIDUAL:
                report.residual_order = result.order.tolist()
    if before is not None:
        check_same_outputs(model, before, getattr(model.config, "model_type", type(model).__name__))
    report.seconds = round(time.perf_counter() - started, 2)
    return report
