"""Quality of a model, not just its compliance (methods.md §6).

- causal LMs: perplexity exp(mean next-token NLL) on held-out chunks (no special tokens added);
- encoders / sentence embedders: mean and minimum cosine between the student's and the dense teacher's mean-pooled
  embeddings of held-out paragraphs and of held-out single sentences, and the Spearman correlation of the two
  pairwise-similarity matrices (does the student keep the teacher's neighbour ranking?);
- sequence classifiers: agreement of the predicted label with the teacher's;
- image classifiers: accuracy.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nmcli.models.resolve import Resolved, load_model, resolve
from nmcli.data.images import MNIST5K, load_data
from nmcli.data.text import PYTHON_HELP, load_texts
from nmcli.data.tokens import PadCollate, TokenSamples, encoder_samples, encoder_texts, lm_chunks, load_tokenizer
from nmcli.device import model_device, place
from nmcli.errors import NMSparseError
from nmcli.models.architecture import ModelKind, data_config, model_kind
from nmcli.train.distill import mean_pool
from nmcli.train.distributed import DistEnv, sum_over_ranks

MAX_EVAL_SAMPLES = 256  # per held-out set of an encoder: enough for a stable mean, small enough for every epoch
MAX_EVAL_CHUNKS = 64  # held-out LM chunks (64 x 128 tokens = 8 K tokens by default)
EVAL_BATCH = 32
LM_EVAL_BATCH = 4  # logits are batch x tokens x vocab floats: 32 x 256 x 49152 would be 1.6 GB per copy


def accuracy(model: nn.Module, loader: DataLoader, env: DistEnv, autocast: Callable = contextlib.nullcontext) -> float:
    """Top-1 accuracy over a (rank-sharded) loader of (images, labels)."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    device = model_device(model)
    with torch.no_grad(), autocast():
        for images, labels in loader:
            images, labels = place((images, labels), device)
            counts[0] += int((model(images).argmax(1) == labels).sum())
            counts[1] += len(labels)
    model.train()
    counts = sum_over_ranks(counts, env)
    return float(counts[0] / counts[1]) if counts[1] else 0.0


def _batches(model: nn.Module, samples: TokenSamples, pad_id: int, batch_size: int = EVAL_BATCH):  # noqa: ANN202
    """Padded batches of `samples`, on `model`'s device."""
    device = model_device(model)
    return (place(batch, device) for batch in DataLoader(samples, batch_size=batch_size, collate_fn=PadCollate(pad_id)))


def _spread(samples: TokenSamples, limit: int = MAX_EVAL_SAMPLES) -> TokenSamples:
    """At most `limit` samples, evenly spaced (deterministic, covers every document)."""
    if len(samples) <= limit:
        return samples
    return TokenSamples([samples.ids[i * len(samples) // limit] for i in range(limit)])


def perplexity(model: nn.Module, samples: TokenSamples, pad_id: int, autocast: Callable = contextlib.nullcontext) -> float:
    """exp of the mean NLL of every real token given the tokens before it."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad(), autocast():
        for batch in _batches(model, samples, pad_id, LM_EVAL_BATCH):
            logits = model(**batch).logits.float()
            pairs = batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]
            losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
            nll += float((losses * pairs).sum())
            count += int(pairs.sum())
    model.train(was_training)
    return math.exp(nll / max(count, 1))


def embed(model: nn.Module, samples: TokenSamples, pad_id: int, autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """Mean-pooled last hidden states, one row per sample."""
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad(), autocast():
        for batch in _batches(model, samples, pad_id):
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
            rows.append(mean_pool(hidden.float(), batch["attention_mask"]).cpu())
    model.train(was_training)
    return torch.cat(rows)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), as Spearman's coefficient needs."""
    order = values.argsort(stable=True)
    sorted_values = values[order]
    positions = torch.arange(len(values), dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_position = (ends - (counts.double() + 1) / 2)[inverse]
    ranks = torch.empty_like(positions)
    ranks[order] = mean_position
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long 1-D tensors."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def embedding_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Cosine of each student embedding to its teacher embedding (mean, min), and Spearman of the pairwise
    cosine similarities (upper triangle) of the two sets."""
    cosines = F.cosine_similarity(student.double(), teacher.double(), dim=-1)
    s, t = F.normalize(student.double(), dim=-1), F.normalize(teacher.double(), dim=-1)
    upper = torch.triu_indices(len(s), len(s), offset=1)
    rank = spearman((s @ s.T)[upper[0], upper[1]], (t @ t.T)[upper[0], upper[1]]) if len(s) > 2 else float("nan")
    return {"cosine": float(cosines.mean()), "cosine_min": float(cosines.min()), "spearman": rank}


@dataclass
class TextQuality:
    """Held-out text and, for encoders, the teacher's embeddings of it (computed once)."""

    kind: ModelKind
    sets: dict[str, TokenSamples]  # "chunks" (causal LM) or "paragraphs" / "sentences" (encoders)
    pad_id: int
    description: str
    teacher: nn.Module | None = None
    _reference: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, model: nn.Module, autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
        if self.kind is ModelKind.CAUSAL_LM:
            return {"perplexity": perplexity(model, self.sets["chunks"], self.pad_id, autocast)}
        if self.teacher is None:
            raise NMSparseError("the quality of an encoder is its agreement with the dense model: pass --teacher DENSE")
        out = {}
        for name, samples in self.sets.items():
            if name not in self._reference:
                self._reference[name] = self._teacher_view(samples)
            student = self._student_view(model, samples, autocast)
            prefix = "" if name == "paragraphs" else "sentence_"
            agreement = embedding_agreement(student, self._reference[name]) if self.kind is ModelKind.ENCODER else {
                "label_agreement": float((student.argmax(-1) == self._reference[name].argmax(-1)).double().mean())
            }
            out.update({f"{prefix}{k}": v for k, v in agreement.items()})
        return out

    def _teacher_view(self, samples: TokenSamples) -> torch.Tensor:
        return self._student_view(self.teacher, samples, contextlib.nullcontext)

    def _student_view(self, model: nn.Module, samples: TokenSamples, autocast: Callable) -> torch.Tensor:
        if self.kind is ModelKind.SEQUENCE_CLASSIFIER:
            return _logits(model, samples, self.pad_id, autocast)
        return embed(model, samples, self.pad_id, autocast)


def _logits(model: nn.Module, samples: TokenSamples, pad_id: int, autocast: Callable) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        out = torch.cat([model(**batch).logits.float().cpu() for batch in _batches(model, samples, pad_id)])
    model.train(was_training)
    return out


@dataclass
class TextData:
    """Training samples and held-out quality for one model and one `--data`."""

    train: TokenSamples
    quality: TextQuality
    collate: PadCollate


def training_samples(kind: ModelKind, tokenizer, documents: list[str], seq_len: int, where: str) -> TokenSamples:  # noqa: ANN001
    """What a model of this kind trains on: LM chunks, or paragraphs plus single sentences for encoders."""
    if kind is ModelKind.CAUSAL_LM:
        return lm_chunks(tokenizer, documents, seq_len, where)
    paragraphs, sentences = encoder_texts(documents)
    return encoder_samples(tokenizer, paragraphs + sentences, seq_len, where)


def text_data(
    kind: ModelKind, folder: Path | None, spec: str, seq_len: int, teacher: nn.Module | None, with_train: bool = True
) -> TextData:
    """Tokenize `spec` for a model of this kind: LM chunks, or paragraphs plus single sentences for encoders
    (the training part only `with_train`)."""
    tokenizer = load_tokenizer(folder)
    corpus = load_texts(spec)
    pad_id = int(tokenizer.pad_token_id)
    train = training_samples(kind, tokenizer, corpus.train, seq_len, f"{spec} (training part)") if with_train else TokenSamples([])
    if kind is ModelKind.CAUSAL_LM:
        sets = {"chunks": _spread(lm_chunks(tokenizer, corpus.heldout, seq_len, f"{spec} (held-out part)"), MAX_EVAL_CHUNKS)}
        counts = f"{len(sets['chunks'])} held-out chunks of {seq_len} tokens"
        if with_train:
            counts = f"{len(train)} train / {counts}"
    else:
        paragraphs, sentences = encoder_texts(corpus.train) if with_train else ([], [])
        held_paragraphs, held_sentences = encoder_texts(corpus.heldout)
        sets = {
            "paragraphs": _spread(encoder_samples(tokenizer, held_paragraphs, seq_len, f"{spec} (held-out part)")),
            "sentences": _spread(encoder_samples(tokenizer, held_sentences, seq_len, f"{spec} (held-out sentences)")),
        }
        counts = f"held out {len(sets['paragraphs'])} paragraphs, {len(sets['sentences'])} sentences"
        if with_train:
            counts = f"{len(paragraphs)} paragraphs + {len(sentences)} sentences to train on; {counts}"
    quality = TextQuality(kind, sets, pad_id, f"{corpus.description}: {counts}", teacher)
    return TextData(train, quality, PadCollate(pad_id))


@dataclass
class EvalResult:
    source: str
    kind: ModelKind
    data: str
    metrics: dict[str, float]
    teacher: dict[str, float] | None  # the dense model's own figures where they mean something (perplexity)
    seconds: float

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind.value, "data": self.data, "metrics": self.metrics,
                "teacher": self.teacher, "seconds": self.seconds}


def _teacher_of(spec: str | None, student: Resolved, device: torch.device) -> tuple[Resolved, nn.Module] | None:
    if spec is None:
        return None
    resolved = resolve(spec)
    if resolved.model is None or student.model is None or resolved.model.name != student.model.name:
        raise NMSparseError(f"--teacher {spec}: not the same architecture as the model ({student.model.name if student.model else '?'})")
    return resolved, load_model(resolved).to(device).eval()


def evaluate_source(
    source: str, *, data: str | None = None, teacher: str | None = None, seq_len: int = 128,
    device: torch.device = torch.device("cpu"),
) -> EvalResult:
    """The quality of a checkpoint on held-out data (methods.md §6): see the module docstring for the metrics."""
    started = time.perf_counter()
    resolved = resolve(source)
    if resolved.model is None:
        raise NMSparseError(f"{source}: the architecture is unknown; eval needs a file written by nmsparse or a Hugging Face folder")
    kind = model_kind(resolved.model)
    if teacher is None and kind in (ModelKind.ENCODER, ModelKind.SEQUENCE_CLASSIFIER):
        raise NMSparseError(f"{source}: the quality of a {kind.value} is its agreement with the dense model: pass --teacher DENSE")
    model, dense = load_model(resolved).to(device).eval(), _teacher_of(teacher, resolved, device)
    if kind is ModelKind.IMAGE_CLASSIFIER:
        splits = load_data(data or MNIST5K, data_config(model, resolved.model))
        loader = DataLoader(splits.val, batch_size=256)
        metrics = {"val_accuracy": accuracy(model, loader, DistEnv())}
        reference = {"val_accuracy": accuracy(dense[1], loader, DistEnv())} if dense else None
        return EvalResult(source, kind, splits.description, metrics, reference, round(time.perf_counter() - started, 2))
    folder = resolved.checkpoint.folder or (dense[0].checkpoint.folder if dense else None)
    texts = text_data(kind, folder, data or PYTHON_HELP, seq_len, dense[1] if dense else None, with_train=False)
    metrics = texts.quality(model)
    reference = texts.quality(dense[1]) if dense and kind is ModelKind.CAUSAL_LM else None
    return EvalResult(source, kind, texts.quality.description, metrics, reference, round(time.perf_counter() - started, 2))
