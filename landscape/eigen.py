"""Top eigenvalues of the Hessian: Lanczos (default) and power iteration with deflation.

Lanczos (with full reorthogonalization, every inner product and norm accumulated in float64)
builds a Krylov basis and takes the Ritz pairs of its projected matrix; it stops when the wanted
Ritz pairs have relative residual ``||H y - theta y|| <= tol * |theta|`` (estimated as
``beta_m |s_m|``, then confirmed by explicit products). The basis grows one vector per step
within ``memory_budget``; when it is full, Lanczos restarts from its best Ritz vectors
(:func:`landscape.lanczos.thick_restart_lanczos`). A result that misses ``tol`` warns
(:class:`landscape.errors.ConvergenceWarning`), naming the residuals reached; ``strict=True``
raises instead. Power iteration with deflation mirrors what PyHessian does, for comparisons.

**Memory**: the basis takes ``steps x dim x 4`` bytes in float32 (44.7 MB per step for an
11.18M-parameter resnet18; top-3 usually converges in 15-40 steps), bounded by
``memory_budget``; add ``k`` Ritz vectors and their products.

A NaN or Inf loss or product raises :class:`landscape.errors.NonFiniteError` naming the
instrument and the batch; ``on_nonfinite="nan"`` returns NaN eigenvalues (and no vectors) instead.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator, top_eigenvalues
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
    >>> eig = top_eigenvalues(op, k=2, tol=1e-6, seed=0)
    >>> H = op.matmat(torch.eye(op.dim))  # the dense 67 x 67 Hessian, to compare with
    >>> exact = torch.linalg.eigvalsh(H).flip(0)[:2].tolist()
    >>> [round(e, 4) for e in eig.eigenvalues], [round(e, 4) for e in exact]
    ([0.8346, 0.6767], [0.8346, 0.6767])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ._progress import bar
from .errors import NonFiniteError, not_converged
from .fp64 import dots, normalize, norms
from .hessian import HessianOperator, measuring, nonfinite_policy
from .lanczos import gib, resolve_budget, thick_restart_lanczos, vectors_in
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
        converged: whether every pair met the tolerance (by the explicit residuals).
        iterations: Lanczos steps (or power iterations) taken.
        engines: vectors each engine of the operator computed for this result
            (``{"quadratic:taylor": 32, "product:fwd-rev": 16}``; :mod:`landscape.hessian`).
        tol: the relative residual asked for.
        reorthogonalization: ``"full"`` (every Lanczos vector kept) or ``"thick-restart"``
            (the basis did not fit ``memory_budget``: restarted from the best Ritz vectors).
        restarts: thick restarts made.
        basis_bytes: the most memory the Lanczos basis took (bytes).
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
    tol: float = float("nan")
    reorthogonalization: str = ""
    restarts: int = 0
    basis_bytes: int = 0
    _exclude = ("eigenvectors",)

    @property
    def relative_residuals(self) -> list:
        """``||H v - lambda v|| / |lambda|`` of each pair."""
        return [r / abs(v) if v else float("inf") for r, v in zip(self.residual_norms, self.eigenvalues)]


def _nan_result(k: int, method: str, seed: int, t0: float) -> EigenResult:
    nan = [float("nan")] * k
    return EigenResult(nan, [], list(nan), 0, False, 0, method, seed, time.perf_counter() - t0)


@records_engines
@full_precision()
def top_eigenvalues(op: HessianOperator, k: int = 3, tol: float = 1e-4, seed: int = 0, *, which: str = "LA",
                    max_iter: int | None = None, check_every: int = 1, on_nonfinite: str | None = None,
                    strict: bool = False, memory_budget: int | None = None, progress: bool = True) -> EigenResult:
    """The ``k`` extreme eigenpairs of H by Lanczos.

    Args:
        k: how many.
        tol: relative residual ``||Hv - lambda v|| / |lambda|`` to reach for each pair (the
            eigenvalue error is then about ``tol^2 |lambda| / gap``). With float32 products a
            tolerance much below 1e-6 may not be reachable.
        seed: seed of the Gaussian start vector.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic, ``"LM"``
            largest magnitude.
        max_iter: Lanczos steps at most (default ``min(dim, max(200, 20 k))``).
        check_every: test convergence every this many steps.
        on_nonfinite: ``"raise"`` or ``"nan"`` (see the module doc); default: the operator's.
        strict: raise :class:`landscape.errors.ConvergenceError` when a pair misses ``tol``
            (default: a :class:`landscape.errors.ConvergenceWarning` naming the residuals
            reached, and ``converged=False`` in the result).
        memory_budget: bytes the Lanczos basis may take (default
            :func:`landscape.lanczos.default_budget`: 2 GiB of host memory, a quarter of a GPU's
            free memory). It holds ``budget // (4 * dim)`` float32 vectors: when ``max_iter``
            steps do not fit, Lanczos restarts from its best Ritz vectors each time the basis is
            full (``reorthogonalization="thick-restart"``). Besides the basis, the instrument
            holds the ``k`` Ritz vectors, their products and the operator's own memory.
        progress: a progress bar over the Lanczos steps (shown after 2 s; ``False`` silences it).

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
        ConvergenceError: ``strict=True`` and a pair missed ``tol``.
    """
    if which not in WHICH:
        raise ValueError(f"unknown which {which!r}; valid: {', '.join(WHICH)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= op.dim:
        raise ValueError(f"k must be an integer in 1..{op.dim}, got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k):
        raise ValueError(f"max_iter must be an integer >= k ({k}), got {max_iter!r}")
    budget = resolve_budget(memory_budget, op.device)
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    try:
        with measuring(op, "top_eigenvalues") as checked:
            result = _lanczos_eigen(checked, k, tol, seed, which, max_iter, check_every, budget, progress, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        return _nan_result(k, "lanczos", seed, t0)
    if not result.converged:
        rel = ", ".join(f"{r:.2g}" for r in result.relative_residuals)
        not_converged(f"top_eigenvalues did not converge: relative residuals {rel} after {result.iterations} "
                      f"Lanczos steps, tolerance {tol:g}; raise max_iter (now {result.iterations} steps at most) "
                      "or tol, or pass strict=True to make this an error", strict)
    return result


def _lanczos_eigen(op, k, tol, seed, which, max_iter, check_every, budget, progress, t0) -> EigenResult:
    start = op.num_matvecs
    max_iter = min(op.dim, max_iter or max(200, 20 * k))
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    fit = vectors_in(budget, op.dim, op.dtype)
    if fit < k + 2:
        raise ValueError(f"top_eigenvalues: a memory_budget of {gib(budget)} holds {fit} Lanczos vectors of "
                         f"{op.dim} parameters; k={k} needs at least {k + 2} ({gib((k + 2) * op.dim * itemsize)}): "
                         "raise memory_budget")
    window = max_iter + 1 if fit > max_iter else fit
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    run = thick_restart_lanczos(op.matvec, v0, k, which=which, tol=tol, max_steps=max_iter, window=window,
                                check_every=check_every, progress=progress, desc="top_eigenvalues")
    Y, _ = normalize(run["vectors"])
    HY = op.matmat(Y)
    lam = dots(Y, HY)
    res = norms(HY - Y * lam.to(Y.dtype))
    found = Y.shape[1]
    converged = bool((res <= tol * lam.abs().clamp_min(1e-30) * (1 + 1e-6)).all()) and found == k
    vecs = [{n: t.clone() for n, t in op.unflatten(Y[:, i]).items()} for i in range(found)]
    return EigenResult(lam.cpu().tolist(), vecs, res.cpu().tolist(), op.num_matvecs - start, converged, run["steps"],
                       "lanczos", seed, time.perf_counter() - t0, tol=tol,
                       reorthogonalization="full" if run["restarts"] == 0 else "thick-restart",
                       restarts=run["restarts"], basis_bytes=run["peak_vectors"] * op.dim * itemsize)


@records_engines
@full_precision()
def power_iteration(op: HessianOperator, k: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    seed: int = 0, *, on_nonfinite: str | None = None, strict: bool = False,
                    progress: bool = True) -> EigenResult:
    """Power iteration with deflation (as in PyHessian): for each eigenpair, iterate
    ``v <- H v`` orthogonalized against the pairs found so far until the relative change of the
    Rayleigh quotient is below ``tol``. Converges at rate ``lambda_2 / lambda_1``; for parity
    with PyHessian, not for accuracy. ``on_nonfinite``, ``strict`` and ``progress`` as for
    :func:`top_eigenvalues` (a pair that used ``max_iter`` iterations without meeting ``tol``
    warns, or raises with ``strict=True``)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= op.dim:
        raise ValueError(f"k must be an integer in 1..{op.dim}, got {k!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    try:
        with measuring(op, "power_iteration") as checked:
            result = _power(checked, k, max_iter, tol, seed, progress, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        return _nan_result(k, "power", seed, t0)
    if not result.converged:
        rel = ", ".join(f"{r:.2g}" for r in result.relative_residuals)
        not_converged(f"power_iteration: a pair did not settle within max_iter={max_iter} iterations "
                      f"(relative residuals {rel}); raise max_iter, or use top_eigenvalues (Lanczos)", strict)
    return result


def _power(op, k, max_iter, tol, seed, progress, t0) -> EigenResult:
    start = op.num_matvecs
    gen = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    values: list[float] = []
    iters, converged = 0, True
    with bar(progress, k * max_iter, "power_iteration") as pbar:
        for _ in range(k):
            v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
            lam_prev = None
            ok = False
            for _ in range(max_iter):
                for u in found:
                    v = v - dots(u, v).to(v.dtype) * u
                v, _ = normalize(v)
                w = op.matvec(v)
                for u, lu in zip(found, values):
                    w = w - (lu * dots(u, v)).to(w.dtype) * u
                lam = float(dots(v, w))
                iters += 1
                pbar.update(1)
                v = w
                if lam_prev is not None and abs(lam - lam_prev) <= tol * (abs(lam_prev) + 1e-12):
                    ok = True
                    break
                lam_prev = lam
            converged &= ok
            v, _ = normalize(v)
            found.append(v)
            values.append(lam)
    Y = torch.stack(found, 1)
    HY = op.matmat(Y)
    lam_t = dots(Y, HY)
    res = norms(HY - Y * lam_t.to(Y.dtype))
    vecs = [{n: t.clone() for n, t in op.unflatten(Y[:, i]).items()} for i in range(k)]
    return EigenResult(values, vecs, res.cpu().tolist(), op.num_matvecs - start, converged, iters, "power", seed,
                       time.perf_counter() - t0, tol=tol)
