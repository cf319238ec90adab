"""Pure functions over embeddings: how closely a student's embeddings agree with the dense teacher's (cosine,
Spearman of the pairwise similarities with average ranks for ties, nearest-neighbour top-1 and recall@k)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEIGHBOURS = 10  # recall@10 of the dense model's nearest neighbours


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
