"""`--data teacher:N`: the dense causal LM writes its own training text, so recovery needs no data set.

N sequences of exactly `seq_len` tokens: a prompt (from a small built-in list or `--prompts FILE`, one per line,
taken in turn) continued by seeded sampling (top-p 0.95, temperature 1: data/sampling.py; end-of-text suppressed so
that every sequence has the same length). Many sequences are written at once, prompts of different lengths in one
batch, as many as keep the key/value cache within GENERATION_MEMORY. The result is cached in the run's folder, keyed
by everything that shapes it, so a resumed or repeated run reuses it instead of generating again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LogitsProcessorList

from nmcli.data.sampling import NucleusSampler
from nmcli.data.tokens import TokenSamples
from nmcli.data.text import read_text
from nmcli.runtime.device import model_device, place
from nmcli.errors import NMSparseError
from nmcli.io.atomic import atomic_output

PREFIX = "teacher:"
CACHE_FILE = "teacher-data.safetensors"
MAX_SEQUENCES = 1_000_000
GENERATION_MEMORY = 2**30  # bytes of key/value cache one `generate` call may fill
MAX_GENERATION_BATCH = 128  # SmolLM2 bf16, 2 cores: 131 / 301 / 395 / 265 new tokens/s at 16 / 64 / 128 / 192
SAMPLER = NucleusSampler(top_p=0.95, temperature=1.0)
# generate() decodes greedily after SAMPLER has drawn; a model's own sampling settings (Llama-3's generation_config
# sets temperature and top_p) are cleared rather than left for transformers to warn that it ignores them
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None, "typical_p": None}
BUILTIN_PROMPTS = (
    "The history of computing",
    "Here is a short story about",
    "In mathematics, a function",
    "def main():",
    "The best way to learn a language is",
    "Scientists recently discovered",
    "A recipe for bread:",
    "Q: What is the capital of France?\nA:",
    "The weather today",
    "Once upon a time",
    "import numpy as np\n",
    "The main causes of the French Revolution",
    "Dear team,",
    "In this tutorial, we will",
    "The human brain",
    "Python is a programming language that",
)


def teacher_count(spec: str) -> int | None:
    """N of `teacher:N`, or None for any other data spec."""
    if not spec.startswith(PREFIX):
        return None
    text = spec[len(PREFIX) :]
    if not text.isdigit() or not 1 <= int(text) <= MAX_SEQUENCES:
        raise NMSparseError(f"--data {spec}: write teacher:N with N a whole number from 1 to {MAX_SEQUENCES}")
    return int(text)


def read_prompts(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return BUILTIN_PROMPTS
    if not path.is_file():
        raise NMSparseError(f"--prompts {path}: file not found")
    prompts = tuple(line.strip() for line in read_text(path).splitlines() if line.strip())
    if not prompts:
        raise NMSparseError(f"--prompts {path}: no prompts (one per line)")
    return prompts


@dataclass(frozen=True)
class Generated:
    samples: TokenSamples
    seconds: float  # 0 when read from the cache
    cache: Path | None


def generation_batch(config, seq_len: int, element_bytes: int) -> int:  # noqa: ANN001 - a transformers config
    """Sequences per `generate` call whose key/value cache (2 x layers x kv heads x head size x seq_len) fits in
    GENERATION_MEMORY, from 1 to MAX_GENERATION_BATCH."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_sequence = 2 * config.num_hidden_layers * kv_heads * head_dim * seq_len * element_bytes
    return max(1, min(MAX_GENERATION_BATCH, GENERATION_MEMORY // per_sequence))


def _key(model_id: str, count: int, seq_len: int, seed: int, prompts: tuple[str, ...], batch: int) -> str:
    blob = json.dumps([model_id, count, seq_len, seed, list(prompts), batch, repr(SAMPLER)])
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(path: Path, key: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("ids")
    except (SafetensorError, OSError):
        return None  # a damaged cache is regenerated


def continue_prompts(
    teacher: nn.Module, prompts: list[list[int]], seq_len: int, pad_id: int, sampler: NucleusSampler | None = None
) -> torch.Tensor:
    """[len(prompts), seq_len]: each prompt continued to exactly `seq_len` tokens, in one `generate` call, by
    `sampler` (None: greedy). Prompts of different lengths are padded on the left (the attention mask and positions
    skip the padding), so one batch mixes prompts; end-of-text is suppressed for as long as the shortest prompt
    needs."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    new = seq_len - min(map(len, prompts))
    device = model_device(teacher)
    out = teacher.generate(
        input_ids=place(ids, device), attention_mask=place(mask, device), max_new_tokens=new, min_new_tokens=new,
        pad_token_id=pad_id, **GREEDY, logits_processor=LogitsProcessorList([sampler] if sampler else []),
    ).cpu()
    return torch.stack([out[row, width - len(p) : width - len(p) + seq_len] for row, p in enumerate(prompts)])


def teacher_samples(
    teacher: nn.Module, tokenizer, model_id: str, count: int, seq_len: int, seed: int,  # noqa: ANN001
    prompts: tuple[str, ...], folder: Path | None,
) -> Generated:
    """`count` sequences written by `teacher`, cached in `folder` (None: not cached)."""
    path = folder / CACHE_FILE if folder is not None else None
    batch = generation_batch(teacher.config, seq_len, next(teacher.parameters()).element_size())
    key = _key(model_id, count, seq_len, seed, prompts, batch)
    cached = _cached(path, key) if path is not None else None
    if cached is not None:
        return Generated(TokenSamples(list(cached)), 0.0, path)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not 1 <= len(ids) < seq_len:
            raise NMSparseError(f"prompt {prompt[:40]!r}: {len(ids)} tokens; prompts need 1 to {seq_len - 1} tokens for --seq-len {seq_len}")
    started = time.perf_counter()
    teacher.eval()
    rows = [encoded[i % len(encoded)] for i in range(count)]  # the prompts in turn, mixed in every batch
    device = model_device(teacher)
    # generation does not shift the run's own random streams (the CPU's, and the GPU's when sampling there)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        pad_id = int(tokenizer.pad_token_id)
        parts = [
            continue_prompts(teacher, rows[start : start + batch], seq_len, pad_id, SAMPLER)
            for start in range(0, count, batch)
        ]
    ids = torch.cat(parts).contiguous()
    if path is not None:
        path.parent.mkdir(exist_ok=True)
        with atomic_output(path, force=True) as tmp:
            save_file({"ids": ids}, str(tmp), metadata={"key": key})
    return Generated(TokenSamples(list(ids)), round(time.perf_counter() - started, 1), path)
