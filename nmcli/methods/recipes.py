"""Recipe files: schema, strict validation and the built-ins shipped inside the package (`recipes/*.yaml`).

A recipe names the method (methods.md §3), its parameters, the phases (§2), the target layers (§4) and optional
optimizer / LR-schedule / training settings. Unknown keys, wrong types and impossible values are one-line errors
naming the file and the key. YAML is loaded with `yaml.safe_load` only.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nmcli.errors import NMSparseError
from nmcli.nm import NMPattern, parse_pattern


class Method(enum.Enum):
    """A recipe's method (methods.md §3): how the N:M mask is applied while the weights train."""

    DENSE = "dense"
    STE = "ste"
    SR_STE = "sr-ste"
    FIXED_MASK = "fixed-mask"
    MDGF = "mdgf"
    SDGF = "sdgf"
    MDGF_SDGF = "mdgf+sdgf"

    @property
    def sparse(self) -> bool:
        return self is not Method.DENSE

    @property
    def decays_mask(self) -> bool:
        """MDGF: the pruned weights fade out with alpha (methods.md §2)."""
        return self in (Method.MDGF, Method.MDGF_SDGF)

    @property
    def decays_structure(self) -> bool:
        """SDGF: the pattern steps from dense toward the target (methods.md §3)."""
        return self in (Method.SDGF, Method.MDGF_SDGF)

    @property
    def fixed_pattern(self) -> bool:
        """The target pattern acts from the first sparse step (STE, SR-STE, fixed mask): nothing decays."""
        return self in (Method.STE, Method.SR_STE, Method.FIXED_MASK)

    @property
    def takes_sr_ste(self) -> bool:
        """SR-STE's own term, or added to a decay recipe; not for dense / ste / fixed-mask."""
        return self is Method.SR_STE or self.decays_mask or self.decays_structure

    @property
    def trains_adapters(self) -> bool:
        """LoRA's mask comes from the frozen base weights: every sparse method but SR-STE (it pulls the base)."""
        return self.sparse and self is not Method.SR_STE


METHODS = tuple(m.value for m in Method)
ALPHA_SCHEDULES = ("linear", "exponential", "stepped")
STRUCTURE_SCHEDULES = ("stepwise", "geometric", "custom")
BACKWARDS = ("ste", "scaled")
FINETUNE_MASKS = ("recomputed", "frozen")
DEFAULT_SR_STE_LAMBDA = 2e-4
DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05}
DEFAULT_SCHEDULER = {"name": "cosine", "warmup_fraction": 0.05}
DEFAULT_TRAINING = {"epochs": 3, "batch_size": 64}
SCHEDULERS = ("cosine", "tanh", "poly", "step", "multistep")  # timm schedulers driven by step updates alone
MAX_EPOCHS, MAX_BATCH = 100_000, 1_000_000  # beyond these a value is a typo, not a plan
MAX_RECIPE_BYTES = 64 * 1024  # the built-ins are under 1 KB
MAX_PROBLEM_CHARS = 200  # longest problem text in an error message


@dataclass(frozen=True)
class MaskDecay:
    schedule: str = "linear"
    rate: float | None = None  # c per step; or derive it from reach_at
    reach_at: float | None = None  # fraction of the decay phase (or SDGF frame) where alpha hits 0 / 0.01
    interval: int = 1  # stepped: alpha drops by step_size every `interval` steps (the mask is re-derived every step)
    step_size: float | None = None  # stepped: w
    backward: str = "ste"


@dataclass(frozen=True)
class StructureDecay:
    schedule: str = "stepwise"
    stages: tuple[str, ...] = ()  # custom: patterns from least to most sparse (the target is appended if absent)


EMBEDDING_LOSSES = ("cosine", "mse")


@dataclass(frozen=True)
class DistillSpec:
    """Weights of the distillation terms (methods.md §6); None = the default for the model's kind."""

    kl: float | None = None  # logit KL (causal LMs, classifiers)
    ce: float | None = None  # cross-entropy on the data's next tokens (causal LMs)
    squarehead: float | None = None  # per-block normalised hidden-state MSE
    embedding: float | None = None  # mean-pooled embedding distance (encoders)
    temperature: float | None = None
    embedding_loss: str | None = None  # "cosine" | "mse"
    dropout: bool | None = None  # the student keeps the model's dropout while it learns (default: off)


LORA_BASE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class LoraSpec:
    """Mask-preserving LoRA (methods.md §10): W_eff = M * (W + alpha / rank * B A), only A and B trained."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("*",)  # globs over the target layers' module names
    dropout: float = 0.0  # on the adapter's input, in training steps
    train_norms: bool = False  # also train the norms' weights and every bias
    base_dtype: str = "float32"  # the frozen target weights' dtype in training (bfloat16: half their memory; --bf16)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Recipe:
    name: str
    method: Method
    description: str = ""
    pattern: str = "2:4"
    dense_fraction: float = 0.0
    finetune_fraction: float = 0.0
    finetune_mask: str = "recomputed"
    mask_decay: MaskDecay | None = None
    structure_decay: StructureDecay | None = None
    sr_ste_lambda: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    optimizer: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    training: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRAINING))
    distill: DistillSpec | None = None  # Hugging Face models only
    lora: LoraSpec | None = None  # train low-rank adapters on frozen base weights instead of the weights
    source: str = "<built-in>"

    @property
    def target(self) -> NMPattern:
        return parse_pattern(self.pattern)

    def with_overrides(self, **changes: Any) -> Recipe:
        """Command-line overrides (pattern, epochs, lr, ...) applied on top, then validated again."""
        data = to_dict(self)
        for key, value in changes.items():
            if value is None:
                continue
            if key in ("epochs", "batch_size"):
                data.setdefault("training", {})[key] = value
            elif key == "lr":
                data.setdefault("optimizer", {})["lr"] = value
            else:
                data[key] = value
        return from_dict(data, self.source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False)


_TOP_KEYS = {
    "name", "description", "method", "pattern", "phases", "mask_decay", "structure_decay", "sr_ste", "targets",
    "optimizer", "scheduler", "training", "distill", "lora",
}
_SECTION_KEYS = {
    "phases": {"dense", "finetune", "finetune_mask"},
    "mask_decay": {"schedule", "rate", "reach_at", "interval", "step_size", "backward"},
    "structure_decay": {"schedule", "stages"},
    "sr_ste": {"lambda"},
    "targets": {"include", "exclude"},
    "optimizer": {"name", "lr", "weight_decay", "momentum", "betas"},
    "scheduler": {"name", "warmup_fraction", "min_lr"},
    "training": {"epochs", "batch_size", "clip_grad", "bf16"},
    "distill": {"kl", "ce", "squarehead", "embedding", "temperature", "embedding_loss", "dropout"},
    "lora": {"rank", "alpha", "targets", "dropout", "train_norms", "base_dtype"},
}


class _Checker:
    """Type and value checks that name the file and the dotted key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> NMSparseError:
        """The message names the file and key; a huge value is cut, never printed whole."""
        if len(problem) > MAX_PROBLEM_CHARS:
            problem = problem[:MAX_PROBLEM_CHARS] + f"... ({len(problem)} characters)"
        return NMSparseError(f"{self.source}: {key}: {problem}")

    def section(self, data: dict, key: str, allowed: set[str]) -> dict:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for sub in value:
            if sub not in allowed:
                raise self.fail(f"{key}.{sub}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
        return value

    def number(self, value: Any, key: str, low: float | None = None, high: float | None = None, integer: bool = False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise self.fail(key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(key, f"{value!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise self.fail(key, f"{value!r} is outside {bounds}")
        return value

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def choice(self, value: Any, key: str, options: tuple[str, ...]) -> str:
        if value not in options:
            raise self.fail(key, f"{value!r} is not one of {', '.join(options)}")
        return value

    def pattern(self, value: Any, key: str, allow_dense: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f'write patterns as quoted strings, e.g. "2:4" (YAML read {value!r})')
        try:
            return str(parse_pattern(value, allow_dense=allow_dense))
        except NMSparseError as exc:
            raise self.fail(key, str(exc)) from None

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a list of strings, got {value!r}")
        return tuple(value)


def from_dict(data: Any, source: str) -> Recipe:
    c = _Checker(source)
    if not isinstance(data, dict):
        raise NMSparseError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise c.fail(key, f"unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise c.fail("name", "a recipe needs a non-empty name")
    method = Method(c.choice(data.get("method"), "method", METHODS))
    pattern = c.pattern(data.get("pattern", "2:4"), "pattern")
    dense, finetune, finetune_mask = _phases(c, data)
    targets = c.section(data, "targets", _SECTION_KEYS["targets"])
    description = data.get("description", "")
    if not isinstance(description, str):
        raise c.fail("description", "expected a string")
    return Recipe(
        name=name,
        method=method,
        description=description,
        pattern=pattern,
        dense_fraction=dense,
        finetune_fraction=finetune,
        finetune_mask=finetune_mask,
        mask_decay=_mask_decay(c, data, method),
        structure_decay=_structure_decay(c, data, method, pattern),
        sr_ste_lambda=_sr_ste_lambda(c, data, method),
        include=c.strings(targets.get("include"), "targets.include"),
        exclude=c.strings(targets.get("exclude"), "targets.exclude"),
        optimizer=_optimizer(c, data),
        scheduler=_scheduler(c, data),
        training={**DEFAULT_TRAINING, **_training(c, data)},
        distill=_distill(c, data) if "distill" in data else None,
        lora=_lora(c, data, method) if "lora" in data else None,
        source=source,
    )


def _phases(c: _Checker, data: dict) -> tuple[float, float, str]:
    """Fractions of training that stay dense and that fine-tune at the end, and the fine-tuning phase's mask."""
    phases = c.section(data, "phases", _SECTION_KEYS["phases"])
    dense = c.number(phases.get("dense", 0.0), "phases.dense", 0, 1)
    finetune = c.number(phases.get("finetune", 0.0), "phases.finetune", 0, 1)
    if dense + finetune > 1:
        raise c.fail("phases", f"dense ({dense}) + finetune ({finetune}) must be at most 1")
    return dense, finetune, c.choice(phases.get("finetune_mask", "recomputed"), "phases.finetune_mask", FINETUNE_MASKS)


def _mask_decay(c: _Checker, data: dict, method: Method) -> MaskDecay | None:
    """MDGF's decay of the pruned weights (methods.md §2): required by, and only by, the mdgf methods."""
    if "mask_decay" not in data:
        if method.decays_mask:
            raise c.fail("mask_decay", f"method {method.value} needs a mask_decay section (schedule, rate or reach_at)")
        return None
    if not method.decays_mask:
        raise c.fail("mask_decay", f"only MDGF recipes decay the mask, not method {method.value!r}")
    md = c.section(data, "mask_decay", _SECTION_KEYS["mask_decay"])
    schedule = c.choice(md.get("schedule", "linear"), "mask_decay.schedule", ALPHA_SCHEDULES)
    rate = md.get("rate")
    reach_at = md.get("reach_at")
    if schedule == "stepped":
        if md.get("step_size") is None:
            raise c.fail("mask_decay.step_size", "the stepped schedule needs step_size (w in alpha = 1 - k w)")
        for key in ("rate", "reach_at"):
            if md.get(key) is not None:
                raise c.fail(f"mask_decay.{key}", "the stepped schedule takes step_size and interval, not rate or reach_at")
        c.number(md["step_size"], "mask_decay.step_size", 1e-9, 1)
        c.number(md.get("interval", 1), "mask_decay.interval", 1, integer=True)
    elif any(md.get(key) is not None for key in ("step_size", "interval")):
        raise c.fail("mask_decay", f"step_size and interval belong to the stepped schedule, not {schedule}")
    elif (rate is None) == (reach_at is None):
        raise c.fail("mask_decay", "give exactly one of rate (c per step) or reach_at (fraction of the phase)")
    if rate is not None:
        c.number(rate, "mask_decay.rate", 0)
    if reach_at is not None:
        c.number(reach_at, "mask_decay.reach_at", 1e-6, 1)
    return MaskDecay(
        schedule=schedule,
        rate=rate,
        reach_at=reach_at,
        interval=md.get("interval", 1),
        step_size=md.get("step_size"),
        backward=c.choice(md.get("backward", "ste"), "mask_decay.backward", BACKWARDS),
    )


def _structure_decay(c: _Checker, data: dict, method: Method, pattern: str) -> StructureDecay | None:
    """SDGF's stages from dense toward the target pattern (methods.md §3): only for the sdgf methods."""
    if "structure_decay" not in data:
        return StructureDecay() if method.decays_structure else None
    if not method.decays_structure:
        raise c.fail("structure_decay", f"only SDGF recipes decay the structure, not method {method.value!r}")
    sd = c.section(data, "structure_decay", _SECTION_KEYS["structure_decay"])
    schedule = c.choice(sd.get("schedule", "stepwise"), "structure_decay.schedule", STRUCTURE_SCHEDULES)
    stages = c.strings(sd.get("stages"), "structure_decay.stages")
    if (schedule == "custom") != bool(stages):
        raise c.fail("structure_decay.stages", "a list of stages goes with (and only with) schedule: custom")
    stages = tuple(c.pattern(s, f"structure_decay.stages[{i}]", allow_dense=True) for i, s in enumerate(stages))
    densities = [parse_pattern(s, allow_dense=True).density for s in stages] + [parse_pattern(pattern).density]
    if any(later > earlier for earlier, later in zip(densities, densities[1:])):
        raise c.fail(
            "structure_decay.stages",
            f"stages must go from dense toward the target {pattern} (density never rising); got {', '.join(stages)}",
        )
    return StructureDecay(schedule, stages)


def _sr_ste_lambda(c: _Checker, data: dict, method: Method) -> float | None:
    """The SR-STE decay term's weight: sr-ste's own, or added to a decay recipe; not for dense/ste/fixed-mask."""
    if "sr_ste" not in data:
        return DEFAULT_SR_STE_LAMBDA if method is Method.SR_STE else None
    if not method.takes_sr_ste:
        raise c.fail("sr_ste", f"method {method.value} takes no SR-STE term (use method: sr-ste)")
    sr = c.section(data, "sr_ste", _SECTION_KEYS["sr_ste"])
    return c.number(sr.get("lambda", DEFAULT_SR_STE_LAMBDA), "sr_ste.lambda", 0)


def _scheduler(c: _Checker, data: dict) -> dict:
    scheduler = {**DEFAULT_SCHEDULER, **c.section(data, "scheduler", _SECTION_KEYS["scheduler"])}
    c.choice(scheduler["name"], "scheduler.name", SCHEDULERS)
    c.number(scheduler.get("warmup_fraction", 0.0), "scheduler.warmup_fraction", 0, 1)
    c.number(scheduler.get("min_lr", 0.0), "scheduler.min_lr", 0)
    return scheduler


def _training(c: _Checker, data: dict) -> dict:
    training = dict(c.section(data, "training", _SECTION_KEYS["training"]))
    if "epochs" in training:
        c.number(training["epochs"], "training.epochs", 1, MAX_EPOCHS, integer=True)
    if "batch_size" in training:
        c.number(training["batch_size"], "training.batch_size", 1, MAX_BATCH, integer=True)
    if "clip_grad" in training and training["clip_grad"] is not None:
        c.number(training["clip_grad"], "training.clip_grad", 0)
    c.flag(training.get("bf16", False), "training.bf16")
    return training


def _distill(c: _Checker, data: dict) -> DistillSpec:
    """Non-negative weights, at least one of them positive when all are given; a positive temperature."""
    section = c.section(data, "distill", _SECTION_KEYS["distill"])
    weights = {k: c.number(section[k], f"distill.{k}", 0, 1e6) for k in ("kl", "ce", "squarehead", "embedding") if k in section}
    if len(weights) == 4 and not any(weights.values()):
        raise c.fail("distill", "every term has weight 0: nothing would be learned")
    temperature = c.number(section["temperature"], "distill.temperature", 1e-3, 1e3) if "temperature" in section else None
    loss = c.choice(section["embedding_loss"], "distill.embedding_loss", EMBEDDING_LOSSES) if "embedding_loss" in section else None
    dropout = c.flag(section["dropout"], "distill.dropout") if "dropout" in section else None
    return DistillSpec(**weights, temperature=temperature, embedding_loss=loss, dropout=dropout)


def _lora(c: _Checker, data: dict, method: Method) -> LoraSpec:
    """Adapters train on a mask derived from the frozen base weights: no SR-STE pull (it acts on the base)."""
    if not method.trains_adapters:
        able = ", ".join(m.value for m in Method if m.trains_adapters)
        raise c.fail("lora", f"method {method.value} cannot train adapters (one of {able} can: the mask "
                     "comes from the frozen base weights)")
    if "sr_ste" in data:
        raise c.fail("lora", "the SR-STE term pulls pruned base weights, which LoRA freezes; drop sr_ste")
    section = c.section(data, "lora", _SECTION_KEYS["lora"])
    default = LoraSpec()
    rank = c.number(section.get("rank", default.rank), "lora.rank", 1, integer=True)
    alpha = c.number(section.get("alpha", 2 * rank), "lora.alpha", 1e-6, 1e6)
    targets = c.strings(section.get("targets", list(default.targets)), "lora.targets")
    if not targets:
        raise c.fail("lora.targets", "an empty list trains nothing; give globs such as ['*'] or ['*.mlp.*']")
    dropout = c.number(section.get("dropout", default.dropout), "lora.dropout", 0, 0.99)
    train_norms = c.flag(section.get("train_norms", default.train_norms), "lora.train_norms")
    base_dtype = c.choice(section.get("base_dtype", default.base_dtype), "lora.base_dtype", LORA_BASE_DTYPES)
    return LoraSpec(rank, float(alpha), targets, float(dropout), train_norms, base_dtype)


def _optimizer(c: _Checker, data: dict) -> dict[str, Any]:
    """A timm optimizer by name, with finite hyper-parameters in range."""
    import timm.optim

    optimizer = {**DEFAULT_OPTIMIZER, **c.section(data, "optimizer", _SECTION_KEYS["optimizer"])}
    name = optimizer["name"]
    if not isinstance(name, str) or name.lower() not in timm.optim.list_optimizers():
        raise c.fail("optimizer.name", f"{name!r} is not a timm optimizer (e.g. adamw, sgd, lamb)")
    c.number(optimizer["lr"], "optimizer.lr", 0)
    c.number(optimizer.get("weight_decay", 0.0), "optimizer.weight_decay", 0)
    if "momentum" in optimizer:
        c.number(optimizer["momentum"], "optimizer.momentum", 0, 1)
    if "betas" in optimizer:
        betas = optimizer["betas"]
        if not isinstance(betas, list) or len(betas) != 2:
            raise c.fail("optimizer.betas", f"expected two numbers such as [0.9, 0.999], got {betas!r}")
        for i, beta in enumerate(betas):
            c.number(beta, f"optimizer.betas[{i}]", 0, 1)
    return optimizer


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The YAML form of a recipe (what `from_dict` reads back to an equal recipe)."""
    out: dict[str, Any] = {
        "name": recipe.name,
        "description": recipe.description,
        "method": recipe.method.value,
        "pattern": recipe.pattern,
        "phases": {
            "dense": recipe.dense_fraction,
            "finetune": recipe.finetune_fraction,
            "finetune_mask": recipe.finetune_mask,
        },
    }
    if recipe.mask_decay is not None:
        stepped_only = () if recipe.mask_decay.schedule == "stepped" else ("interval", "step_size")
        out["mask_decay"] = {
            k: v for k, v in dataclasses.asdict(recipe.mask_decay).items() if v is not None and k not in stepped_only
        }
    if recipe.structure_decay is not None:
        sd = {"schedule": recipe.structure_decay.schedule}
        if recipe.structure_decay.stages:
            sd["stages"] = list(recipe.structure_decay.stages)
        out["structure_decay"] = sd
    if recipe.sr_ste_lambda is not None:
        out["sr_ste"] = {"lambda": recipe.sr_ste_lambda}
    out["targets"] = {"include": list(recipe.include), "exclude": list(recipe.exclude)}
    out["optimizer"] = dict(recipe.optimizer)
    out["scheduler"] = dict(recipe.scheduler)
    out["training"] = dict(recipe.training)
    if recipe.distill is not None:
        out["distill"] = {k: v for k, v in dataclasses.asdict(recipe.distill).items() if v is not None}
    if recipe.lora is not None:
        out["lora"] = {**dataclasses.asdict(recipe.lora), "targets": list(recipe.lora.targets)}
    return out


def builtin_names() -> list[str]:
    files = resources.files("nmcli.builtin_recipes").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml"))


def _load_text(raw: bytes, source: str) -> Recipe:
    """Safe YAML with no anchors or aliases: a recipe has no use for them, and a few hundred bytes of nested
    aliases expand to gigabytes (an "alias bomb"). Checked on the event stream, before anything is built."""
    if len(raw) > MAX_RECIPE_BYTES:
        raise NMSparseError(f"{source}: {len(raw)} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NMSparseError(f"{source}: not a text file (a recipe is UTF-8 YAML)") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise NMSparseError(
                    f"{source}: line {mark.line + 1}: YAML anchors and aliases (&, *) are not allowed in recipes; "
                    "write the values out"
                )
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise NMSparseError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return from_dict(data, source)


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise NMSparseError(f"{path}: recipe file not found")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise NMSparseError(f"{path}: cannot read the recipe ({exc.strerror})") from None
        return _load_text(raw, str(path))
    if name_or_path not in builtin_names():
        raise NMSparseError(
            f"unknown recipe {name_or_path!r}; built-ins: {', '.join(builtin_names())} (or give a .yaml path)"
        )
    raw = resources.files("nmcli.builtin_recipes").joinpath(f"{name_or_path}.yaml").read_bytes()
    return _load_text(raw, f"recipes/{name_or_path}.yaml")
