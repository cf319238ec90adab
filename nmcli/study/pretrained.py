"""The recipe study on a real pretrained Hugging Face model: which recipe recovers it best at each N:M pattern.

Every arm starts from the same pretrained checkpoint, so seeds vary only the data order and sampling, and the
comparison is paired seed by seed. STE, SR-STE and the gradient-flow recipes train from the dense weights (their masks
come from the weights as they train); fixed-mask starts from a one-shot mask: magnitude, and SparseGPT made once per
pattern (the same start for every seed). Two equal budgets: the same steps for every arm, and the same training FLOPs
(methods §5) as SR-STE's at those steps, by giving the arms that train denser proportionally fewer steps.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nmcli.models.resolve import Resolved, resolve
from nmcli.data.teacher import teacher_count
from nmcli.data.mixture import parse_mixture
from nmcli.data.text import PYTHON_HELP, load_texts
from nmcli.data.tokens import load_tokenizer
from nmcli.errors import NMSparseError
from nmcli.quality.text_data import training_samples
from nmcli.io.atomic import write_text_atomic
from nmcli.methods.plan import relative_training_flops
from nmcli.models.architecture import ModelKind, model_kind
from nmcli.nm import parse_pattern
from nmcli.oneshot.plan import plan_prune
from nmcli.methods.recipes import Recipe, load_recipe
from nmcli.report.flops import target_costs
from nmcli.methods.schedules import Phases
from nmcli.study.pool import map_runs, terminated_cleanly
from nmcli.study.pretrained_page import write_page
from nmcli.train.engine import FinetuneConfig, Reporter, run_finetune

RECIPES = ("ste", "sr-ste", "fixed-mask", "mdgf-exponential", "sdgf-geometric", "mdgf-sdgf")
PATTERNS = ("2:4", "1:4", "1:8")
REFERENCE = "sr-ste"  # the equal-FLOPs budget is SR-STE's FLOPs at the equal-steps budget
FLOPS_TOLERANCE = 0.02  # arms within 2% of the reference's FLOPs reuse their equal-steps runs
QUALITY_KEYS = ("final_cosine", "final_perplexity", "final_label_agreement", "final_news/cosine", "final_news/perplexity",
                "final_news/label_agreement")  # what the progress lines show: the training text's held-out part, news
PROGRESS_FILE = "runs.jsonl"  # finished runs of an unfinished study, so that running it again resumes


class Start(enum.Enum):
    DENSE = "dense"  # the pretrained weights; the recipe derives its masks from them as it trains
    MAGNITUDE = "magnitude"
    SPARSEGPT = "sparsegpt"  # one SparseGPT checkpoint per pattern, made before any run


class Budget(enum.Enum):
    STEPS = "steps"
    FLOPS = "flops"


@dataclass(frozen=True)
class Arm:
    recipe: str
    start: Start

    @property
    def label(self) -> str:
        return self.recipe if self.start is not Start.SPARSEGPT else f"{self.recipe} (sparsegpt start)"


@dataclass(frozen=True)
class StudyBudget:
    """Training steps per equal-steps run, given directly (`150`) or as minutes of SR-STE training (`20min`)."""

    steps: int | None = None
    minutes: float | None = None

    @classmethod
    def parse(cls, text: str) -> StudyBudget:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(min)?\s*", text)
        if not found or float(found.group(1)) <= 0 or (not found.group(2) and "." in found.group(1)):
            raise NMSparseError(f"--budget {text!r}: give training steps per run (150) or minutes per run (20min)")
        return cls(minutes=float(found.group(1))) if found.group(2) else cls(steps=int(found.group(1)))


@dataclass
class PretrainedStudySettings:
    model: str  # a Hugging Face folder
    out: Path
    budget: StudyBudget = field(default_factory=lambda: StudyBudget(steps=100))
    data: str | None = None  # None: the built-in python-help text
    patterns: tuple[str, ...] = PATTERNS
    recipes: tuple[str, ...] = RECIPES
    seeds: int = 3
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-4
    sparsegpt_start: bool = True  # fixed-mask also from a SparseGPT start
    calib_samples: int = 128
    jobs: int = 2


def arms(settings: PretrainedStudySettings) -> list[Arm]:
    out = []
    for recipe in settings.recipes:
        if recipe == "fixed-mask":
            out.append(Arm(recipe, Start.MAGNITUDE))
            if settings.sparsegpt_start:
                out.append(Arm(recipe, Start.SPARSEGPT))
        else:
            out.append(Arm(recipe, Start.DENSE))
    return out


def check_settings(settings: PretrainedStudySettings) -> tuple[Resolved, ModelKind, int]:
    """Bad input before any run: the model, recipes, patterns and data. Returns (the model, its kind, training
    samples)."""
    resolved = resolve(settings.model)
    if resolved.model is None or resolved.model.source != "hf" or resolved.checkpoint.folder is None:
        raise NMSparseError(f"--model {settings.model}: the pretrained study takes a Hugging Face folder "
                            "(run `nmsparse study` without --model for the MNIST study)")
    if "dense" in settings.recipes:
        raise NMSparseError("--recipes: `dense` is the teacher here, not an arm; leave it out")
    for recipe in settings.recipes:
        load_recipe(recipe)
    for pattern in settings.patterns:
        parse_pattern(pattern)
    kind = model_kind(resolved.model)
    data = settings.data or PYTHON_HELP
    count = teacher_count(data)
    if count is not None:
        return resolved, kind, count
    tokenizer = load_tokenizer(resolved.checkpoint.folder)
    if parse_mixture(data):
        raise NMSparseError(f"--data {data}: the study trains on one source; mixtures go with nmsparse finetune")
    return resolved, kind, len(training_samples(kind, tokenizer, load_texts(data).train, settings.seq_len, f"--data {data}"))


def _config(settings: PretrainedStudySettings, arm: Arm, pattern: str, seed: int, steps: int, budget: Budget,
            starts: dict[str, Path], work: Path) -> FinetuneConfig:
    recipe = load_recipe(arm.recipe).with_overrides(pattern=pattern, epochs=1, lr=settings.lr, batch_size=settings.batch_size)
    start = str(starts[pattern]) if arm.start is Start.SPARSEGPT else (None if arm.start is Start.DENSE else arm.start.value)
    name = f"{arm.label}-{pattern}-{seed}-{budget.value}".replace(" ", "_").replace(":", "of").replace("(", "").replace(")", "")
    return FinetuneConfig(model=settings.model, recipe=recipe, out=work / name, data=settings.data or PYTHON_HELP,
                          seed=seed, limit=steps * settings.batch_size, seq_len=settings.seq_len, start=start, force=True,
                          measure_start=seed == 0)


class _StepClock(Reporter):
    def __init__(self) -> None:
        self.times: list[float] = []

    def step(self, step: int, values: dict[str, Any]) -> None:
        self.times.append(time.perf_counter())


def _seconds_per_step(config: FinetuneConfig) -> dict[str, float]:
    """Median wall time of one training step on one thread (evaluation not included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = _StepClock()
    try:
        run_finetune(config, clock)
    finally:
        torch.set_num_threads(threads)
    return {"seconds_per_step": statistics.median(b - a for a, b in zip(clock.times, clock.times[1:]))}


def _steps(settings: PretrainedStudySettings, available: int, work: Path, progress: Progress,
           say: Callable[[str], None]) -> tuple[int, float | None]:
    """Steps per equal-steps run (and the measured seconds per step for a minutes budget); a resumed study keeps the
    count it started with."""
    per_step = progress.seconds_per_step
    steps = progress.steps or settings.budget.steps
    if steps is None:
        probe = _config(settings, Arm(REFERENCE, Start.DENSE), settings.patterns[0], 0, 6, Budget.STEPS, {}, work)
        probe = replace(probe, out=work / "probe", measure_start=False)
        per_step = map_runs(1, [probe], lambda c, r: None, _seconds_per_step)[0]["seconds_per_step"]
        shutil.rmtree(probe.out, ignore_errors=True)
        steps = max(1, int(settings.budget.minutes * 60 / per_step))
        say(f"{REFERENCE} trains at {per_step:.2f} s per step on one thread: {settings.budget.minutes:g} min is {steps} steps")
    if steps * settings.batch_size > available:
        raise NMSparseError(
            f"--budget: {steps} steps x batch {settings.batch_size} needs {steps * settings.batch_size} training samples; "
            f"the data has {available} (one pass, no repeats): lower --budget or --batch-size, or pass more --data"
        )
    return steps, per_step


def _sparsegpt_starts(settings: PretrainedStudySettings, resolved: Resolved, work: Path,
                      say: Callable[[str], None]) -> dict[str, Path]:
    """One SparseGPT checkpoint per pattern, calibrated once (seed 0) on the study's data."""
    from nmcli.oneshot.calibrate import OneShotMethod, SolverSettings
    from nmcli.oneshot.service import CalibrationSettings, oneshot_prune

    starts = {}
    for pattern in settings.patterns:
        began = time.perf_counter()
        plan = plan_prune(resolved, parse_pattern(pattern))
        calib = CalibrationSettings(settings.data if teacher_count(settings.data or "") is None else None,
                                    settings.calib_samples, settings.seq_len, seed=0)
        starts[pattern] = work / f"sparsegpt-{pattern.replace(':', 'of')}"
        oneshot_prune(resolved, plan, starts[pattern], SolverSettings(OneShotMethod.SPARSEGPT, plan.pattern), calib)
        say(f"SparseGPT {pattern} start: {time.perf_counter() - began:.0f} s")
    return starts


def _record(config: FinetuneConfig, arm: Arm, budget: Budget, result: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in result.items() if k.startswith(("final_", "one_shot_", "start_")) and v is not None}
    return {"arm": arm.label, "recipe": arm.recipe, "start": arm.start.value, "pattern": config.recipe.pattern,
            "seed": config.seed, "budget": budget.value, "steps": result["steps"],
            "training_flops_relative_to_dense": result["training_flops_relative_to_dense"],
            "wall_seconds": result["wall_seconds"], "all_layers_compliant": result["all_layers_compliant"], **metrics}


def _flops_steps(settings: PretrainedStudySettings, resolved: Resolved, steps: int, available: int,
                 chosen: list[Arm]) -> dict[tuple[Arm, str], int]:
    """Per (arm, pattern) whose training FLOPs at `steps` differ from the reference's by more than the tolerance: the
    step count whose FLOPs (methods §5, the same account the runs report) come closest to the reference's."""
    plans = {pattern: plan_prune(resolved, parse_pattern(pattern)) for pattern in settings.patterns}
    k_lengths = {layer.module: resolved.checkpoint.infos[name].shape[layer.layout.k_axis]
                 for plan in plans.values() for name, layer in plan.targets.items()}
    total, every_cost = target_costs(resolved.model, k_lengths, settings.seq_len)  # one FLOP count for all patterns
    out = {}
    for pattern, plan in plans.items():
        costs = {layer.module: every_cost[layer.module] for layer in plan.targets.values()}

        def spent(recipe: Recipe, n: int) -> float:
            phases = Phases.from_fractions(n, recipe.dense_fraction, recipe.finetune_fraction)
            return n * relative_training_flops(recipe, recipe.target, phases, costs, total)

        budget = spent(load_recipe(REFERENCE).with_overrides(pattern=pattern), steps)
        for arm in chosen:
            recipe = load_recipe(arm.recipe).with_overrides(pattern=pattern)
            if abs(spent(recipe, steps) / budget - 1) > FLOPS_TOLERANCE:
                out[(arm, pattern)] = min(range(1, available // settings.batch_size + 1),
                                          key=lambda n, recipe=recipe: abs(spent(recipe, n) - budget))
    return out


def _settings_json(settings: PretrainedStudySettings) -> dict[str, Any]:
    """The settings as JSON reads them back (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(asdict(settings), default=str))


def _identity(settings: PretrainedStudySettings) -> dict[str, Any]:
    """What decides a study's runs (not where it writes, nor how many run at a time)."""
    return {k: v for k, v in _settings_json(settings).items() if k not in ("out", "jobs")}


@dataclass
class Progress:
    """The finished runs of this study so far, one JSON line each after a header naming the settings and the step
    count (a minutes budget is converted once): an interrupted study (a crash, Ctrl-C, a full disk) run again with
    the same settings continues where it stopped instead of starting over."""

    path: Path
    steps: int | None = None
    seconds_per_step: float | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, settings: PretrainedStudySettings) -> Progress:
        path = settings.out / PROGRESS_FILE
        try:
            header, *lines = path.read_text().splitlines()
            head = json.loads(header)
            if head.get("settings") != _identity(settings):
                return cls(path)
            return cls(path, head["steps"], head["seconds_per_step"], [json.loads(line) for line in lines if line.strip()])
        except (OSError, ValueError, KeyError):  # none, or not ours / damaged: start over
            return cls(path)

    def begin(self, settings: PretrainedStudySettings, steps: int, seconds_per_step: float | None) -> None:
        self.steps, self.seconds_per_step = steps, seconds_per_step
        if not self.records:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            head = {"settings": _identity(settings), "steps": steps, "seconds_per_step": seconds_per_step}
            write_text_atomic(self.path, json.dumps(head) + "\n")

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def has(self, arm: Arm, pattern: str, seed: int, budget: Budget) -> bool:
        return any((r["arm"], r["pattern"], r["seed"], r["budget"]) == (arm.label, pattern, seed, budget.value)
                   for r in self.records)


def _train(settings: PretrainedStudySettings, configs: list[tuple[FinetuneConfig, Arm, Budget]], progress: Progress,
           say: Callable[[str], None]) -> None:
    """Every config's run, each recorded in `progress` as it finishes; its folder (model, training checkpoint:
    about 2 GB for a 135 M-parameter model) is removed once recorded."""
    count = [0]
    what = {id(config): (arm, budget) for config, arm, budget in configs}

    def done(config: FinetuneConfig, result: dict) -> None:
        count[0] += 1
        arm, budget = what[id(config)]
        progress.add(_record(config, arm, budget, result))
        shutil.rmtree(config.out, ignore_errors=True)
        quality = ", ".join(f"{k[6:]} {v:.4f}" for k, v in progress.records[-1].items() if k in QUALITY_KEYS)
        say(f"  [{count[0]}/{len(configs)}] {arm.label} {config.recipe.pattern} seed {config.seed} ({budget.value}, "
            f"{result['steps']} steps): {quality}")

    map_runs(settings.jobs, [c for c, _, _ in configs], done)


def run_pretrained_study(settings: PretrainedStudySettings, say: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    resolved, kind, available = check_settings(settings)
    progress = Progress.read(settings)
    resumed = len(progress.records)
    with terminated_cleanly(), tempfile.TemporaryDirectory(prefix="nmsparse-study-") as tmp:
        work = Path(tmp)
        steps, per_step = _steps(settings, available, work, progress, say)
        progress.begin(settings, steps, per_step)
        chosen = arms(settings)
        scaled = _flops_steps(settings, resolved, steps, available, chosen)
        planned = [(arm, pattern, seed, steps, Budget.STEPS)
                   for seed in range(settings.seeds) for pattern in settings.patterns for arm in chosen]
        planned += [(arm, pattern, seed, n, Budget.FLOPS) for seed in range(settings.seeds) for (arm, pattern), n in scaled.items()]
        todo = [(arm, pattern, seed, n, budget) for arm, pattern, seed, n, budget in planned
                if not progress.has(arm, pattern, seed, budget)]
        if resumed:
            say(f"resuming {settings.out / PROGRESS_FILE}: {resumed} of {len(planned)} runs already done")
        needs_sparsegpt = any(arm.start is Start.SPARSEGPT for arm, *_ in todo)
        starts = _sparsegpt_starts(settings, resolved, work, say) if needs_sparsegpt else {}
        configs = [(_config(settings, arm, pattern, seed, n, budget, starts, work), arm, budget)
                   for arm, pattern, seed, n, budget in todo]
        say(f"{len(configs)} runs: every arm {steps} steps; {len(scaled)} arm/pattern pairs also at {REFERENCE}'s "
            f"training FLOPs ({', '.join(f'{a.label} {p}: {n} steps' for (a, p), n in scaled.items()) or 'none'}); "
            f"{settings.jobs} at a time")
        _train(settings, configs, progress, say)
    data = {
        "settings": {**_settings_json(settings), "steps": steps, "seconds_per_step": per_step, "kind": kind.value, "training_samples": available},
        "runs": progress.records,
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "resumed_runs": resumed,
    }
    write_text_atomic(settings.out / "results.json", json.dumps(data, indent=1) + "\n")
    write_page(data, settings.out)
    progress.path.unlink()
    return data
