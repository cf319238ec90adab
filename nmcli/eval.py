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
from nmcli.data.mixture import Share, mix, parse_mixture
from nmcli.data.text import NEWS, PYTHON_HELP, TextCorpus, load_eval_texts, load_texts
from nmcli.data.tokens import PadCollate, TokenSamples, encoder_samples, encoder_texts, lm_chunks, load_tokenizer
from nmcli.device import model_device, place
from nmcli.errors import NMSparseError
from nmcli.models.architecture import ModelKind, data_config, model_kind
from nmcli.train.distill import mean_pool, next_token_nll
from nmcli.train.distributed import DistEnv, sum_over_ranks

MAX_EVAL_SAMPLES = 256  # per held-out set of an encoder: enough for a stable mean, small enough for every epoch
MAX_EVAL_CHUNKS = 64  # held-out LM chunks (64 x 128 tokens = 8 K tokens by default)
EVAL_BATCH = 32
LM_EVAL_BATCH = 4  # logits are batch x tokens x vocab floats: 32 x 256 x 49152 would be 1.6 GB per copy
NEIGHBOURS = 10  # recall@10 of the dense model's nearest neighbours
DOMAIN_SEPARATOR = "/"  # metric keys of every domain but the training text's own: "news/cosine"


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


def _length_order(samples: TokenSamples) -> torch.Tensor:
    """Sample indices, shortest first: batches of like lengths pad little (held-out paragraphs in arrival order
    were 44 % padding)."""
    return torch.tensor([len(ids) for ids in samples.ids]).argsort(stable=True)


def _batches(model: nn.Module, samples: TokenSamples, pad_id: int, batch_size: int = EVAL_BATCH):  # noqa: ANN202
    """Padded batches of `samples` in `_length_order`, on `model`'s device."""
    device = model_device(model)
    by_length = TokenSamples([samples.ids[i] for i in _length_order(samples)])
    return (place(batch, device) for batch in DataLoader(by_length, batch_size=batch_size, collate_fn=PadCollate(pad_id)))


def _in_sample_order(rows: list[torch.Tensor], samples: TokenSamples) -> torch.Tensor:
    """Per-sample rows computed over `_batches` (length order), back in the order of `samples`."""
    out = torch.cat(rows)
    return out[_length_order(samples).argsort()]


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
            pairs = batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]
            losses = next_token_nll(model(**batch).logits, batch["input_ids"])
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
    return _in_sample_order(rows, samples)


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


def neighbour_agreement(student_sim: torch.Tensor, teacher_sim: torch.Tensor, k: int = NEIGHBOURS) -> dict[str, float]:
    """Search within the set itself, each item's own row left out: how often the student's nearest neighbour is the
    teacher's (top-1), and the mean share of the teacher's k nearest that the student also ranks among its k nearest
    (recall@k). Needs more than k items."""
    n = len(student_sim)
    if n <= k:
        return {}
    itself = torch.eye(n, dtype=torch.bool)
    s, t = student_sim.masked_fill(itself, -math.inf), teacher_sim.masked_fill(itself, -math.inf)
    top1 = (s.argmax(1) == t.argmax(1)).double().mean()
    teacher_top = torch.zeros(n, n, dtype=torch.bool).scatter_(1, t.topk(k, dim=1).indices, True)
    recall = teacher_top.gather(1, s.topk(k, dim=1).indices).double().sum(1) / k
    return {"top1_agreement": float(top1), f"recall_at_{k}": float(recall.mean())}


def embedding_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Cosine of each student embedding to its teacher embedding (mean, min), Spearman of the pairwise cosine
    similarities (upper triangle) of the two sets, and the agreement of their nearest neighbours."""
    cosines = F.cosine_similarity(student.double(), teacher.double(), dim=-1)
    s, t = F.normalize(student.double(), dim=-1), F.normalize(teacher.double(), dim=-1)
    s_sim, t_sim = s @ s.T, t @ t.T
    upper = torch.triu_indices(len(s), len(s), offset=1)
    rank = spearman(s_sim[upper[0], upper[1]], t_sim[upper[0], upper[1]]) if len(s) > 2 else float("nan")
    return {"cosine": float(cosines.mean()), "cosine_min": float(cosines.min()), "spearman": rank,
            **neighbour_agreement(s_sim, t_sim)}


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
            return _logits(model, samples, self.pad_id, autocast)
        return embed(model, samples, self.pad_id, autocast)


def _logits(model: nn.Module, samples: TokenSamples, pad_id: int, autocast: Callable) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        out = _in_sample_order([model(**batch).logits.float().cpu() for batch in _batches(model, samples, pad_id)], samples)
    model.train(was_training)
    return out


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


@dataclass
class TextData:
    """Training samples and held-out quality for one model and one `--data`."""

    train: TokenSamples
    quality: QualitySuite
    collate: PadCollate


def training_samples(kind: ModelKind, tokenizer, documents: list[str], seq_len: int, where: str) -> TokenSamples:  # noqa: ANN001
    """What a model of this kind trains on: LM chunks, or paragraphs plus single sentences for encoders."""
    if kind is ModelKind.CAUSAL_LM:
        return lm_chunks(tokenizer, documents, seq_len, where)
    paragraphs, sentences = encoder_texts(documents)
    return encoder_samples(tokenizer, paragraphs + sentences, seq_len, where)


def _heldout_quality(kind: ModelKind, tokenizer, corpus: TextCorpus, seq_len: int, spec: str,  # noqa: ANN001, PLR0913
                     teacher: nn.Module | None, domain: str, train_note: str = "") -> TextQuality:
    """One domain's held-out samples: LM chunks, or paragraphs and single sentences for encoders."""
    pad_id = int(tokenizer.pad_token_id)
    if kind is ModelKind.CAUSAL_LM:
        sets = {"chunks": _spread(lm_chunks(tokenizer, corpus.heldout, seq_len, f"{spec} (held-out part)"), MAX_EVAL_CHUNKS)}
        counts = f"{len(sets['chunks'])} held-out chunks of {seq_len} tokens"
    else:
        held_paragraphs, held_sentences = encoder_texts(corpus.heldout)
        sets = {
            "paragraphs": _spread(encoder_samples(tokenizer, held_paragraphs, seq_len, f"{spec} (held-out part)")),
            "sentences": _spread(encoder_samples(tokenizer, held_sentences, seq_len, f"{spec} (held-out sentences)")),
        }
        counts = f"held out {len(sets['paragraphs'])} paragraphs, {len(sets['sentences'])} sentences"
    return TextQuality(kind, sets, pad_id, f"{corpus.description}: {train_note}{counts}", teacher, domain)


def text_data(
    kind: ModelKind, folder: Path | None, spec: str, seq_len: int, teacher: nn.Module | None, with_train: bool = True,
    eval_specs: tuple[str, ...] = (NEWS,), seed: int = 0,
) -> TextData:
    """Tokenize `spec` (one source or a mixture, nmcli/data/mixture.py) for a model of this kind (the training part
    only `with_train`, a mixture's drawn with `seed`), with held-out quality on each source's own held-out part and
    on every set of `eval_specs` (by default the built-in general-domain `news`)."""
    tokenizer = load_tokenizer(folder)
    shares = parse_mixture(spec) or [Share(spec, 1.0)]
    corpora = [load_texts(share.source) for share in shares]
    trains = [training_samples(kind, tokenizer, corpus.train, seq_len, f"{share.source} (training part)")
              if with_train else TokenSamples([]) for share, corpus in zip(shares, corpora)]
    train, counts = mix(trains, shares, seed) if with_train and len(shares) > 1 else (trains[0], [len(trains[0])])
    parts: list[TextQuality] = []
    for share, corpus in zip(shares, corpora):
        note = _training_note(kind, corpus, len(train)) if with_train and len(shares) == 1 else ""
        name = domain_name(share.source, [p.domain for p in parts])
        parts.append(_heldout_quality(kind, tokenizer, corpus, seq_len, share.source, teacher, name, note))
    for extra in eval_specs:
        name = domain_name(extra, [p.domain for p in parts])
        parts.append(_heldout_quality(kind, tokenizer, load_eval_texts(extra), seq_len, extra, teacher, name))
    mixture = _mixture_note(shares, trains, counts) if with_train and len(shares) > 1 else ""
    return TextData(train, QualitySuite(parts, mixture), PadCollate(int(tokenizer.pad_token_id)))


def _training_note(kind: ModelKind, corpus: TextCorpus, train_count: int) -> str:
    if kind is ModelKind.CAUSAL_LM:
        return f"{train_count} train / "
    paragraphs, sentences = encoder_texts(corpus.train)
    return f"{len(paragraphs)} paragraphs + {len(sentences)} sentences to train on; "


def _mixture_note(shares: list[Share], trains: list[TokenSamples], counts: list[int]) -> str:
    """`mixture of 17877 training samples: python-help 30% (5363 of 5363), wiki 70% (12514 of 20873)`."""
    total = sum(share.weight for share in shares)
    return f"mixture of {sum(counts)} training samples: " + ", ".join(
        f"{share.source} {100 * share.weight / total:.0f}% ({count} of {len(part)})"
        for share, part, count in zip(shares, trains, counts)
    )


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


def check_seq_len(resolved: Resolved, seq_len: int | None, default: int = 128) -> int:
    """Tokens per sample: `seq_len` within the model's positions (a longer sample fails inside an encoder), or when
    not given `default` capped at them."""
    config = resolved.model.hf_config or {}
    longest = config.get("max_position_embeddings") or config.get("n_positions")
    if seq_len is None:
        return min(default, longest) if longest else default
    if longest and seq_len > longest:
        raise NMSparseError(f"--seq-len {seq_len}: {resolved.model.name} takes at most {longest} tokens per sample")
    return seq_len


def _teacher_of(spec: str | None, student: Resolved, device: torch.device) -> tuple[Resolved, nn.Module] | None:
    if spec is None:
        return None
    resolved = resolve(spec)
    if resolved.model is None or student.model is None or resolved.model.name != student.model.name:
        raise NMSparseError(f"--teacher {spec}: not the same architecture as the model ({student.model.name if student.model else '?'})")
    return resolved, load_model(resolved).to(device).eval()


def evaluate_source(
    source: str, *, data: str | None = None, teacher: str | None = None, seq_len: int | None = None,
    device: torch.device = torch.device("cpu"), eval_data: tuple[str, ...] = (),
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
        if eval_data:
            raise NMSparseError("--eval-data goes with Hugging Face models (held-out text); an image classifier is scored on --data")
        splits = load_data(data or MNIST5K, data_config(model, resolved.model))
        loader = DataLoader(splits.val, batch_size=256)
        metrics = {"val_accuracy": accuracy(model, loader, DistEnv())}
        reference = {"val_accuracy": accuracy(dense[1], loader, DistEnv())} if dense else None
        return EvalResult(source, kind, splits.description, metrics, reference, round(time.perf_counter() - started, 2))
    seq_len = check_seq_len(resolved, seq_len)
    folder = resolved.checkpoint.folder or (dense[0].checkpoint.folder if dense else None)
    texts = text_data(kind, folder, data or PYTHON_HELP, seq_len, dense[1] if dense else None, with_train=False,
                      eval_specs=(NEWS, *eval_data))
    metrics = texts.quality(model)
    reference = texts.quality(dense[1]) if dense and kind is ModelKind.CAUSAL_LM else None
    return EvalResult(source, kind, texts.quality.description, metrics, reference, round(time.perf_counter() - started, 2))
