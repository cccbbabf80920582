"""Symmetric Lanczos with full reorthogonalization, for several independent start vectors at
once (their products share one :meth:`HessianOperator.matmat` per step).

Full reorthogonalization (classical Gram-Schmidt, twice) against every stored Lanczos vector
keeps the basis orthonormal to working precision, so no ghost copies of converged eigenvalues
appear; its memory is ``steps x dim`` per run, fine for the tens to hundreds of steps these
estimators take.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def lanczos(matmat: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor, steps: int,
            stop: Callable[[int, torch.Tensor, torch.Tensor], bool] | None = None):
    """Run ``steps`` Lanczos iterations from each column of ``V0`` (dim, r).

    Args:
        matmat: ``X (dim, r) -> H X``.
        V0: start vectors (normalized here).
        steps: maximum number of iterations (Krylov dimension).
        stop: optional ``stop(j, alphas, betas) -> bool`` called after iteration ``j`` (1-based
            count) with the coefficients so far; returning True ends the run early.

    Returns:
        ``(alphas (r, m), betas (r, m), Q (r, m, dim), lengths (r,))``: ``betas[:, j]`` couples
        vectors ``j`` and ``j + 1`` (the last one is the residual norm). A run whose Krylov space
        is exhausted (``beta ~ 0``: an invariant subspace) stops there; its ``lengths`` entry is
        its number of valid steps and its later coefficients are zero.
    """
    dim, r = V0.shape
    steps = min(steps, dim)
    Q = torch.zeros(r, steps, dim, dtype=V0.dtype, device=V0.device)
    alphas = torch.zeros(r, steps, dtype=torch.float64)
    betas = torch.zeros(r, steps, dtype=torch.float64)
    lengths = torch.full((r,), steps, dtype=torch.long)
    active = torch.ones(r, dtype=torch.bool)
    q = V0 / V0.norm(dim=0, keepdim=True)
    scale = torch.zeros(r, dtype=torch.float64)
    m = 0
    for j in range(steps):
        Q[:, j] = q.T
        w = matmat(q)  # (dim, r)
        a = (q * w).sum(0)
        alphas[:, j] = a.double().cpu() * active
        basis = Q[:, : j + 1]  # (r, j+1, dim)
        wt = w.T.unsqueeze(-1)  # (r, dim, 1)
        for _ in range(2):  # full reorthogonalization, twice
            wt = wt - basis.transpose(1, 2) @ (basis @ wt)
        w = wt.squeeze(-1).T
        b = w.norm(dim=0).double().cpu()
        betas[:, j] = b * active
        m = j + 1
        scale = torch.maximum(scale, alphas[:, j].abs())
        done = active & (b <= 1e-10 * scale.clamp_min(1e-300))
        if done.any():
            lengths[done] = m
            active &= ~done
        if not active.any() or (stop is not None and stop(m, alphas[:, :m], betas[:, :m])):
            lengths[active] = m
            break
        q = w / b.clamp_min(1e-300).to(device=w.device, dtype=w.dtype)
        q[:, ~active.to(q.device)] = 0  # finished runs idle on zero vectors
    return alphas[:, :m], betas[:, :m], Q[:, :m], lengths


def tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """The (m, m) Lanczos matrix of one run (float64)."""
    m = alphas.shape[0]
    T = torch.diag(alphas)
    if m > 1:
        off = betas[: m - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T
