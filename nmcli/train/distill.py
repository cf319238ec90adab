"""Distillation from the dense teacher (methods.md §6): the loss terms as pure functions, and the Distiller that
runs teacher and student on a batch and sums the enabled terms.

Every mean excludes padding: `mask` is the batch's attention mask (1 = real token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.models.architecture import ModelKind
from nmcli.methods.recipes import DistillSpec

# Defaults per model kind (methods.md §6). The student learns without dropout: it matches a deterministic teacher,
# and dropout only blurs what it is shown (measured on MiniLM 2:4: README's benchmark section).
_SHARED = {"temperature": 1.0, "embedding_loss": "cosine", "dropout": False}
DEFAULTS = {
    ModelKind.CAUSAL_LM: DistillSpec(kl=1.0, ce=0.0, squarehead=0.0, embedding=0.0, **_SHARED),
    ModelKind.ENCODER: DistillSpec(kl=0.0, ce=0.0, squarehead=1.0, embedding=1.0, **_SHARED),
    ModelKind.SEQUENCE_CLASSIFIER: DistillSpec(kl=1.0, ce=0.0, squarehead=0.0, embedding=0.0, **_SHARED),
}


def resolve_spec(spec: DistillSpec | None, kind: ModelKind) -> DistillSpec:
    """The recipe's `distill:` values over the defaults for this kind of model."""
    base = DEFAULTS[kind]
    if spec is None:
        return base
    return DistillSpec(**{k: (v if v is not None else getattr(base, k)) for k, v in spec.__dict__.items()})


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] over positions where mask is 1."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


CHUNK_BYTES = 2**25  # fp32 working set of one chunk of logits rows in the KL (32 MiB)


class _ChunkedLogitKL(torch.autograd.Function):
    """τ² Σ_i w_i KL(softmax(t_i/τ) ‖ softmax(s_i/τ)) over the rows of [N, V] logits, `rows` rows at a time in
    fp32. Backward recomputes both softmaxes per chunk, so what stays alive for it is the logits as they came (bf16
    under autocast). Autodiff of the same formula keeps three vocabulary-wide fp32 tensors per row (for
    SmolLM2, 4 x 256 tokens: 0.6 GiB) and builds more in backward."""

    @staticmethod
    def forward(ctx, student, teacher, weights, temperature: float, rows: int):  # type: ignore[override]
        ctx.save_for_backward(student, teacher, weights)
        ctx.temperature, ctx.rows = temperature, rows
        total = student.new_zeros((), dtype=torch.float32)
        for start in range(0, student.shape[0], rows):
            part = slice(start, start + rows)
            log_s = F.log_softmax(student[part].float() / temperature, dim=-1)
            log_t = F.log_softmax(teacher[part].float() / temperature, dim=-1)
            total += (weights[part] * (log_t.exp() * (log_t - log_s)).sum(-1)).sum()
        return temperature**2 * total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        student, teacher, weights = ctx.saved_tensors
        tau, grad_student = ctx.temperature, torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.rows):  # d/ds_v = τ w (softmax(s/τ)_v - softmax(t/τ)_v)
            part = slice(start, start + ctx.rows)
            difference = F.softmax(student[part].float() / tau, dim=-1) - F.softmax(teacher[part].float() / tau, dim=-1)
            grad_student[part] = (grad * tau * weights[part, None] * difference).to(student.dtype)
        return grad_student, None, None, None, None


def logit_kl(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, rows: int | None = None
) -> torch.Tensor:
    """τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) per position, averaged over real tokens. Logits [B, T, V] or [B, V]
    (one prediction per sequence: the mean over the batch). Computed `rows` positions at a time (default: a
    chunk of CHUNK_BYTES)."""
    vocabulary = student.shape[-1]
    if student.dim() == 2:
        weights = torch.full((student.shape[0],), 1 / student.shape[0], device=student.device)
    else:
        real = mask.to(torch.float32)
        weights = (real / real.sum().clamp_min(1)).reshape(-1)
    rows = rows or max(1, CHUNK_BYTES // (4 * vocabulary))
    return _ChunkedLogitKL.apply(student.reshape(-1, vocabulary), teacher.reshape(-1, vocabulary), weights,
                                 float(temperature), rows)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: -log p(ids[:, t+1] | ids[:, :t+1]) from logits [B, T, V]. The rows go to cross_entropy flat, as
    [B*(T-1), V] (contiguous rows over the vocabulary), not as a transposed [B, V, T-1] view (a strided slow path)."""
    batch, steps, vocabulary = logits.shape
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocabulary), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(batch, steps - 1)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each real token given the ones before it."""
    return _masked_mean(next_token_nll(logits, ids), mask[:, 1:] * mask[:, :-1])


def squarehead(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Σ_l mean((h_S − h_T)²) / mean(h_T²) over the blocks' outputs [B, T, D], means over real tokens and features."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for h_s, h_t in zip(student, teacher, strict=True):
        h_s, h_t = h_s.float(), h_t.float()
        error = _masked_mean((h_s - h_t).pow(2).mean(-1), mask)
        total = total + error / _masked_mean(h_t.pow(2).mean(-1), mask).clamp_min(1e-12)
    return total


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: the mean of the last hidden states over real tokens ([B, T, D] -> [B, D])."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def embedding_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − cos(e_S, e_T), averaged over the batch."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


@dataclass
class Distiller:
    """The loss of a student batch against the frozen teacher."""

    teacher: nn.Module
    kind: ModelKind
    spec: DistillSpec

    def __post_init__(self) -> None:
        self.teacher.eval().requires_grad_(False)

    @property
    def needs_hidden(self) -> bool:
        return bool(self.spec.squarehead or self.spec.embedding)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        inputs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": self.needs_hidden}
        if self.kind is ModelKind.CAUSAL_LM:  # no KV cache: nothing generates here, and a recomputed block would grow it
            inputs["use_cache"] = False
        with torch.no_grad():
            teacher = self.teacher(**inputs)
        student = model(**inputs)
        spec, terms = self.spec, {}
        if spec.kl:
            terms["kl"] = (spec.kl, logit_kl(student.logits, teacher.logits, mask, spec.temperature))
        if spec.ce and self.kind is ModelKind.CAUSAL_LM:
            terms["ce"] = (spec.ce, next_token_ce(student.logits, ids, mask))
        if spec.squarehead:
            terms["squarehead"] = (spec.squarehead, squarehead(student.hidden_states[1:], teacher.hidden_states[1:], mask))
        if spec.embedding:
            pooled_s, pooled_t = mean_pool(student.hidden_states[-1], mask), mean_pool(teacher.hidden_states[-1], mask)
            distance = embedding_cosine_loss if spec.embedding_loss == "cosine" else F.mse_loss
            terms["embedding"] = (spec.embedding, distance(pooled_s.float(), pooled_t.float()))
        loss = sum(weight * value for weight, value in terms.values())
        return loss, {name: float(value.detach()) for name, (_, value) in terms.items()}
