"""The fine-tuning loop: model + data + recipe -> an exactly N:M checkpoint, a summary and metrics.

Flow: resolve the model (timm, optional checkpoint) -> attach the recipe's masks -> train with timm's optimizer and
LR scheduler, the step plan setting alpha / structure every step -> evaluate every epoch -> checkpoint every epoch
-> finalize (exact N:M) -> write model.safetensors, summary.json, recipe.yaml.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from nmcli.checkpoints import Resolved, load_model, resolve
from nmcli.errors import NMSparseError
from nmcli.io.atomic import atomic_output
from nmcli.io.metadata import MODEL
from nmcli.methods.plan import StepPlan, plan_step, relative_training_flops
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models import ModelRef, build_model, data_config
from nmcli.nm import compliance, count_nonfinite
from nmcli.prune import PrunePlan, plan_prune
from nmcli.recipes import Recipe, to_dict
from nmcli.report.flops import per_layer_flops
from nmcli.schedules import Phases
from nmcli.train.checkpointing import load_training_checkpoint, restore_rng, save_training_checkpoint
from nmcli.train.data import load_data
from nmcli.train.distributed import DistEnv, all_equal, init_distributed, mean_over_ranks, shard, shutdown, sum_over_ranks
from nmcli.train.metrics import GradientFlowProbe, MetricsLog

MODEL_FILE, SUMMARY_FILE, RECIPE_FILE, METRICS_FILE = "model.safetensors", "summary.json", "recipe.yaml", "metrics.jsonl"


@dataclass
class FinetuneConfig:
    model: str
    recipe: Recipe
    out: Path
    data: str = "mnist5k"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    seed: int = 0
    num_classes: int | None = None
    bf16: bool = False
    resume: bool = False
    grad_log_every: int = 0
    log_every: int = 10
    stop_after: int | None = None
    limit: int | None = None
    force: bool = False
    device: str = "cpu"

    @property
    def use_bf16(self) -> bool:
        """bf16 autocast: --bf16, or the recipe's training.bf16."""
        return self.bf16 or bool(self.recipe.training.get("bf16"))

    @property
    def epochs(self) -> int:
        return int(self.recipe.training["epochs"])

    @property
    def batch_size(self) -> int:
        return int(self.recipe.training["batch_size"])

    def fingerprint(self, world: int) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        return {
            "model": self.model, "model_kwargs": self.model_kwargs, "checkpoint": str(self.checkpoint),
            "recipe": to_dict(self.recipe), "data": self.data, "seed": self.seed, "num_classes": self.num_classes,
            "bf16": self.bf16, "limit": self.limit, "world_size": world,
        }


class Reporter:
    """Progress callbacks; the CLI renders them, tests and scripts can ignore them."""

    def start(self, total_steps: int, first_step: int, description: str) -> None: ...
    def step(self, step: int, values: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...


@dataclass
class FinetuneResult:
    out: Path
    summary: dict[str, Any]


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    autocast: Callable = contextlib.nullcontext,
    clip_grad: float | None = None,
    probe: GradientFlowProbe | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step; the probe (if any) reads the gradients before the optimizer changes the weights."""
    with autocast():
        loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip_grad))
    record = {"gradient_flow": probe.measure()} if probe is not None else {}
    optimizer.step()
    return loss.detach(), record


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def evaluate(model: torch.nn.Module, loader: DataLoader, env: DistEnv, autocast: Callable) -> float:
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), autocast():
        for images, labels in loader:
            counts[0] += (model(images).argmax(1) == labels).sum()
            counts[1] += len(labels)
    model.train()
    counts = sum_over_ranks(counts, env)
    return float(counts[0] / counts[1]) if counts[1] else 0.0


def _check_out(config: FinetuneConfig) -> None:
    out = config.out
    if config.resume:
        return
    if out.exists() and any(out.iterdir()) and not config.force:
        raise NMSparseError(f"{out} already holds files; pass --force to replace them, or --resume {out} to continue")
    if not out.parent.exists():
        raise NMSparseError(f"output folder {out.parent} does not exist; create it first")


def _build(config: FinetuneConfig, splits_classes: int) -> tuple[torch.nn.Module, ModelRef, Resolved]:
    resolved = resolve(config.model, checkpoint=config.checkpoint, seed=config.seed, model_kwargs=config.model_kwargs)
    model = load_model(resolved)
    ref = resolved.model
    if config.num_classes is not None:
        if model.num_classes != config.num_classes:
            model.reset_classifier(config.num_classes)
        ref = ModelRef(ref.source, ref.name, {**ref.kwargs, "num_classes": config.num_classes})
    if model.num_classes != splits_classes:
        raise NMSparseError(
            f"the model's head has {model.num_classes} outputs but --data {config.data} has {splits_classes} "
            f"classes; pass --num-classes {splits_classes} to re-initialise the head"
        )
    return model, ref, resolved


def run_finetune(config: FinetuneConfig, reporter: Reporter | None = None) -> FinetuneResult:
    reporter = reporter or Reporter()
    device = torch.device(config.device)
    env = init_distributed(device)
    try:
        return _run(config, reporter, env, device)
    finally:
        shutdown(env)


@dataclass
class _Run:
    """What one fine-tuning run trains with, built once by `_prepare`."""

    config: FinetuneConfig
    env: DistEnv
    device: torch.device
    model: torch.nn.Module
    ref: ModelRef
    plan: PrunePlan  # the target layers (the same ones prune would choose) and the skipped ones
    sparsifier: Sparsifier
    sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    data_description: str
    phases: Phases
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_model: torch.nn.Module  # the model, wrapped in DDP when distributed
    autocast: Callable
    probe: GradientFlowProbe | None
    log: MetricsLog | None = None

    def evaluate(self) -> float:
        return evaluate(self.model, self.val_loader, self.env, self.autocast)


def _optimizer_and_scheduler(recipe: Recipe, model: torch.nn.Module, epochs: int, steps_per_epoch: int):  # noqa: ANN202
    """timm's factories, configured by the recipe; the LR schedule advances every step."""
    import timm.optim
    import timm.scheduler

    opt_cfg = dict(recipe.optimizer)
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=opt_cfg.pop("name"), lr=opt_cfg.pop("lr"), weight_decay=opt_cfg.pop("weight_decay", 0.0), **opt_cfg
    )
    sched_cfg = recipe.scheduler
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        sched=sched_cfg.get("name", "cosine"),
        num_epochs=epochs,
        warmup_epochs=float(sched_cfg.get("warmup_fraction", 0.0)) * epochs,
        warmup_lr=float(recipe.optimizer["lr"]) * 1e-3,
        min_lr=float(sched_cfg.get("min_lr", 0.0)),
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def _prepare(config: FinetuneConfig, env: DistEnv, device: torch.device) -> _Run:
    """Data, model, target layers with the recipe's masks attached, loaders, schedule, optimizer."""
    recipe, target = config.recipe, config.recipe.target
    meta_ref = ModelRef("timm", config.model, config.model_kwargs)
    splits = load_data(config.data, data_config(build_model(meta_ref), meta_ref), config.limit)
    model, ref, resolved = _build(config, splits.num_classes)
    model.to(device)
    plan = plan_prune(resolved, target, recipe.include, recipe.exclude)
    sparsifier = Sparsifier(model, plan.targets).attach()
    sampler = DistributedSampler(splits.train, num_replicas=env.world, rank=env.rank, shuffle=True, seed=config.seed)
    train_loader = DataLoader(splits.train, batch_size=config.batch_size, sampler=sampler, drop_last=False)
    phases = Phases.from_fractions(config.epochs * len(train_loader), recipe.dense_fraction, recipe.finetune_fraction)
    optimizer, scheduler = _optimizer_and_scheduler(recipe, model, config.epochs, len(train_loader))
    return _Run(
        config, env, device, model, ref, plan, sparsifier, sampler, train_loader,
        val_loader=DataLoader(shard(splits.val, env), batch_size=256),
        data_description=splits.description,
        phases=phases,
        optimizer=optimizer,
        scheduler=scheduler,
        train_model=DistributedDataParallel(model) if env.enabled else model,
        autocast=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if config.use_bf16 else contextlib.nullcontext,
        probe=GradientFlowProbe(sparsifier, target) if config.grad_log_every else None,
    )


def _begin(run: _Run, reporter: Reporter) -> tuple[int, int, float | None]:
    """Resume from the run's checkpoint, or start fresh and measure the starting accuracy.
    Returns (first epoch, first step, start accuracy or None when resumed)."""
    config = run.config
    metrics = config.out / METRICS_FILE if run.env.is_main else None
    if config.resume:
        model_state, state = load_training_checkpoint(config.out, config.fingerprint(run.env.world))
        run.model.load_state_dict(model_state)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.sparsifier.load_masks_state(state["masks"])
        epoch, step = int(state["epoch"]), int(state["step"])
        restore_rng(state)
        run.log = MetricsLog(metrics)
        run.log.rewind(epoch, step)
        reporter.message(f"resumed {config.out} at epoch {epoch} (step {step})")
        return epoch, step, None
    if run.env.is_main:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / METRICS_FILE).unlink(missing_ok=True)
    run.log = MetricsLog(metrics)
    run.sparsifier.set_plan(StepPlan("dense", (config.recipe.target,), 0))
    accuracy = run.evaluate()
    reporter.message(f"start: val accuracy {accuracy:.4f} ({run.data_description})")
    run.log.write({"event": "start", "val_accuracy": accuracy, "step": 0})
    return 0, 0, accuracy


def _train_epoch(run: _Run, epoch: int, step: int, reporter: Reporter) -> tuple[int, StepPlan | None]:
    """One pass over the training data, the recipe's plan set before every step. Returns (next step, last plan)."""
    config, recipe = run.config, run.config.recipe
    run.sampler.set_epoch(epoch)
    running, plan = 0.0, None
    for images, labels in run.train_loader:
        images, labels = images.to(run.device), labels.to(run.device)
        plan = plan_step(recipe, recipe.target, run.phases, step)
        run.sparsifier.set_plan(plan)
        run.scheduler.step_update(step)
        measure = run.probe if run.probe is not None and step % config.grad_log_every == 0 else None
        loss, record = train_step(
            run.train_model, images, labels, run.optimizer,
            autocast=run.autocast, clip_grad=recipe.training.get("clip_grad"), probe=measure,
        )
        value = loss.item()
        if not math.isfinite(value):
            raise NMSparseError(
                f"step {step}: the training loss is {value}; the weights diverged, so no model is written "
                "(lower --lr or the recipe's optimizer.lr)"
            )
        running = 0.9 * running + 0.1 * value if step else value
        values = {"loss": running, "phase": plan.phase, "alpha": plan.alpha, "pattern": plan.label(), "epoch": epoch}
        if step % config.log_every == 0 or record:
            run.log.write({"step": step, "lr": run.optimizer.param_groups[0]["lr"], **values, **record})
        reporter.step(step, values)
        step += 1
    return step, plan


def _end_epoch(run: _Run, epoch: int, step: int, plan: StepPlan | None, reporter: Reporter) -> None:
    """Validate, log, and (main rank) write the training checkpoint that --resume continues from."""
    config = run.config
    accuracy = run.evaluate()
    agree = _masks_agree(run.sparsifier, run.env)
    run.log.write({"event": "epoch", "epoch": epoch, "step": step, "val_accuracy": accuracy, "masks_identical_across_ranks": agree})
    reporter.message(f"epoch {epoch + 1}/{config.epochs}: val accuracy {accuracy:.4f} ({plan.label() if plan else ''})")
    if run.env.is_main:
        save_training_checkpoint(
            config.out, run.model,
            {"epoch": epoch + 1, "step": step, "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "masks": run.sparsifier.masks_state(),
             "fingerprint": json.dumps(config.fingerprint(run.env.world), sort_keys=True)},
        )


def _finish(run: _Run, start_accuracy: float | None, started: float) -> dict[str, Any]:
    """Exact N:M weights, final accuracy, summary; the main rank writes the outputs."""
    recipe = run.config.recipe
    _check_finite(run.model)
    run.sparsifier.finalize(recipe.target if recipe.method != "dense" else None)
    final_accuracy = run.evaluate()
    summary = _summary(run, start_accuracy, final_accuracy, started)
    if run.env.is_main:
        _write_outputs(run, summary)
    run.log.write({"event": "final", "val_accuracy": final_accuracy, "step": run.phases.total})
    return summary


def _run(config: FinetuneConfig, reporter: Reporter, env: DistEnv, device: torch.device) -> FinetuneResult:
    started = time.perf_counter()
    _check_out(config)
    _seed_everything(config.seed)
    run = _prepare(config, env, device)
    first_epoch, step, start_accuracy = _begin(run, reporter)
    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, first_epoch + config.stop_after)
    reporter.start(run.phases.total, step, f"{config.recipe.name} {config.recipe.target}")
    for epoch in range(first_epoch, last_epoch):
        step, plan = _train_epoch(run, epoch, step, reporter)
        _end_epoch(run, epoch, step, plan, reporter)
    reporter.finish()
    if last_epoch < config.epochs:
        reporter.message(f"stopped after epoch {last_epoch}; continue with --resume {config.out}")
        return FinetuneResult(config.out, {"stopped_after_epoch": last_epoch})
    return FinetuneResult(config.out, _finish(run, start_accuracy, started))


def _check_finite(model: torch.nn.Module) -> None:
    """Training that diverged in its last step leaves NaN/Inf weights behind a finite loss: never write them."""
    for name, param in model.named_parameters():
        bad = count_nonfinite(param.detach())
        if bad:
            raise NMSparseError(
                f"{name}: {bad} NaN/Inf weights after training; the run diverged, so no model is written "
                "(lower --lr or the recipe's optimizer.lr)"
            )


def _masks_agree(sparsifier: Sparsifier, env: DistEnv) -> bool:
    """All ranks hold the same weights, hence the same masks: check a checksum of every layer's mask."""
    if not env.enabled:  # one process agrees with itself; no need to recompute every mask
        return True
    digest = torch.zeros(len(sparsifier.params), dtype=torch.float64)
    for i, (name, param) in enumerate(sparsifier.params.items()):
        pattern = param.pattern()
        if pattern is not None:
            keep = param.keep_mask(sparsifier.original(name), pattern)
            digest[i] = float((keep.flatten().double() * torch.arange(1, keep.numel() + 1, dtype=torch.float64)).sum())
    return all_equal(digest, env)


def _summary(run: _Run, start_accuracy: float | None, final_accuracy: float, started: float) -> dict[str, Any]:
    config, model, layers = run.config, run.model, run.plan.targets
    recipe, target = config.recipe, config.recipe.target
    _, total_flops, per_layer = per_layer_flops(run.ref)
    layer_costs = {
        layer.module: (per_layer.get(layer.module, 0), model.get_submodule(layer.module).weight.shape[layer.layout.k_axis])
        for layer in layers.values()
    }
    sparse = recipe.method != "dense"
    compliant = {
        name: compliance(model.get_submodule(layer.module).weight.detach(), target, layer.layout).compliant
        for name, layer in layers.items()
    } if sparse else {}
    sparse_flops = total_flops - sum(f * (1 - target.density) for f, _ in layer_costs.values()) if sparse else total_flops
    return {
        "recipe": recipe.name,
        "method": recipe.method,
        "pattern": str(target) if sparse else None,
        "model": run.ref.to_json(),
        "data": config.data,
        "seed": config.seed,
        "epochs": config.epochs,
        "steps": run.phases.total,
        "world_size": run.env.world,
        "start_val_accuracy": start_accuracy,
        "final_val_accuracy": final_accuracy,
        "target_layers": len(layers),
        "skipped_layers": run.plan.skipped,
        "all_layers_compliant": all(compliant.values()) if sparse else None,
        "flops": {"unit": "FLOPs (2 x MACs), one forward at batch 1", "dense": total_flops, "sparse_theoretical": round(sparse_flops)},
        "training_flops_relative_to_dense": relative_training_flops(recipe, target, run.phases, layer_costs, total_flops),
        "wall_seconds": round(mean_over_ranks(time.perf_counter() - started, run.env), 2),
    }


def _write_outputs(run: _Run, summary: dict[str, Any]) -> None:
    """model.safetensors (with prune's N:M metadata plus the recipe), summary.json, recipe.yaml."""
    config = run.config
    tensors = {k: v.detach().contiguous().cpu() for k, v in run.model.state_dict().items()}
    if config.recipe.method != "dense":
        meta = run.plan.metadata(run.ref)
        meta.recipe = to_dict(config.recipe)
        strings = meta.to_strings()
    else:
        strings = {MODEL: json.dumps(run.ref.to_json(), sort_keys=True)}
    with atomic_output(config.out / MODEL_FILE, force=True) as tmp:
        save_file(tensors, str(tmp), metadata=strings)
    with atomic_output(config.out / SUMMARY_FILE, force=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_output(config.out / RECIPE_FILE, force=True) as tmp:
        tmp.write_text(config.recipe.to_yaml())
