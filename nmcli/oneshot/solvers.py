"""Wanda, SparseGPT and ALPS for one weight matrix W [rows, K] (N:M groups along K), given its calibration statistics.

All take H = 2·XᵀX / n (the running mean over calibration tokens, methods.md §7): Wanda needs only its diagonal
(‖X_:,j‖² up to a constant factor, which does not change any ranking), SparseGPT and ALPS all of it. Pure functions of
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


ALPS_RHO = 0.1  # ADMM's first penalty, against the normalised Hessian's unit diagonal
ALPS_MAX_ITERATIONS = 300
ALPS_CHECK_EVERY = 3  # iterations between looks at how much of the mask still moves
ALPS_MIN_ITERATIONS = 30
ALPS_SETTLED = 3e-4  # mask entries moved since the last look, per kept weight, below which the mask has settled
ALPS_BACKSOLVE = 20  # conjugate-gradient steps that fit the kept weights once the mask is fixed


def _alps_penalty(rho: float, moved: float) -> float:
    """ALPS' schedule: the penalty grows faster while much of the mask still moves (`moved`: per kept weight)."""
    return rho * (1.3 if moved > 0.1 else 1.2 if moved > 0.005 else 1.1)


def alps(weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern, *, damp: float = 0.01) -> torch.Tensor:
    """The pruned W: the N:M mask and kept weights chosen together by ADMM on ‖(W − Ŵ)X‖² (ALPS, Meng et al. 2024).

    In the coordinates where H (damped) has a unit diagonal, B = W·‖X_j‖ (the start: Wanda's mask): alternate
    B ← argmin ‖(B₀ − B)H^½‖² + ρ/2‖B − D + V/ρ‖², a linear solve through H's eigendecomposition; D ← the N:M
    projection of B + V/ρ (the N largest |·| of each group); V ← V + ρ(B − D), with ρ growing until the mask
    settles. The kept weights of the projected B are then re-fitted with the mask fixed (`refine_kept`, ALPS_BACKSOLVE
    steps)."""
    h = hessian.double()
    h = h + damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
    scale = h.diagonal().clamp_min(torch.finfo(h.dtype).tiny).sqrt()
    eigenvalues, vectors = torch.linalg.eigh(h / scale[:, None] / scale[None, :])
    eigenvalues, vectors = eigenvalues.float(), vectors.float()
    start = weight.detach().float() * scale.float()
    target = start @ (vectors * eigenvalues) @ vectors.T  # B₀·H in the normalised coordinates

    def project(b: torch.Tensor) -> torch.Tensor:
        return b * _keep_top_n(b.abs(), pattern)

    def inverse_at(rho: float) -> torch.Tensor:  # (H + ρI)⁻¹
        return (vectors / (eigenvalues + rho)) @ vectors.T

    d, v, rho = project(start), torch.zeros_like(start), ALPS_RHO
    kept, support = float((d != 0).sum()), d != 0
    inverse = inverse_at(rho)
    b = start
    for iteration in range(1, ALPS_MAX_ITERATIONS + 1):
        b = (target - v + rho * d) @ inverse
        d = project(b + v / rho)
        v += rho * (b - d)
        if iteration % ALPS_CHECK_EVERY == 0:
            moved = float((support != (d != 0)).sum()) / kept
            support = d != 0
            if moved == 0 or (iteration >= ALPS_MIN_ITERATIONS and moved < ALPS_SETTLED):
                break
            rho = _alps_penalty(rho, moved)
            inverse = inverse_at(rho)
    pruned = (project(b) / scale.float()).to(weight.dtype)
    return refine_kept(weight, pruned, hessian, ALPS_BACKSOLVE, damp=damp)


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
