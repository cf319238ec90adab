"""What a fine-tuning run learns from and how it measures quality: one Task per model kind.

- ImageTask (timm classifiers): cross-entropy on labelled images, validation accuracy.
- DistillTask (Hugging Face transformers): the loss of train/distill.py against the frozen dense teacher on text
  samples, held-out quality from nmcli/quality (perplexity, or embedding agreement with the teacher).
The engine only calls `loss`, `evaluate` and the data attributes, so one loop serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from nmcli.models.resolve import Resolved, load_model, resolve
from nmcli.data.images import load_data
from nmcli.data.teacher import read_prompts, teacher_count, teacher_samples
from nmcli.data.mixture import GENERAL_USE, Share, parse_mixture
from nmcli.data.text import NEWS, PYTHON_HELP, load_eval_texts, load_texts
from nmcli.data.tokens import check_tokenizer_files, load_tokenizer
from nmcli.data.writer import PROMPTS as WRITER_PROMPTS
from nmcli.data.writer import WriterSpec, decoded_documents, writer_spec
from nmcli.errors import NMSparseError
from nmcli.quality.measures import accuracy
from nmcli.quality.suite import QualitySuite
from nmcli.quality.text_data import check_seq_len, text_data, training_samples
from nmcli.models.architecture import ModelKind, ModelRef, build_model, data_config, model_kind
from nmcli.models.channels import reorder_residual
from nmcli.oneshot.calibrate import OneShotMethod, SolverSettings, calibrate_and_prune, one_shot_start
from nmcli.oneshot.service import CalibrationSettings, calibration_batches
from nmcli.nm import NMPattern
from nmcli.oneshot.budget import KEPT_DENSE
from nmcli.oneshot.plan import PrunePlan, declared_plan, plan_prune, prune_model_
from nmcli.train.distill import Distiller, resolve_spec
from nmcli.train.distributed import DistEnv, shard


class Task(Protocol):
    kind: ModelKind
    train: Dataset
    collate: Callable | None
    description: str
    lengths: list[int] | None  # each training sample's length, to batch similar lengths together; None: any order
    held_out: str | None  # the domain of the plainly named metrics (the training text's held-out part); None: images

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self, model: nn.Module, env: DistEnv, autocast: Callable) -> dict[str, float]: ...


def limit_samples(dataset: Dataset, limit: int | None) -> Dataset:
    """A fixed random subset (the same for every seed): folders and files are often sorted by class or topic."""
    if not limit or limit >= len(dataset):
        return dataset
    pick = torch.Generator().manual_seed(0)
    return Subset(dataset, torch.randperm(len(dataset), generator=pick)[:limit].tolist())


@dataclass
class ImageTask:
    train: Dataset
    val: Dataset
    description: str
    kind: ModelKind = ModelKind.IMAGE_CLASSIFIER
    collate: Callable | None = None
    lengths: None = None  # images are all one size
    held_out: None = None  # accuracy on the data's validation split: one domain

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        return F.cross_entropy(model(images), labels), {}

    def evaluate(self, model: nn.Module, env: DistEnv, autocast: Callable) -> dict[str, float]:
        return {"val_accuracy": accuracy(model, DataLoader(shard(self.val, env), batch_size=256), env, autocast)}


@dataclass
class DistillTask:
    kind: ModelKind
    train: Dataset
    quality: QualitySuite
    distiller: Distiller
    collate: Callable
    description: str
    lengths: list[int]  # tokens per training sample: batches group similar lengths (padding is wasted compute)

    @property
    def held_out(self) -> str:
        return self.quality.domains[0]

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.distiller(model, batch)

    def evaluate(self, model: nn.Module, env: DistEnv, autocast: Callable) -> dict[str, float]:
        return self.quality(model, autocast)  # every rank scores the whole held-out set: each sample once


def image_task(resolved: Resolved, ref: ModelRef, model: nn.Module, data: str, limit: int | None) -> ImageTask:
    splits = load_data(data, data_config(model, ref))
    if model.num_classes != splits.num_classes:
        raise NMSparseError(
            f"the model's head has {model.num_classes} outputs but --data {data} has {splits.num_classes} "
            f"classes; pass --num-classes {splits.num_classes} to re-initialise the head"
        )
    train, val = limit_samples(splits.train, limit), limit_samples(splits.val, limit)
    limited = f", limited to {len(train)} / {len(val)}" if limit else ""
    return ImageTask(train, val, splits.description + limited)


def _from_checkpoint(start: str | None) -> bool:
    """`--start PATH`: an N:M checkpoint on disk (not none, not a one-shot method pruned in memory)."""
    return start is not None and one_shot_start(start) is None


def student_of(fresh: Callable[[], nn.Module], resolved: Resolved, start: str | None, plan: PrunePlan,
               text: TextSettings) -> nn.Module:
    """The student's starting weights: `fresh()`, a dense copy of its own; pruned one-shot by `--start magnitude|
    wanda|sparsegpt|alps` (calibrated on the training text); or an N:M checkpoint of the same architecture (`--start
    PATH`, loaded alone: no dense copy is made for it)."""
    method = one_shot_start(start)
    if not _from_checkpoint(start):
        student = fresh()
        if method is OneShotMethod.MAGNITUDE:
            prune_model_(student, plan)
        elif method is not None:
            # generated text: calibrate on real text of general use (calibrated on one domain, the start is far
            # worse on the others: README's benchmark section)
            written = teacher_count(text.data) or writer_spec(text.data)
            calib = CalibrationSettings(GENERAL_USE if written else text.data, seed=text.seed, seq_len=text.seq_len)
            by_module = {layer.module: layer for layer in plan.targets.values()}
            calibrate_and_prune(student, by_module, calibration_batches(resolved, student, calib),
                                SolverSettings(method, plan.pattern))
        return student
    started = resolve(start)
    if started.model is None or started.model.name != resolved.model.name:
        raise NMSparseError(
            f"--start {start}: a checkpoint of {resolved.model.name} is needed (it holds "
            f"{started.model.name if started.model else 'an unknown architecture'})"
        )
    student = load_model(started)
    _check_same_shapes(start, student, resolved)
    return student


def training_plan(resolved: Resolved, target: NMPattern, include: tuple[str, ...], exclude: tuple[str, ...],
                  start: str | None) -> PrunePlan:
    """The target layers of a run at the recipe's pattern; from a `--start` pruned with per-layer patterns (prune
    --budget) each layer keeps the pattern the start declares for it, whatever the recipe's, and the layers it left
    dense stay dense."""
    plan = plan_prune(resolved, target, include, exclude)
    if not _from_checkpoint(start):
        return plan
    declared = declared_plan(resolve(start))
    budgeted = {n: why for n, why in (declared.skipped if declared else {}).items() if why.startswith(KEPT_DENSE)}
    if declared is None or not (declared.own or budgeted):
        return plan
    for name in list(plan.targets):
        if name in budgeted:
            plan.skipped[name] = budgeted[name]
            del plan.targets[name]
        elif name in declared.targets and declared.pattern_of(name) != target:
            plan.own[name] = declared.pattern_of(name)
    return plan


def align_teacher(teacher: nn.Module, start: str | None) -> None:
    """A `--start` checkpoint pruned with `prune --permute` may hold the residual stream in another order: the
    teacher takes the same order (its logits do not change), so that hidden-state terms compare like with like."""
    if not _from_checkpoint(start):
        return
    declared = resolve(start).declared
    order = ((declared.oneshot or {}).get("permutation") or {}).get("residual_order") if declared else None
    if order is not None:
        reorder_residual(teacher, order)


def _check_same_shapes(start: str, student: nn.Module, resolved: Resolved) -> None:
    """A start of the same class but another size (layers, widths) is refused, naming the first difference; the
    model's shapes come from its architecture on the meta device (no weights)."""
    shapes = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    for name, tensor in build_model(resolved.model, device="meta").state_dict().items():
        if shapes.get(name) != tuple(tensor.shape):
            found = "missing" if name not in shapes else f"of shape {list(shapes[name])}"
            raise NMSparseError(f"--start {start}: {name} is {found}, the model's is {list(tensor.shape)}; the start must "
                                "be a checkpoint of this model (the same config), e.g. its `nmsparse prune` output")


@dataclass(frozen=True)
class TextSettings:
    data: str
    seq_len: int
    limit: int | None
    seed: int
    prompts: Path | None  # teacher:N prompts, one per line (None: the built-in list)
    cache: Path  # where teacher-written data is kept (the run's folder)
    eval_specs: tuple[str, ...] = (NEWS,)  # held-out sets besides the data's own: the built-in news, --eval-data


def _checkpoint_id(resolved: Resolved) -> str:
    """Names the teacher's weights for the generated-data cache: its files, sizes and modification times."""
    folder = resolved.checkpoint.folder
    files = sorted(resolved.checkpoint.shards) if folder is not None else []
    stats = [(name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns) for name in files]
    return f"{resolved.checkpoint.where}:{stats}"


def _teacher_written(resolved: Resolved, teacher: nn.Module, count: int, text: TextSettings):
    """Training samples the dense causal LM writes itself; held-out quality stays on real text (python-help)."""
    texts = text_data(ModelKind.CAUSAL_LM, resolved.checkpoint.folder, PYTHON_HELP, text.seq_len, teacher, with_train=False,
                      eval_specs=text.eval_specs)
    tokenizer = load_tokenizer(resolved.checkpoint.folder)
    made = teacher_samples(teacher, tokenizer, _checkpoint_id(resolved), count, text.seq_len, text.seed,
                           read_prompts(text.prompts), text.cache)
    how = f"generated in {made.seconds} s" if made.seconds else "read from the cache"
    description = f"teacher-written: {count} sequences of {text.seq_len} tokens ({how}, {made.cache}); quality on {texts.quality.description}"
    return made.samples, texts, description


def _writer_written(resolved: Resolved, teacher: nn.Module, writer: WriterSpec, text: TextSettings):
    """Training text a causal LM writes for this student, of any kind; held-out quality stays on real text."""
    kind = model_kind(resolved.model)
    texts = text_data(kind, resolved.checkpoint.folder, PYTHON_HELP, text.seq_len, teacher, with_train=False,
                      eval_specs=text.eval_specs)
    source = resolve(str(writer.folder))
    writer_tokenizer = load_tokenizer(writer.folder)
    model = load_model(source).to(next(teacher.parameters()).device)
    prompts = read_prompts(text.prompts) if text.prompts is not None else WRITER_PROMPTS
    made = teacher_samples(model, writer_tokenizer, _checkpoint_id(source), writer.count, text.seq_len, text.seed,
                           prompts, text.cache)
    del model
    documents = decoded_documents(writer_tokenizer, made.samples.ids)
    samples = training_samples(kind, load_tokenizer(resolved.checkpoint.folder), documents, text.seq_len,
                               f"--data writer:{writer.folder}:{writer.count}")
    how = f"generated in {made.seconds} s" if made.seconds else "read from the cache"
    description = (f"written by {writer.folder}: {writer.count} texts of {text.seq_len} of its tokens ({how}, {made.cache}), "
                   f"{len(samples)} training samples; quality on {texts.quality.description}")
    return samples, texts, description


def _check_writer(writer: WriterSpec, seq_len: int) -> None:
    source = resolve(str(writer.folder))
    if source.model is None or model_kind(source.model) is not ModelKind.CAUSAL_LM:
        what = model_kind(source.model).value if source.model else "not a model nmsparse knows"
        raise NMSparseError(f"--data writer:{writer.folder}:{writer.count}: the writer ({what}) is not a causal LM; give "
                            "a Hugging Face ...ForCausalLM folder, e.g. SmolLM2")
    check_seq_len(source, seq_len)
    check_tokenizer_files(writer.folder)


def check_text_settings(resolved: Resolved, text: TextSettings) -> None:
    """Bad text input is reported before any model is loaded: the data spec, teacher:N on a model that cannot
    write, a writer that is not a causal LM, --seq-len beyond the model's positions, a folder without a tokenizer."""
    kind = model_kind(resolved.model)
    count = teacher_count(text.data)
    writer = writer_spec(text.data)
    if count is not None and kind is not ModelKind.CAUSAL_LM:
        raise NMSparseError(f"--data teacher:{count}: only a causal LM can write its own training text (this model: {kind.value})")
    if writer is not None:
        _check_writer(writer, text.seq_len)
    elif count is None:
        for share in parse_mixture(text.data) or [Share(text.data, 1.0)]:
            if share.source == NEWS:
                raise NMSparseError(f"--data {text.data}: '{NEWS}' is the built-in general-domain evaluation set, scored "
                                    "as never trained on; train on wiki, python-help or your own text")
            load_texts(share.source)
    for spec in text.eval_specs:
        load_eval_texts(spec)
    check_seq_len(resolved, text.seq_len)
    check_tokenizer_files(resolved.checkpoint.folder)


def distill_task(resolved: Resolved, teacher: nn.Module, recipe_spec: Any, text: TextSettings) -> DistillTask:
    kind = model_kind(resolved.model)
    spec = resolve_spec(recipe_spec, kind)
    if not any((spec.kl, spec.ce, spec.squarehead, spec.embedding)):
        raise NMSparseError(f"the recipe's distill section leaves every loss term at 0 for a {kind.value}")
    count, writer = teacher_count(text.data), writer_spec(text.data)
    if count is not None:
        samples, texts, description = _teacher_written(resolved, teacher, count, text)
    elif writer is not None:
        samples, texts, description = _writer_written(resolved, teacher, writer, text)
    else:
        texts = text_data(kind, resolved.checkpoint.folder, text.data, text.seq_len, teacher, eval_specs=text.eval_specs,
                          seed=text.seed)
        samples, description = texts.train, texts.quality.description
    train = limit_samples(samples, text.limit)
    limited = f"; training limited to {len(train)} samples" if text.limit else ""
    return DistillTask(kind, train, texts.quality, Distiller(teacher, kind, spec), texts.collate, description + limited,
                       [len(train[i]) for i in range(len(train))])
