"""Held-out quality per domain (`TextQuality`) and over every domain of a run (`QualitySuite`), with the names and
groupings a line of output gives them (`news/cosine`, `python-help (held out): ... | news: ...`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nmcli.data.text import NEWS, PYTHON_HELP
from nmcli.data.tokens import TokenSamples
from nmcli.errors import NMSparseError
from nmcli.models.architecture import ModelKind
from nmcli.quality.agreement import embedding_agreement
from nmcli.quality.measures import embed, logits, perplexity

DOMAIN_SEPARATOR = "/"  # metric keys of every domain but the training text's own: "news/cosine"


@dataclass
class TextQuality:
    """Held-out text of one domain and, with a teacher, its view of it (computed once): embeddings for encoders,
    its own perplexity for causal LMs (which adds the ratio to dense)."""

    kind: ModelKind
    sets: dict[str, TokenSamples]  # "chunks" (causal LM) or "paragraphs" / "sentences" (encoders)
    pad_id: int
    description: str
    teacher: nn.Module | None = None
    domain: str = PYTHON_HELP
    _reference: dict[str, torch.Tensor] = field(default_factory=dict)
    _dense_perplexity: float | None = None

    def __call__(self, model: nn.Module, autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
        if self.kind is ModelKind.CAUSAL_LM:
            value = perplexity(model, self.sets["chunks"], self.pad_id, autocast)
            if self.teacher is None:
                return {"perplexity": value}
            if self._dense_perplexity is None:
                self._dense_perplexity = perplexity(self.teacher, self.sets["chunks"], self.pad_id)
            return {"perplexity": value, "perplexity_ratio": value / self._dense_perplexity}
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
            return logits(model, samples, self.pad_id, autocast)
        return embed(model, samples, self.pad_id, autocast)


@dataclass
class QualitySuite:
    """Held-out quality on several domains: the training text's own held-out part first (its metrics keep their
    plain names), then the general-domain set and the user's `--eval-data`, each metric named `domain/metric`."""

    parts: list[TextQuality]
    mixture: str = ""  # how a mixture of training sources was drawn (empty for one source)

    def __call__(self, model: nn.Module, autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, part in enumerate(self.parts):
            prefix = "" if i == 0 else part.domain + DOMAIN_SEPARATOR
            out.update({prefix + name: value for name, value in part(model, autocast).items()})
        return out

    @property
    def domains(self) -> list[str]:
        return [part.domain for part in self.parts]

    @property
    def description(self) -> str:
        held_out = "; ".join(f"{part.domain}: {part.description}" for part in self.parts)
        return f"{self.mixture}; held out: {held_out}" if self.mixture else held_out


def by_domain(entries: dict[str, str], held_out: str | None) -> str:
    """Text entries keyed by metric name, grouped by domain and each group named: `python-help (held out): <entry>,
    <entry> | news: <entry>` (the plainly named metrics are the held-out part of `held_out`; no name without it)."""
    groups: dict[str, list[str]] = {}
    for name, entry in entries.items():
        groups.setdefault(name.rpartition(DOMAIN_SEPARATOR)[0], []).append(entry)
    label = {"": f"{held_out} (held out): " if held_out else ""}
    return " | ".join(label.get(domain, f"{domain}: ") + ", ".join(items) for domain, items in groups.items())


def metric_words(name: str) -> str:
    """`news/sentence_cosine` -> `sentence cosine`: a metric as a line shows it inside its domain's group."""
    return name.rpartition(DOMAIN_SEPARATOR)[2].replace("_", " ")


def domain_name(spec: str, taken: list[str]) -> str:
    """How a held-out set is named in metrics and lines: the built-in name, else the file or folder's stem
    (numbered when two sets share it)."""
    base = spec if spec in (PYTHON_HELP, NEWS) else (Path(spec).stem or Path(spec).resolve().name)
    name, number = base.replace(DOMAIN_SEPARATOR, "-"), 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name
