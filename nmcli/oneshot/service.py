"""`nmsparse prune --method wanda|sparsegpt|alps`: calibration data -> sequential calibration -> the streamed writer.

Transformers are calibrated block by block on text (calibrate.py), image models layer by layer in one forward
pass over a batch of images (onepass.py). The model is loaded whole on the CPU (fine for the ~100 M-parameter
checkpoints this targets; the calibration activations are the other large term, reported in the result). The
output is written exactly as a magnitude prune writes it (same pipeline, dense-shaped, exact zeros), with the
method and calibration settings in the metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from nmcli.models.resolve import Resolved, load_model
from nmcli.data.images import calibration_images
from nmcli.data.teacher import read_prompts, teacher_count, teacher_samples
from nmcli.data.mixture import GENERAL_USE, Share, mix, parse_mixture
from nmcli.data.text import load_texts
from nmcli.data.tokens import PadCollate, TokenSamples, encoder_samples, encoder_texts, lm_chunks, load_tokenizer
from nmcli.errors import NMSparseError
from nmcli.io.rewrite import Item, copy_item, rewrite
from nmcli.models.architecture import ModelKind, data_config, model_kind
from nmcli.models.channels import channel_plan
from nmcli.oneshot.calibrate import (
    OneShotMethod,
    OneShotResult,
    SolverSettings,
    calibrate_and_prune,
    describe,
    prune_by_magnitude,
)
from nmcli.oneshot.budget import BudgetReport, BudgetSettings, budget_plan
from nmcli.oneshot.onepass import calibrate_in_one_pass
from nmcli.oneshot.permute import NORM_BATCHES, PermutationReport, input_column_norms, permute_channels
from nmcli.oneshot.plan import PrunePlan
from nmcli.oneshot.magnitude import PruneResult

CALIB_BATCH = 8


@dataclass(frozen=True)
class CalibrationSettings:
    data: str | None = None  # None: the general-use mixture (finetune's default) for transformers; image models name theirs
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def for_model(self, kind: ModelKind) -> CalibrationSettings:
        """The settings with the data made explicit for this kind of model."""
        if self.data is not None:
            return self
        if kind is ModelKind.IMAGE_CLASSIFIER:
            raise NMSparseError(
                "an image model is calibrated on images of its own domain: pass --calib IMAGE_FOLDER (with train/ "
                "class folders) or --calib mnist5k"
            )
        return replace(self, data=GENERAL_USE)


def _text_pool(kind: ModelKind, tokenizer, source: str, seq_len: int) -> TokenSamples:  # noqa: ANN001
    """A text source's training part as calibration samples: LM chunks, or encoder paragraphs."""
    corpus = load_texts(source)
    if kind is ModelKind.CAUSAL_LM:
        return lm_chunks(tokenizer, corpus.train, seq_len, f"--calib {source}")
    return encoder_samples(tokenizer, encoder_texts(corpus.train)[0], seq_len, f"--calib {source}")


def calibration_batches(resolved: Resolved, model: torch.nn.Module, calib: CalibrationSettings) -> list[dict]:
    """`samples` seeded picks from the calibration data: LM chunks (or teacher-written text), encoder paragraphs; a
    mixture of sources (nmcli/data/mixture.py) is drawn in its proportions first."""
    kind = model_kind(resolved.model)
    folder = resolved.checkpoint.folder
    tokenizer = load_tokenizer(folder)
    count = teacher_count(calib.data)
    if count is not None:
        if kind is not ModelKind.CAUSAL_LM:
            raise NMSparseError(f"--calib {calib.data}: only a causal LM can write its own calibration text")
        pool = teacher_samples(model, tokenizer, str(folder), count, calib.seq_len, calib.seed, read_prompts(None), None).samples
    else:
        shares = parse_mixture(calib.data)
        pools = [_text_pool(kind, tokenizer, share.source, calib.seq_len) for share in shares or [Share(calib.data, 1.0)]]
        pool = mix(pools, shares, calib.seed)[0] if shares else pools[0]
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(calib.seed))[: calib.samples]
    chosen = TokenSamples([pool.ids[i] for i in sorted(pick.tolist())])
    return list(DataLoader(chosen, batch_size=CALIB_BATCH, collate_fn=PadCollate(int(tokenizer.pad_token_id))))


def check_oneshot_input(resolved: Resolved, method: OneShotMethod) -> None:
    if resolved.model is None:
        doing = ("--permute reorders the channels of the model's layers" if method is OneShotMethod.MAGNITUDE
                 else f"--method {method.value} runs the model on calibration data")
        raise NMSparseError(
            f"{doing}, and the architecture of {resolved.checkpoint.where} is unknown: pass --model (a timm name), "
            "use a Hugging Face folder, or use --method magnitude without --permute"
        )


def _calibrate(resolved: Resolved, model: torch.nn.Module, layers: dict, solver: SolverSettings,
               calib: CalibrationSettings, progress: Callable[[int, int], None],
               batches: list[dict] | None) -> OneShotResult:
    """Magnitude (after --permute): every layer of the model in memory; image models: one pass over a batch of
    images; transformers: block by block over text batches (`batches`, when --permute has drawn them already)."""
    if solver.method is OneShotMethod.MAGNITUDE:
        result = OneShotResult({}, {})
        prune_by_magnitude(model, layers, solver, result)
        result.by_magnitude = []  # the method itself, not a fallback
        return result
    if model_kind(resolved.model) is ModelKind.IMAGE_CLASSIFIER:
        images = calibration_images(calib.data, data_config(model, resolved.model), calib.samples, calib.seed)
        return calibrate_in_one_pass(model, layers, images, solver, progress)
    return calibrate_and_prune(model, layers, batches or calibration_batches(resolved, model, calib), solver, progress)


def _permute(resolved: Resolved, model: torch.nn.Module, layers: dict, solver: SolverSettings,
             calib: CalibrationSettings) -> tuple[PermutationReport, list[dict] | None]:
    """Reorder the model's channels for the pattern (importance |W| for magnitude, Wanda's for the calibrated
    methods, on the first calibration batches); the calibration batches, when drawn, are handed on."""
    plan = channel_plan(model, layers, model_kind(resolved.model) is ModelKind.CAUSAL_LM)
    batches = norms = None
    if solver.method is not OneShotMethod.MAGNITUDE and plan.groups:
        batches = calibration_batches(resolved, model, calib)
        norms = input_column_norms(model, set(layers), batches[:NORM_BATCHES])
    return permute_channels(model, plan, layers, solver.pattern, norms), batches


def _allocate(resolved: Resolved, model: torch.nn.Module, plan: PrunePlan, solver: SolverSettings,
              calib: CalibrationSettings, budget: BudgetSettings, batches: list[dict] | None,
              progress: Callable[[int, int], None]) -> tuple[PrunePlan, SolverSettings, BudgetReport, list[dict]]:
    """--budget: each layer's pattern by its measured sensitivity (Wanda's criterion for the calibrated methods,
    magnitude's for magnitude); the solver then prunes each layer to its own pattern."""
    batches = batches or calibration_batches(resolved, model, calib)
    modules = {layer.module for layer in plan.targets.values()}
    norms = None if solver.method is OneShotMethod.MAGNITUDE else input_column_norms(model, modules, batches[:NORM_BATCHES])
    chosen, report = budget_plan(model, plan, budget, batches, norms, progress)
    return chosen, replace(solver, pattern=chosen.pattern, own=chosen.module_patterns()), report, batches


def check_image_model_input(resolved: Resolved, solver: SolverSettings, budget: BudgetSettings | None) -> None:
    """--budget and --reconstruct work block by block on text: not on a timm image model."""
    if model_kind(resolved.model) is not ModelKind.IMAGE_CLASSIFIER:
        return
    if budget is not None:
        raise NMSparseError(
            "--budget measures each layer's sensitivity on text through a Hugging Face transformer; for a timm image "
            "model prune every layer to one --pattern"
        )
    if solver.reconstruct:
        raise NMSparseError(
            f"--reconstruct {solver.reconstruct} trains a transformer's blocks one at a time on text; a timm image "
            "model is calibrated in one pass: leave --reconstruct out"
        )


def oneshot_prune(
    resolved: Resolved, plan: PrunePlan, out: Path, solver: SolverSettings, calib: CalibrationSettings,
    device: torch.device = torch.device("cpu"), *, permute: bool = False, budget: BudgetSettings | None = None,
    force: bool = False, progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[PruneResult, OneShotResult]:
    """Calibrate and prune on `device` (the model, its activations and Hessians); the file is written from the CPU.
    With `permute`, the channels are reordered first (every reordered tensor is then written from memory); with
    `budget`, each layer's pattern is chosen next."""
    check_oneshot_input(resolved, solver.method)
    check_image_model_input(resolved, solver, budget)
    if solver.method is not OneShotMethod.MAGNITUDE or budget is not None:  # magnitude alone reads no data
        calib = calib.for_model(model_kind(resolved.model))
    model = load_model(resolved).to(device).eval()  # no dropout in the probe, the norms or the calibration
    by_module = {layer.module: layer for layer in plan.targets.values()}
    permutation, batches = _permute(resolved, model, by_module, solver, calib) if permute else (None, None)
    allocation = None
    if budget is not None:
        plan, solver, allocation, batches = _allocate(resolved, model, plan, solver, calib, budget, batches, progress)
        by_module = {layer.module: layer for layer in plan.targets.values()}
    result = _calibrate(resolved, model, by_module, solver, calib, progress, batches)
    result.permutation = permutation.to_dict() if permutation else None
    result.budget = allocation.to_dict() if allocation else None
    tensors = {name: result.weights[layer.module] for name, layer in plan.targets.items()}
    if permutation is not None and permutation.groups:
        state = model.state_dict()
        tensors = {name: state[key] for name, key in resolved.match.to_model.items()} | tensors
    ckpt = resolved.checkpoint

    def items(names: list[str]) -> list[Item]:
        """Calibrated layers come from memory (no read of the source tensor); the rest is copied."""
        made = []
        for name in names:
            info = ckpt.infos[name]
            if name in tensors:
                made.append(Item([], [(name, info.shape, info.dtype)],
                                 lambda _inputs, name=name: [tensors[name].to("cpu", ckpt.infos[name].dtype).contiguous()]))
            else:
                made.append(copy_item(ckpt, name))
        return made

    meta_obj = plan.metadata(resolved.model)
    # the calibration settings, with the sample count actually used, are recorded for the methods that calibrate
    meta_obj.oneshot = {"method": solver.method.value,
                        **{k: v for k, v in describe(result).items() if k not in ("seconds", "samples")}}
    if solver.method is not OneShotMethod.MAGNITUDE:
        meta_obj.oneshot |= {"damp": solver.damp, "block_size": solver.block_size, "refine": solver.refine,
                            "reconstruct": solver.reconstruct, **asdict(replace(calib, samples=result.samples))}
        if solver.reconstruct:
            meta_obj.oneshot["reconstruct_lr"] = solver.reconstruct_lr
    kept = {k: v for k, v in ckpt.metadata.items() if not k.startswith("nmsparse.")}
    notes = resolved.match.notes() if resolved.match is not None else []
    notes += rewrite(ckpt, items, out, {**kept, **meta_obj.to_strings()}, force=force)
    if permutation is not None:
        notes.append(permutation.note())
    if allocation is not None:
        notes.append(allocation.note())
    if 0 < result.samples < calib.samples:
        notes.append(f"--calib {calib.data} gives {result.samples} calibration samples, fewer than --calib-samples "
                     f"{calib.samples} asks for: calibrated on all {result.samples}")
    if result.by_magnitude:
        notes.append(f"pruned by magnitude (no calibration input reached them, or they cannot be solved): "
                     f"{', '.join(result.by_magnitude)}")
    if result.damped:
        notes.append(f"the calibration Hessian was singular at --damp {solver.damp}; damping raised for "
                     + ", ".join(f"{name} ({damp:g})" for name, damp in result.damped.items()))
    total = sum(i.nbytes for i in ckpt.infos.values())
    return PruneResult(out, plan, len(ckpt.infos), total, notes), result
