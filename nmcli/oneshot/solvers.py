"""Wanda and SparseGPT for one weight matrix W [rows, K] (N:M groups along K), given its calibration statistics.

Both take H = 2·XᵀX / n (the running mean over calibration tokens, methods.md §7): Wanda needs only its diagonal
(‖X_:,j‖² up to a constant factor, which does not change any ranking), SparseGPT all of it. Pure functions of
tensors; float64 inside SparseGPT for a stable Cholesky on small layers, float32 for large ones.
"""

from __future__ import annotations

import torch

from nmcli.errors import NMSparseError
from nmcli.nm import NMPattern, group_mask


def _keep_top_n(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep mask [rows, K]: in every group of M along K the N largest scores, ties to the lower index (core rule)."""
    rows, k = scores.shape
    return group_mask(scores.reshape(-1, pattern.m), pattern.n).reshape(rows, k)


def wanda(weight: torch.Tensor, hessian_diag: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """|W_ij| · ‖X_:,j‖₂ scores; the N:M keep mask of W (weights are not updated)."""
    norms = hessian_diag.clamp_min(0).sqrt().to(torch.float64)
    return _keep_top_n(weight.detach().to(torch.float64).abs() * norms, pattern)


class SingularHessian(NMSparseError):
    """H + damping is not positive definite: the caller may retry with more damping."""


def _inverse_cholesky_upper(hessian: torch.Tensor, damp: float, where: str) -> torch.Tensor:
    """U with UᵀU = (H + λ·mean(diag H)·I)⁻¹, U upper triangular."""
    eye = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    damped = hessian + damp * hessian.diagonal().mean() * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    if info:
        raise SingularHessian(f"{where}: the calibration Hessian is not positive definite at --damp {damp}")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern, *, damp: float = 0.01, block: int = 128,
    where: str = "layer",
) -> torch.Tensor:
    """The pruned and updated W (same dtype): exactly N:M along K, the kept weights corrected by the OBS update.

    Frantar & Alistarh 2023, with the mask of columns j..j+M-1 chosen at column j (j mod M = 0) as the N largest
    w²/U_jj² of each row, errors propagated within the block column by column and to the rest after the block.
    """
    rows, k = weight.shape
    work_dtype = torch.float64 if k <= 2048 else torch.float32
    w = weight.detach().to(work_dtype).clone()
    h = hessian.to(work_dtype).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_cholesky_upper(h, damp, where)
    block = max(pattern.m, block // pattern.m * pattern.m)  # a block holds whole groups
    for start in range(0, k, block):
        stop = min(start + block, k)
        w1, u1 = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.zeros_like(w1)
        keep = torch.zeros_like(w1, dtype=torch.bool)
        diag = u1.diagonal()
        for i in range(stop - start):
            if i % pattern.m == 0:
                scores = w1[:, i : i + pattern.m] ** 2 / diag[i : i + pattern.m] ** 2
                keep[:, i : i + pattern.m] = _keep_top_n(scores, pattern)
            column = w1[:, i]
            quantized = column * keep[:, i]
            error = (column - quantized) / diag[i]
            w1[:, i:] -= error.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = quantized
            errors[:, i] = error
        w[:, start:stop] = w1
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w.to(weight.dtype)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖WX − ŴX‖² / ‖WX‖² on the calibration inputs, from H ∝ XᵀX (no activations kept)."""
    w, delta, h = weight.double(), (weight - pruned).double(), hessian.double()
    total = float(((w @ h) * w).sum())
    return float(((delta @ h) * delta).sum()) / total if total > 0 else 0.0


def refine_kept(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, iterations: int, *,
                damp: float = 0.01) -> torch.Tensor:
    """The kept weights of `pruned` re-fitted to the dense layer's outputs with the mask fixed (ALPS' last step,
    Meng et al. 2024): minimise ‖(W − Ŵ)X‖² + λ‖W − Ŵ‖² over the kept entries, λ = damp · mean(diag H), by
    `iterations` steps of conjugate gradients preconditioned by diag H, every row its own problem. Pruned entries
    stay exact zeros; each step lowers the objective (a convex quadratic on the kept entries)."""
    work = torch.float64 if weight.shape[1] <= 2048 else torch.float32
    w, h = weight.detach().to(work), hessian.to(work)
    h = h + damp * h.diagonal().mean() * torch.eye(len(h), dtype=work, device=h.device)
    keep = pruned != 0
    x = pruned.detach().to(work).clone()
    diag = h.diagonal().clamp_min(torch.finfo(work).tiny)
    residual = ((w - x) @ h) * keep
    z = residual / diag
    direction, rz = z, (residual * z).sum(1, keepdim=True)
    for _ in range(iterations):
        q = (direction @ h) * keep
        curvature = (direction * q).sum(1, keepdim=True)
        step = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(work).tiny), 0)
        x += step * direction
        residual -= step * q
        z = residual / diag
        rz_next = (residual * z).sum(1, keepdim=True)
        direction = z + torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(work).tiny), 0) * direction
        rz = rz_next
    return (x * keep).to(weight.dtype)
