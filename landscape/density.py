"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan, Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
Density", ICML 2019. For a random unit vector ``v``, ``m`` Lanczos steps give a Gauss quadrature
``v^T f(H) v ~ sum_j w_j f(theta_j)`` (exact for polynomials of degree < 2m), with nodes
``theta_j`` the eigenvalues of the tridiagonal matrix and weights the squared first components
of its eigenvectors (every inner product and norm accumulated in float64). Averaging over runs
estimates ``Tr f(H) / dim``: the spectral density
``phi(t) = (1/dim) sum_i delta(t - lambda_i)``, which is then broadened by a Gaussian of width
``sigma`` and evaluated on a grid. The runs share their products (one block product per step).
The Lanczos vectors are kept (full reorthogonalization) when ``num_runs x lanczos_steps`` of
them fit ``memory_budget``, else only the last two of each run (``reorth="local"``: the
three-term recurrence, whose Gauss quadrature stays accurate in finite precision, Paige 1976,
Greenbaum 1989, Ubaru, Chen & Saad 2017). A NaN or Inf loss or product raises
:class:`landscape.errors.NonFiniteError` naming the batch
(``on_nonfinite="nan"``: a result of NaN values).

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator, spectral_density
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
    >>> esd = spectral_density(op, num_runs=4, lanczos_steps=20, seed=0)
    >>> round(float(esd.weights.sum()), 6)
    1.0
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .errors import NonFiniteError
from .hessian import HessianOperator, measuring, nonfinite_policy
from .lanczos import REORTH, lanczos, resolve_budget, tridiagonal, vectors_in
from .operator import records_engines
from .precision import full_precision
from .results import Result


@dataclass(repr=False)
class DensityResult(Result):
    """An SLQ spectral density.

    Attributes:
        nodes: (runs, m) quadrature nodes (Ritz values) of each run (a run whose Krylov space
            was exhausted early is padded with zero-weight nodes).
        weights: (runs, m) quadrature weights, each run's summing to 1, divided by the number of
            runs (all weights sum to 1).
        grid: evaluation points.
        density: the Gaussian-broadened density on ``grid`` (integrates to ~1).
        sigma: the broadening width.
        num_matvecs, seed, time_s: cost and reproducibility.
        reorthogonalization: ``"full"`` (every Lanczos vector kept) or ``"local"`` (the basis
            did not fit ``memory_budget``: the three-term recurrence; see :mod:`landscape.lanczos`).
        basis_bytes: the most memory the Lanczos vectors took (bytes).
        engines: vectors each engine of the operator computed for this result
            (``{"quadratic:taylor": 32, "product:fwd-rev": 16}``; :mod:`landscape.hessian`).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    num_matvecs: int
    seed: int
    time_s: float = 0.0
    engines: dict = field(default_factory=dict)
    reorthogonalization: str = ""
    basis_bytes: int = 0

    def moment(self, p: int) -> float:
        """The quadrature estimate of ``Tr(H^p) / dim``."""
        return float((self.weights * self.nodes.pow(p)).sum())


def quadrature(alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes and weights of one Lanczos run."""
    theta, S = torch.linalg.eigh(tridiagonal(alphas, betas))
    return theta, S[0].pow(2)


@records_engines
@full_precision()
def spectral_density(op: HessianOperator, num_runs: int = 4, lanczos_steps: int = 64, seed: int = 0, *,
                     grid_size: int = 1000, sigma: float | None = None,
                     on_nonfinite: str | None = None, reorth: str = "auto", memory_budget: int | None = None,
                     progress: bool = True) -> DensityResult:
    """Estimate the eigenvalue density of H.

    Args:
        num_runs: independent Rademacher start vectors (their products are batched).
        lanczos_steps: Krylov dimension of each run.
        seed: seed of the start vectors.
        grid_size: points of the density grid.
        sigma: Gaussian broadening; default 1% of the spectral range seen by the nodes.
        on_nonfinite: ``"raise"`` or ``"nan"`` (nodes, weights, grid and density one NaN each per
            run); default: the operator's.
        reorth: ``"full"`` keeps every Lanczos vector (``num_runs x lanczos_steps x dim``
            floats: 11.4 GB for the defaults on an 11.18M-parameter resnet18) and
            reorthogonalizes against all of them; ``"local"`` keeps two per run (the three-term
            recurrence, whose quadrature stays accurate: :mod:`landscape.lanczos`); ``"auto"``
            (default): full when it fits ``memory_budget``, else local.
        memory_budget: bytes the Lanczos vectors may take (default
            :func:`landscape.lanczos.default_budget`: 2 GiB of host memory, a quarter of a GPU's
            free memory).
        progress: a progress bar over the Lanczos steps (shown after 2 s; ``False`` silences it).

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
    """
    if num_runs < 1 or lanczos_steps < 1:
        raise ValueError(f"need num_runs >= 1 and lanczos_steps >= 1, got {num_runs}, {lanczos_steps}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0 (or None), got {sigma}")
    if reorth not in REORTH:
        raise ValueError(f"unknown reorth {reorth!r}; valid: {', '.join(REORTH)}")
    budget = resolve_budget(memory_budget, op.device)
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    steps = min(lanczos_steps, op.dim)
    if reorth == "auto":
        reorth = "full" if vectors_in(budget, op.dim, op.dtype) >= num_runs * steps else "local"
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    start = op.num_matvecs
    gen = torch.Generator().manual_seed(seed)
    V0 = torch.randint(0, 2, (op.dim, num_runs), generator=gen).to(device=op.device, dtype=op.dtype) * 2 - 1
    try:
        with measuring(op, "spectral_density") as checked:
            alphas, betas, lengths = lanczos(checked.matmat, V0, lanczos_steps, reorth=reorth, progress=progress,
                                             desc="spectral_density")
    except NonFiniteError:
        if policy == "raise":
            raise
        nan = torch.full((num_runs, 1), float("nan"), dtype=torch.float64)
        return DensityResult(nan, nan.clone(), torch.full((1,), float("nan"), dtype=torch.float64),
                             torch.full((1,), float("nan"), dtype=torch.float64), float("nan"),
                             op.num_matvecs - start, seed, time.perf_counter() - t0)
    m = alphas.shape[1]
    nodes = torch.zeros(num_runs, m, dtype=torch.float64)
    weights = torch.zeros(num_runs, m, dtype=torch.float64)
    for r in range(num_runs):  # a run that exhausted its Krylov space has fewer nodes (zero weights pad it)
        n = int(lengths[r])
        nodes[r, :n], weights[r, :n] = quadrature(alphas[r, :n], betas[r, :n])
        nodes[r, n:] = nodes[r, 0]
    weights = weights / num_runs
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    if sigma is None:
        sigma = 0.01 * width
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    z = (grid[:, None] - nodes.reshape(1, -1)) / sigma
    density = (weights.reshape(1, -1) * torch.exp(-0.5 * z * z)).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return DensityResult(nodes, weights, grid, density, float(sigma), op.num_matvecs - start, seed,
                         time.perf_counter() - t0, reorthogonalization=reorth,
                         basis_bytes=num_runs * (m if reorth == "full" else min(m, 2)) * op.dim * itemsize)
