"""Top eigenvalues of the Hessian: Lanczos (default) and power iteration with deflation.

Lanczos (with full reorthogonalization) builds a Krylov basis and takes the Ritz pairs of its
tridiagonal matrix; it stops when the wanted Ritz pairs have relative residual
``||H y - theta y|| <= tol * |theta|`` (estimated as ``beta_m |s_m|``, then confirmed by explicit
products). Power iteration with deflation mirrors what PyHessian does, for comparisons.

A NaN or Inf loss or product raises :class:`landscape.errors.NonFiniteError` naming the
instrument and the batch; ``on_nonfinite="nan"`` returns NaN eigenvalues (and no vectors) instead.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator, top_eigenvalues
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
    >>> eig = top_eigenvalues(op, k=2, tol=1e-6, seed=0)
    >>> len(eig.eigenvalues)
    2
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import NonFiniteError
from .hessian import HessianOperator, measuring, nonfinite_policy
from .lanczos import lanczos, tridiagonal
from .operator import records_engines
from .precision import full_precision
from .results import Result

WHICH = ("LA", "SA", "LM")


@dataclass(repr=False)
class EigenResult(Result):
    """Eigenpairs of the Hessian.

    Attributes:
        eigenvalues: ``k`` values, in the order asked for (``LA``: descending).
        eigenvectors: ``k`` dicts by parameter name of parameter-shaped tensors (unit norm over
            all selected parameters together).
        residual_norms: ``||H v - lambda v||`` of each pair, from explicit products.
        num_matvecs: products spent (including the ``k`` residual checks).
        converged: whether every pair met the tolerance.
        iterations: Lanczos steps (or power iterations) taken.
        engines: vectors each engine of the operator computed for this result
            (``{"quadratic:taylor": 32, "product:fwd-rev": 16}``; :mod:`landscape.hessian`).
    """

    eigenvalues: list
    eigenvectors: list
    residual_norms: list
    num_matvecs: int
    converged: bool
    iterations: int
    method: str
    seed: int
    time_s: float = 0.0
    engines: dict = field(default_factory=dict)
    _exclude = ("eigenvectors",)


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _nan_result(k: int, method: str, seed: int, t0: float) -> EigenResult:
    nan = [float("nan")] * k
    return EigenResult(nan, [], list(nan), 0, False, 0, method, seed, time.perf_counter() - t0)


@records_engines
@full_precision()
def top_eigenvalues(op: HessianOperator, k: int = 3, tol: float = 1e-4, seed: int = 0, *, which: str = "LA",
                    max_iter: int | None = None, check_every: int = 1, on_nonfinite: str | None = None) -> EigenResult:
    """The ``k`` extreme eigenpairs of H by Lanczos.

    Args:
        k: how many.
        tol: relative residual ``||Hv - lambda v|| / |lambda|`` to reach for each pair (the
            eigenvalue error is then about ``tol^2 |lambda| / gap``).
        seed: seed of the Gaussian start vector.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic, ``"LM"``
            largest magnitude.
        max_iter: Lanczos steps at most (default ``min(dim, max(200, 20 k))``).
        check_every: test convergence every this many steps.
        on_nonfinite: ``"raise"`` or ``"nan"`` (see the module doc); default: the operator's.

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
    """
    if which not in WHICH:
        raise ValueError(f"unknown which {which!r}; valid: {', '.join(WHICH)}")
    if not isinstance(k, int) or not 1 <= k <= op.dim:
        raise ValueError(f"k must be an integer in 1..{op.dim}, got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    try:
        with measuring(op, "top_eigenvalues") as checked:
            return _lanczos_eigen(checked, k, tol, seed, which, max_iter, check_every, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        return _nan_result(k, "lanczos", seed, t0)


def _lanczos_eigen(op, k, tol, seed, which, max_iter, check_every, t0) -> EigenResult:
    start = op.num_matvecs
    max_iter = min(op.dim, max_iter or max(200, 20 * k))
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(op.dim, 1, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)

    def stop(m, a, b):
        if m < k or (m % check_every and m < max_iter):
            return False
        theta, S = torch.linalg.eigh(tridiagonal(a[0], b[0]))
        idx = _order(theta, which)[:k]
        res = b[0, -1] * S[-1, idx].abs()
        return bool((res <= tol * theta[idx].abs().clamp_min(1e-30)).all())

    alphas, betas, Q, lengths = lanczos(op.matmat, v0, max_iter, stop)
    m = int(lengths[0])
    theta, S = torch.linalg.eigh(tridiagonal(alphas[0, :m], betas[0, :m]))
    idx = _order(theta, which)[: min(k, m)]
    Y = (Q[0, :m].T.double() @ S[:, idx].to(Q.device)).to(op.dtype)  # (dim, k)
    Y = Y / Y.norm(dim=0, keepdim=True)
    HY = op.matmat(Y)
    lam = (Y * HY).sum(0)  # Rayleigh quotients
    res = (HY - Y * lam).norm(dim=0)
    converged = bool((res.double() <= tol * lam.double().abs().clamp_min(1e-30) * (1 + 1e-6)).all()) and len(idx) == k
    vecs = [{n: t.clone() for n, t in op.unflatten(Y[:, i]).items()} for i in range(Y.shape[1])]
    return EigenResult(lam.double().tolist(), vecs, res.double().tolist(), op.num_matvecs - start, converged, m,
                       "lanczos", seed, time.perf_counter() - t0)


@records_engines
@full_precision()
def power_iteration(op: HessianOperator, k: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    seed: int = 0, *, on_nonfinite: str | None = None) -> EigenResult:
    """Power iteration with deflation (as in PyHessian): for each eigenpair, iterate
    ``v <- H v`` orthogonalized against the pairs found so far until the relative change of the
    Rayleigh quotient is below ``tol``. Converges at rate ``lambda_2 / lambda_1``; for parity
    with PyHessian, not for accuracy. ``on_nonfinite`` as for :func:`top_eigenvalues`."""
    if not isinstance(k, int) or not 1 <= k <= op.dim:
        raise ValueError(f"k must be an integer in 1..{op.dim}, got {k!r}")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    try:
        with measuring(op, "power_iteration") as checked:
            return _power(checked, k, max_iter, tol, seed, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        return _nan_result(k, "power", seed, t0)


def _power(op, k, max_iter, tol, seed, t0) -> EigenResult:
    start = op.num_matvecs
    gen = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    values: list[float] = []
    iters, converged = 0, True
    for _ in range(k):
        v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
        lam_prev = None
        ok = False
        for _ in range(max_iter):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            w = op.matvec(v)
            for u, lu in zip(found, values):
                w = w - lu * (u @ v) * u
            lam = float(v @ w)
            iters += 1
            v = w
            if lam_prev is not None and abs(lam - lam_prev) <= tol * (abs(lam_prev) + 1e-12):
                ok = True
                break
            lam_prev = lam
        converged &= ok
        v = v / v.norm()
        found.append(v)
        values.append(lam)
    Y = torch.stack(found, 1)
    HY = op.matmat(Y)
    lam_t = (Y * HY).sum(0)
    res = (HY - Y * lam_t).norm(dim=0)
    vecs = [{n: t.clone() for n, t in op.unflatten(Y[:, i]).items()} for i in range(k)]
    return EigenResult(values, vecs, res.double().tolist(), op.num_matvecs - start, converged, iters, "power", seed,
                       time.perf_counter() - t0)
