"""A model's text for one `--data` (one source or a mixture): its training samples and the held-out quality suite
of every domain (each source's own held-out part, the built-in `news`, the user's `--eval-data`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from nmcli.data.mixture import Share, mix, parse_mixture
from nmcli.data.text import NEWS, TextCorpus, load_eval_texts, load_texts
from nmcli.data.tokens import PadCollate, TokenSamples, encoder_samples, encoder_texts, lm_chunks, load_tokenizer
from nmcli.errors import NMSparseError
from nmcli.models.architecture import ModelKind
from nmcli.models.resolve import Resolved
from nmcli.quality.measures import spread
from nmcli.quality.suite import QualitySuite, TextQuality, domain_name

MAX_EVAL_CHUNKS = 64  # held-out LM chunks (64 x 128 tokens = 8 K tokens by default)


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
        sets = {"chunks": spread(lm_chunks(tokenizer, corpus.heldout, seq_len, f"{spec} (held-out part)"), MAX_EVAL_CHUNKS)}
        counts = f"{len(sets['chunks'])} held-out chunks of {seq_len} tokens"
    else:
        held_paragraphs, held_sentences = encoder_texts(corpus.heldout)
        sets = {
            "paragraphs": spread(encoder_samples(tokenizer, held_paragraphs, seq_len, f"{spec} (held-out part)")),
            "sentences": spread(encoder_samples(tokenizer, held_sentences, seq_len, f"{spec} (held-out sentences)")),
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
