"""The fine-tuning loop: model + data + recipe -> an exactly N:M checkpoint, a summary and metrics.

Flow: resolve the model (timm name / checkpoint, or a Hugging Face folder) -> its task (tasks.py: labelled images,
or distillation from the dense teacher on text) -> attach the recipe's masks -> train with timm's optimizer and LR
scheduler, the step plan setting alpha / structure every step -> evaluate every epoch -> checkpoint every epoch ->
finalize (exact N:M) -> write model.safetensors (+ the Hugging Face folder's files), summary.json, recipe.yaml.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from nmcli.data.batches import LengthGroupedBatches
from nmcli.data.images import MNIST5K
from nmcli.data.mixture import GENERAL_USE
from nmcli.data.text import NEWS
from nmcli.runtime.device import bf16_warning, place
from nmcli.errors import NMSparseError
from nmcli.quality.suite import by_domain, metric_words
from nmcli.io.atomic import atomic_output
from nmcli.io.metadata import MODEL
from nmcli.io.peft_adapter import ADAPTER_DIR, write_adapter
from nmcli.io.rewrite import copy_side_files
from nmcli.io.sources import INDEX_NAME
from nmcli.methods.plan import StepPlan, plan_step, relative_training_flops
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models.architecture import ModelKind, ModelRef, model_kind
from nmcli.models.resolve import Resolved, load_model, resolve
from nmcli.nm import NMPattern, compliance, count_nonfinite
from nmcli.oneshot.calibrate import one_shot_start
from nmcli.oneshot.plan import PrunePlan, plan_prune
from nmcli.methods.recipes import Recipe, to_dict
from nmcli.report.flops import target_costs
from nmcli.methods.schedules import Phase, Phases
from nmcli.train.adapter import check_lora_settings, kept_adapter
from nmcli.train.checkpointing import (
    CHECKPOINT_DIR,
    checkpoint_tensors,
    load_checkpoint_weights,
    read_training_state,
    restore_rng,
    save_training_checkpoint,
)
from nmcli.train.distributed import DistEnv, all_equal, init_distributed, mean_over_ranks, shutdown
from nmcli.train.metrics import GradientFlowProbe, MetricsLog
from nmcli.train.recompute import recompute_activations
from nmcli.train.sharding import (
    check_shard,
    finish_sharded,
    gathered_model_state,
    gathered_optimizer_state,
    scatter_state,
    shard_model,
)
from nmcli.train.tasks import (
    Task,
    TextSettings,
    align_teacher,
    check_text_settings,
    distill_task,
    image_task,
    student_of,
    training_plan,
)

MODEL_FILE, SUMMARY_FILE, RECIPE_FILE, METRICS_FILE = "model.safetensors", "summary.json", "recipe.yaml", "metrics.jsonl"


@dataclass
class FinetuneConfig:
    model: str
    recipe: Recipe
    out: Path
    data: str | None = None  # None: mnist5k for timm models, GENERAL_USE (a mixture) for Hugging Face models
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    seed: int = 0
    num_classes: int | None = None
    bf16: bool = False
    resume: bool = False
    grad_log_every: int = 0
    eval_every: int = 0  # also evaluate every N steps (0: once per epoch)
    log_every: int = 10
    stop_after: int | None = None
    limit: int | None = None
    force: bool = False
    device: str = "cpu"
    seq_len: int = 128  # Hugging Face models: tokens per training / held-out sample
    start: str | None = None  # Hugging Face models: the student's starting N:M checkpoint (default: the teacher)
    prompts: Path | None = None  # --data teacher:N: prompts file (default: the built-in prompts)
    eval_data: tuple[str, ...] = ()  # Hugging Face models: held-out sets besides the data's own and the built-in news
    measure_start: bool = True  # evaluate the start and one-shot quality (the study measures each start once)
    keep_adapter: bool = False  # with a recipe's lora: also write the adapter in peft's layout (OUT/adapter)
    shard: bool = False  # under torchrun: FSDP2 for student and teacher instead of DistributedDataParallel
    gradient_checkpointing: bool = False  # recompute each block's activations in backward instead of keeping them

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
            "bf16": self.bf16, "limit": self.limit, "world_size": world, "seq_len": self.seq_len, "start": self.start,
            "prompts": str(self.prompts),
            "lora": to_dict(self.recipe).get("lora"),  # named on its own: a LoRA run resumed without it says so
            "shard": self.shard,  # sharded checkpoints hold the optimizer state by parameter name
        }


class Reporter:
    """Progress callbacks; the CLI renders them, tests and scripts can ignore them."""

    def start(self, total_steps: int, first_step: int, description: str) -> None: ...
    def step(self, step: int, values: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...  # shown even where messages are not (--quiet, --json)
    def finish(self) -> None: ...


@dataclass
class FinetuneResult:
    out: Path
    summary: dict[str, Any]


def train_step(
    model: torch.nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
    autocast: Callable = contextlib.nullcontext,
    clip_grad: float | None = None,
    probe: GradientFlowProbe | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step on the task's loss; the record holds the loss terms and, with a probe, the gradient
    statistics read before the optimizer changes the weights."""
    with autocast():
        loss, terms = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip_grad))
    record: dict[str, Any] = {"terms": terms} if terms else {}
    if probe is not None:
        record["gradient_flow"] = probe.measure()
    optimizer.step()
    return loss.detach(), record


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _check_out(config: FinetuneConfig) -> None:
    out = config.out
    if config.resume:
        return
    if out.exists() and any(out.iterdir()) and not config.force:
        raise NMSparseError(f"{out} already holds files; pass --force to replace them, or --resume {out} to continue")
    if not out.parent.exists():
        raise NMSparseError(f"output folder {out.parent} does not exist; create it first")


def _task(config: FinetuneConfig, device: torch.device) -> tuple[Task, torch.nn.Module, ModelRef, Resolved]:
    """The model to train (the student, for Hugging Face models) and its task; the teacher computes on `device`."""
    resolved = resolve(config.model, checkpoint=config.checkpoint, seed=config.seed, model_kwargs=config.model_kwargs)
    if resolved.model is None:
        raise NMSparseError(f"{config.model}: the architecture is unknown; fine-tuning needs a timm name or a Hugging Face folder")
    ref, kind = resolved.model, model_kind(resolved.model)
    if kind is ModelKind.IMAGE_CLASSIFIER:
        if config.shard:
            raise NMSparseError("--shard goes with Hugging Face models (their transformer blocks are the shards); a "
                                "timm model trains under plain torchrun (DistributedDataParallel)")
        if config.start is not None:
            raise NMSparseError("--start goes with Hugging Face models; for timm models pass --checkpoint")
        if config.eval_data:
            raise NMSparseError("--eval-data goes with Hugging Face models (held-out text); a timm model is scored on its --data")
        model = load_model(resolved)
        if config.num_classes is not None:
            if model.num_classes != config.num_classes:
                model.reset_classifier(config.num_classes)
            ref = ModelRef(ref.source, ref.name, {**ref.kwargs, "num_classes": config.num_classes})
        return image_task(resolved, ref, model, config.data or MNIST5K, config.limit), model, ref, resolved
    if config.num_classes is not None:
        raise NMSparseError("--num-classes goes with timm models; a Hugging Face model keeps its own head")
    text = TextSettings(config.data or GENERAL_USE, config.seq_len, config.limit, config.seed, config.prompts, config.out,
                        (NEWS, *config.eval_data))
    check_text_settings(resolved, text)
    teacher = load_model(resolved, torch.bfloat16 if config.use_bf16 else None).to(device)
    plan = plan_prune(resolved, config.recipe.target, config.recipe.include, config.recipe.exclude)
    # the student's own fp32 copy, made only when it starts from the dense model (a --start PATH loads its own)
    fresh = (lambda: load_model(resolved).to(device)) if config.use_bf16 else (lambda: copy.deepcopy(teacher))
    student = student_of(fresh, resolved, config.start, plan, text)
    align_teacher(teacher, config.start)
    task = distill_task(resolved, teacher, config.recipe.distill, text)
    student.train(task.distiller.spec.dropout)  # eval mode switches every kind of dropout off (distill.dropout)
    return task, student, ref, resolved


def run_finetune(config: FinetuneConfig, reporter: Reporter | None = None) -> FinetuneResult:
    reporter = reporter or Reporter()
    env = init_distributed(config.device)
    try:
        return _run(config, reporter, env)
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
    resolved: Resolved  # the source checkpoint: its tensor names, carried tensors and side files shape the output
    plan: PrunePlan  # the target layers (the same ones prune would choose) and the skipped ones
    sparsifier: Sparsifier
    task: Task
    sampler: DistributedSampler | LengthGroupedBatches  # set_epoch before each epoch
    train_loader: DataLoader
    phases: Phases
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_model: torch.nn.Module  # the model, wrapped in DDP when distributed
    autocast: Callable
    probe: GradientFlowProbe | None
    log: MetricsLog | None = None
    one_shot: dict[str, float] | None = None  # quality with the target's magnitude mask, before training
    prepared_at: float = field(default_factory=time.perf_counter)
    train_s: float = 0.0  # seconds spent in training steps (data loading included, evaluations and checkpoints not)

    def evaluate(self) -> dict[str, float]:
        return self.task.evaluate(self.model, self.env, self.autocast)


# torch's optimizers that take fused=True, on CPU as on GPU: one kernel per update instead of a dozen ops per tensor
# (bench/lm_step.py times the step)
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def recipe_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer as the recipe names and configures it, fused where torch has a fused kernel."""
    import timm.optim

    opt_cfg = dict(recipe.optimizer)
    name = opt_cfg.pop("name")
    if timm.optim.get_optimizer_info(name).opt_class in FUSED_OPTIMIZERS:
        opt_cfg["fused"] = True
    return timm.optim.create_optimizer_v2(
        model, opt=name, lr=opt_cfg.pop("lr"), weight_decay=opt_cfg.pop("weight_decay", 0.0), **opt_cfg
    )


def _optimizer_and_scheduler(recipe: Recipe, model: torch.nn.Module, epochs: int, steps_per_epoch: int):  # noqa: ANN202
    """timm's factories, configured by the recipe; the LR schedule advances every step."""
    import timm.scheduler

    optimizer = recipe_optimizer(recipe, model)
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


def _train_loader(
    task: Task, config: FinetuneConfig, env: DistEnv
) -> tuple[DistributedSampler | LengthGroupedBatches, DataLoader]:
    """This rank's share of the training samples, reshuffled each epoch (`set_epoch`); text in batches of
    similar length."""
    order = DistributedSampler(task.train, num_replicas=env.world, rank=env.rank, shuffle=True, seed=config.seed)
    if task.lengths is None:
        return order, DataLoader(task.train, batch_size=config.batch_size, sampler=order, collate_fn=task.collate)
    batches = LengthGroupedBatches(order, task.lengths, config.batch_size, config.seed)
    return batches, DataLoader(task.train, batch_sampler=batches, collate_fn=task.collate)


def _prepare(config: FinetuneConfig, env: DistEnv) -> _Run:
    """Data, model, target layers with the recipe's masks attached, loaders, schedule, optimizer."""
    recipe, target, device = config.recipe, config.recipe.target, env.device
    task, model, ref, resolved = _task(config, device)
    model.to(device)
    plan = training_plan(resolved, target, recipe.include, recipe.exclude, config.start)
    sparsifier = Sparsifier(model, plan.targets, plan.module_patterns()).attach(recipe.lora)
    if config.gradient_checkpointing:
        recompute_activations(model, config.model)
    if config.shard:
        shard_model(task.distiller.teacher)
        shard_model(model)
    sampler, train_loader = _train_loader(task, config, env)
    phases = Phases.from_fractions(config.epochs * len(train_loader), recipe.dense_fraction, recipe.finetune_fraction)
    optimizer, scheduler = _optimizer_and_scheduler(recipe, model, config.epochs, len(train_loader))
    return _Run(
        config, env, device, model, ref, resolved, plan, sparsifier, task, sampler, train_loader,
        phases=phases,
        optimizer=optimizer,
        scheduler=scheduler,
        # a Hugging Face model has parameters its distillation loss may not reach (BERT's pooler)
        train_model=DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=task.kind is not ModelKind.IMAGE_CLASSIFIER,
        ) if env.enabled and not config.shard else model,
        autocast=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if config.use_bf16 else contextlib.nullcontext,
        probe=GradientFlowProbe(sparsifier, target) if config.grad_log_every else None,
    )


def quality_text(quality: dict[str, float], held_out: str | None = None) -> str:
    """`val accuracy 0.9000`; with text domains, each named: `python-help (held out): perplexity 17.1000 | news:
    perplexity 21.3000`, `... cosine 0.9500, cosine min 0.8000, ...`."""
    return by_domain({name: f"{metric_words(name)} {value:.4f}" for name, value in quality.items()}, held_out)


def _begin(run: _Run, reporter: Reporter, state: dict | None) -> tuple[int, int, dict[str, float] | None]:
    """Resume from the run's checkpoint `state`, or start fresh and measure the starting quality.
    Returns (first epoch, first step, start quality or None when resumed or not measured)."""
    config = run.config
    metrics = config.out / METRICS_FILE if run.env.is_main else None
    if state is not None:
        if config.shard:
            scatter_state(run.model, run.optimizer, checkpoint_tensors(config.out) if run.env.is_main else {}, state["optimizer"])
        else:
            load_checkpoint_weights(config.out, run.model)
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
    if not config.measure_start:
        return 0, 0, None
    target = config.recipe.target
    run.sparsifier.set_plan(StepPlan(Phase.DENSE, (target,), 0))
    quality = run.evaluate()
    reporter.message(f"start: {quality_text(quality, run.task.held_out)} ({run.task.description})")
    if config.recipe.method.sparse:
        run.one_shot = _one_shot_quality(run, target, quality)
        reporter.message(f"one-shot {_start_label(config.start)} {target}: {quality_text(run.one_shot, run.task.held_out)} (no training)")
    run.log.write({"event": "start", **quality, **{f"one_shot_{k}": v for k, v in (run.one_shot or {}).items()}, "step": 0})
    return 0, 0, quality


def _one_shot_quality(run: _Run, target: NMPattern, start: dict[str, float]) -> dict[str, float]:
    """The quality with every target layer at its magnitude N:M mask, before any training: the `start` quality
    itself, not measured twice, where those masks zero no weight (a one-shot start, a checkpoint pruned at the
    target already)."""
    run.sparsifier.set_plan(StepPlan(Phase.FINETUNE, (target,), 0))
    quality = start if run.sparsifier.masks_keep_every_weight() else run.evaluate()
    run.sparsifier.set_plan(StepPlan(Phase.DENSE, (target,), 0))
    return quality


def _start_label(start: str | None) -> str:
    """How the student's one-shot N:M weights were made (the one-shot quality is the target mask of the start)."""
    if start is None:
        return "magnitude"
    return start if one_shot_start(start) is not None else f"from {start}"


def _train_epoch(run: _Run, epoch: int, step: int, reporter: Reporter) -> tuple[int, StepPlan | None]:
    """One pass over the training data, the recipe's plan set before every step. Returns (next step, last plan)."""
    config, recipe = run.config, run.config.recipe
    run.sampler.set_epoch(epoch)
    running, plan = 0.0, None
    tick = time.perf_counter()
    for batch in run.train_loader:
        batch = place(batch, run.device)
        plan = plan_step(recipe, recipe.target, run.phases, step)
        run.sparsifier.set_plan(plan)
        run.scheduler.step_update(step)
        measure = run.probe if run.probe is not None and step % config.grad_log_every == 0 else None
        loss, record = train_step(
            run.train_model, batch, run.optimizer, loss_fn=run.task.loss,
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
        run.train_s += time.perf_counter() - tick
        if config.eval_every and step % config.eval_every == 0 and step % len(run.train_loader):  # the epoch's end evaluates anyway
            _evaluate_mid_epoch(run, step, plan, reporter)
        tick = time.perf_counter()
    return step, plan


def _evaluate_mid_epoch(run: _Run, step: int, plan: StepPlan, reporter: Reporter) -> None:
    """--eval-every: held-out quality of the weights as the recipe uses them at this step, with the time so far."""
    quality = run.evaluate()
    elapsed = round(time.perf_counter() - run.prepared_at, 1)
    run.log.write({"event": "eval", "step": step, **quality, "elapsed_s": elapsed, "train_s": round(run.train_s, 3)})
    reporter.message(f"step {step}: {quality_text(quality, run.task.held_out)} ({plan.label()}, {elapsed} s)")


def _end_epoch(run: _Run, epoch: int, step: int, plan: StepPlan | None, reporter: Reporter) -> None:
    """Validate, log, and (main rank) write the training checkpoint that --resume continues from. After the last
    epoch the final evaluation (of the exact N:M weights) follows at once, so the epoch's own is skipped."""
    config = run.config
    last = epoch + 1 == config.epochs
    quality = {} if last else run.evaluate()
    agree = _masks_agree(run.sparsifier, run.env, config.shard)
    elapsed = round(time.perf_counter() - run.prepared_at, 1)
    run.log.write({"event": "epoch", "epoch": epoch, "step": step, **quality, "elapsed_s": elapsed,
                   "train_s": round(run.train_s, 3), "masks_identical_across_ranks": agree})
    done = "trained, evaluating the final weights" if last else quality_text(quality, run.task.held_out)
    reporter.message(f"epoch {epoch + 1}/{config.epochs}: {done} ({plan.label() if plan else ''})")
    if config.shard:  # every rank takes part in gathering the shards
        weights, optimizer = gathered_model_state(run.model), gathered_optimizer_state(run.model, run.optimizer)
    else:
        weights, optimizer = run.model, run.optimizer.state_dict()
    if run.env.is_main:
        save_training_checkpoint(
            config.out, weights,
            {"epoch": epoch + 1, "step": step, "optimizer": optimizer,
             "scheduler": run.scheduler.state_dict(), "masks": run.sparsifier.masks_state(),
             "fingerprint": json.dumps(config.fingerprint(run.env.world), sort_keys=True)},
        )


def _finish(run: _Run, start: dict[str, float] | None, started: float) -> dict[str, Any]:
    """Exact N:M weights, final quality, summary; the main rank writes the outputs."""
    config = run.config
    target = config.recipe.target if config.recipe.method.sparse else None
    base = config.start or config.model
    if config.shard:
        final, weights = finish_sharded(run.model, run.sparsifier, target, run.evaluate, run.env)
        adapter = kept_adapter(run.sparsifier, config.recipe.lora, run.task.kind, base, weights) \
            if config.keep_adapter and run.env.is_main else None
        weights = run.sparsifier.finalized_state(weights, target) if run.env.is_main else {}
    else:
        _check_finite(run.model)
        adapter = kept_adapter(run.sparsifier, config.recipe.lora, run.task.kind, base) \
            if config.keep_adapter else None  # before the merge folds the factors into the weights
        run.sparsifier.finalize(target)
        final = run.evaluate()
        weights = run.model.state_dict()
    wall = round(mean_over_ranks(time.perf_counter() - started, run.env), 2)
    summary = _summary(run, start, final, wall, weights) if weights else {"rank": run.env.rank, "world_size": run.env.world}
    if run.env.is_main:
        _write_outputs(run, summary, weights)
        if adapter is not None:
            write_adapter(config.out / ADAPTER_DIR, *adapter)
    run.log.write({"event": "final", **final, "step": run.phases.total})
    return summary


def _run(config: FinetuneConfig, reporter: Reporter, env: DistEnv) -> FinetuneResult:
    started = time.perf_counter()
    _check_out(config)
    check_lora_settings(config.recipe.name, config.recipe.lora, keep_adapter=config.keep_adapter,
                        grad_log_every=config.grad_log_every, start=config.start, autocast=config.use_bf16,
                        shard=config.shard)
    if config.shard:
        check_shard(env.world, config.grad_log_every)
    if config.use_bf16 and (warning := bf16_warning(env.device)):
        reporter.warn(warning)
    _seed_everything(config.seed)
    state = read_training_state(config.out, config.fingerprint(env.world)) if config.resume else None
    run = _prepare(config, env)
    first_epoch, step, start = _begin(run, reporter, state)
    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, first_epoch + config.stop_after)
    reporter.start(run.phases.total, step, f"{config.recipe.name} {config.recipe.target}")
    for epoch in range(first_epoch, last_epoch):
        step, plan = _train_epoch(run, epoch, step, reporter)
        _end_epoch(run, epoch, step, plan, reporter)
    reporter.finish()
    if last_epoch < config.epochs:
        reporter.message(f"stopped after epoch {last_epoch}; continue with --resume {config.out}")
        return FinetuneResult(config.out, {"stopped_after_epoch": last_epoch})
    return FinetuneResult(config.out, _finish(run, start, started))


def _check_finite(model: torch.nn.Module) -> None:
    """Training that diverged in its last step leaves NaN/Inf weights behind a finite loss: never write them."""
    for name, param in model.named_parameters():
        bad = count_nonfinite(param.detach())
        if bad:
            raise NMSparseError(
                f"{name}: {bad} NaN/Inf weights after training; the run diverged, so no model is written "
                "(lower --lr or the recipe's optimizer.lr)"
            )


def _masks_agree(sparsifier: Sparsifier, env: DistEnv, sharded: bool) -> bool:
    """All ranks hold the same weights, hence the same masks: check a checksum of every layer's mask. Sharded, a
    rank holds a shard of the weight between steps: its frozen masks are compared, the others are made from the
    same gathered weight on every rank."""
    if not env.enabled:  # one process agrees with itself; no need to recompute every mask
        return True
    digest = torch.zeros(len(sparsifier.params), dtype=torch.float64)
    for i, (name, param) in enumerate(sparsifier.params.items()):
        pattern = param.pattern()
        if pattern is not None and (param.frozen is not None or not sharded):
            keep = param.keep_mask(sparsifier.original(name), pattern)
            positions = torch.arange(1, keep.numel() + 1, dtype=torch.float64, device=keep.device)
            digest[i] = float((keep.flatten().double() * positions).sum())
    return all_equal(digest, env)


def _summary(run: _Run, start: dict[str, float] | None, final: dict[str, float], wall: float,
             weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Quality as `start_<metric>` / `final_<metric>` (start is None after a resume), FLOPs, compliance of the
    final `weights` (the model's state), time."""
    config, layers = run.config, run.plan.targets
    recipe, target = config.recipe, config.recipe.target
    total_flops, layer_costs = target_costs(
        run.ref, {layer.module: weights[f"{layer.module}.weight"].shape[layer.layout.k_axis] for layer in layers.values()},
        config.seq_len,
    )
    sparse = recipe.method.sparse
    compliant = {
        name: compliance(weights[f"{layer.module}.weight"].detach(), run.plan.pattern_of(name), layer.layout).compliant
        for name, layer in layers.items()
    } if sparse else {}
    own = run.plan.module_patterns()
    sparse_flops = total_flops - sum(
        f * (1 - own.get(module, target).density) for module, (f, _) in layer_costs.items()) if sparse else total_flops
    return {
        "recipe": recipe.name,
        "method": recipe.method.value,
        "pattern": str(target) if sparse else None,
        "model": run.ref.to_json(),
        "kind": run.task.kind.value,
        "data": run.task.description,
        "held_out": run.task.held_out,  # the domain of the plainly named metrics; the others are named `domain/metric`
        "seed": config.seed,
        "epochs": config.epochs,
        "steps": run.phases.total,
        "world_size": run.env.world,
        **{f"start_{name}": (start or {}).get(name) for name in final},
        **{f"one_shot_{name}": (run.one_shot or {}).get(name) for name in final},
        **{f"final_{name}": value for name, value in final.items()},
        "target_layers": len(layers),
        "skipped_layers": run.plan.skipped,
        "all_layers_compliant": all(compliant.values()) if sparse else None,
        "flops": {"unit": "FLOPs (2 x MACs), one forward at batch 1", "dense": total_flops, "sparse_theoretical": round(sparse_flops)},
        "training_flops_relative_to_dense": relative_training_flops(recipe, target, run.phases, layer_costs, total_flops, own),
        "wall_seconds": wall,
    }


def _output_tensors(run: _Run, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained weights (`state`, the model's) under the source checkpoint's own names: a tied weight once,
    tensors the model does not load (non-persistent buffers, unused heads) carried through unchanged, as prune does."""
    ckpt, match = run.resolved.checkpoint, run.resolved.match
    return {
        name: (state[match.to_model[name]] if name in match.to_model else ckpt.read(name)).detach().contiguous().cpu()
        for name in ckpt.infos
    }


def _write_outputs(run: _Run, summary: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """model.safetensors (with prune's N:M metadata plus the recipe), summary.json, recipe.yaml; for a Hugging Face
    folder also its config, tokenizer and other files, so that `from_pretrained(out)` loads the result."""
    config = run.config
    tensors = _output_tensors(run, state)
    folder = run.resolved.checkpoint.folder
    if folder is not None:
        own = {MODEL_FILE, INDEX_NAME, SUMMARY_FILE, RECIPE_FILE, METRICS_FILE, CHECKPOINT_DIR, ADAPTER_DIR}
        summary["notes"] = copy_side_files(folder, config.out, own)
    if config.recipe.method.sparse:
        meta = run.plan.metadata(run.ref)
        meta.recipe = to_dict(config.recipe)
        strings = meta.to_strings()
    else:
        strings = {MODEL: json.dumps(run.ref.to_json(), sort_keys=True)}
    kept = {k: v for k, v in run.resolved.checkpoint.metadata.items() if not k.startswith("nmsparse.")}
    strings = {"format": "pt", **kept, **strings}  # transformers refuses a safetensors file without "format"
    with atomic_output(config.out / MODEL_FILE, force=True) as tmp:
        save_file(tensors, str(tmp), metadata=strings)
    with atomic_output(config.out / SUMMARY_FILE, force=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_output(config.out / RECIPE_FILE, force=True) as tmp:
        tmp.write_text(config.recipe.to_yaml())
