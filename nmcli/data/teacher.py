"""`--data teacher:N`: the dense causal LM writes its own training text, so recovery needs no data set.

N sequences of exactly `seq_len` tokens: a prompt (from a small built-in list or `--prompts FILE`, one per line,
taken in turn) continued by seeded sampling (top-p 0.95, temperature 1; end-of-text suppressed so that every
sequence has the same length). The result is cached in the run's folder, keyed by everything that shapes it, so a
resumed or repeated run reuses it instead of generating again.
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

from nmcli.data.tokens import TokenSamples
from nmcli.data.text import read_text
from nmcli.device import model_device, place
from nmcli.errors import NMSparseError
from nmcli.io.atomic import atomic_output

PREFIX = "teacher:"
CACHE_FILE = "teacher-data.safetensors"
MAX_SEQUENCES = 1_000_000
GENERATION_BATCH = 16
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


def _key(model_id: str, count: int, seq_len: int, seed: int, prompts: tuple[str, ...]) -> str:
    blob = json.dumps([model_id, count, seq_len, seed, list(prompts)])
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


def _generate_for_prompt(teacher: nn.Module, prompt_ids: list[int], count: int, seq_len: int, pad_id: int) -> torch.Tensor:
    new = seq_len - len(prompt_ids)
    rows = []
    for start in range(0, count, GENERATION_BATCH):
        batch = min(GENERATION_BATCH, count - start)
        ids = place(torch.tensor([prompt_ids] * batch), model_device(teacher))
        out = teacher.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, temperature=1.0,
            top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id,
        )
        rows.append(out[:, :seq_len].cpu())
    return torch.cat(rows)


def teacher_samples(
    teacher: nn.Module, tokenizer, model_id: str, count: int, seq_len: int, seed: int,  # noqa: ANN001
    prompts: tuple[str, ...], folder: Path | None,
) -> Generated:
    """`count` sequences written by `teacher`, cached in `folder` (None: not cached)."""
    path = folder / CACHE_FILE if folder is not None else None
    key = _key(model_id, count, seq_len, seed, prompts)
    cached = _cached(path, key) if path is not None else None
    if cached is not None:
        return Generated(TokenSamples(list(cached)), 0.0, path)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not 1 <= len(ids) < seq_len:
            raise NMSparseError(f"prompt {prompt[:40]!r}: {len(ids)} tokens; prompts need 1 to {seq_len - 1} tokens for --seq-len {seq_len}")
    started = time.perf_counter()
    teacher.eval()
    per_prompt = [count // len(prompts) + (i < count % len(prompts)) for i in range(len(prompts))]
    device = model_device(teacher)
    # generation does not shift the run's own random streams (the CPU's, and the GPU's when sampling there)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        parts = [
            _generate_for_prompt(teacher, ids, n, seq_len, int(tokenizer.pad_token_id)) for ids, n in zip(encoded, per_prompt) if n
        ]
    ids = torch.cat(parts).contiguous()
    if path is not None:
        path.parent.mkdir(exist_ok=True)
        with atomic_output(path, force=True) as tmp:
            save_file({"ids": ids}, str(tmp), metadata={"key": key})
    return Generated(TokenSamples(list(ids)), round(time.perf_counter() - started, 1), path)
