"""A model measured on held-out samples: perplexity, mean-pooled embeddings, logits, image accuracy. Held-out samples
go through the model in batches of like length (shortest first) and come back in the samples' order."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from nmcli.data.tokens import PadCollate, TokenSamples
from nmcli.runtime.device import model_device, place
from nmcli.train.distill import mean_pool, next_token_nll
from nmcli.train.distributed import DistEnv, sum_over_ranks

MAX_EVAL_SAMPLES = 256  # per held-out set of an encoder: enough for a stable mean, small enough for every epoch
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


def spread(samples: TokenSamples, limit: int = MAX_EVAL_SAMPLES) -> TokenSamples:
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


def logits(model: nn.Module, samples: TokenSamples, pad_id: int, autocast: Callable) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        out = _in_sample_order([model(**batch).logits.float().cpu() for batch in _batches(model, samples, pad_id)], samples)
    model.train(was_training)
    return out
