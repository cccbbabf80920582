"""Stochastic trace estimators of the Hessian: Hutchinson, Hutch++, per-block traces, and the
noise-weighted trace Tr(H Sigma) with the second-order prediction of a loss increase.

* Hutchinson (1989): ``Tr(H) = E[z^T H z]`` for Rademacher ``z``; the estimate is the mean over
  probes and its standard error the sample standard deviation over ``sqrt(#probes)``.
* Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021): a third of the budget sketches the top of
  the spectrum (``Q = orth(H S)``), whose trace is taken exactly (``Tr(Q^T H Q)``); Hutchinson on
  the deflated rest. Much lower variance when a few eigenvalues dominate.

Stopping on a target standard error never looks at the sign of the running estimate
(PyHessian's rule ``abs(mean - prev) / (abs(prev) + 1e-6) < tol`` stops early, or never, when the
estimate crosses zero).

A NaN or Inf loss, gradient or product raises :class:`landscape.errors.NonFiniteError` naming
the estimator and the batch; ``on_nonfinite="nan"`` returns a result of NaN values instead.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator, hessian_trace
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
    >>> tr = hessian_trace(op, num_matvecs=30, method="hutch++", seed=0)
    >>> tr.num_matvecs
    30
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .errors import NonFiniteError
from .hessian import HessianOperator, measuring, nonfinite_policy
from .operator import records_engines
from .precision import full_precision
from .results import Result

TRACE_METHODS = ("hutchinson", "hutch++")
NAN = float("nan")


@dataclass(repr=False)
class TraceResult(Result):
    """A trace estimate.

    Attributes:
        value: the estimate of Tr(H) (or Tr(H Sigma)).
        std_error: its standard error.
        num_matvecs: Hessian-vector products spent.
        method: ``"hutchinson"`` or ``"hutch++"``.
        seed: seed of the probes.
        samples: the per-probe quadratic forms of the stochastic part.
        time_s: wall time.
        engines: vectors each engine of the operator computed for this result
            (``{"quadratic:taylor": 32, "product:fwd-rev": 16}``; :mod:`landscape.hessian`).
    """

    value: float
    std_error: float
    num_matvecs: int
    method: str
    seed: int
    samples: list = field(default_factory=list)
    time_s: float = 0.0
    engines: dict = field(default_factory=dict)
    _exclude = ("samples",)


@dataclass(repr=False)
class BlockTraceResult(Result):
    """Per-block traces ``Tr(H_bb)`` of the diagonal blocks (one per layer or parameter)."""

    values: dict
    std_errors: dict
    total: float
    total_std_error: float
    num_matvecs: int
    seed: int
    time_s: float = 0.0
    engines: dict = field(default_factory=dict)


@dataclass(repr=False)
class LossIncreasePrediction(Result):
    """Second-order prediction of the expected loss increase under a random perturbation
    ``delta ~ (mu, Sigma)``: ``E[dL] ~ g.mu + 1/2 (mu^T H mu + Tr(H Sigma))``."""

    predicted: float
    gradient_term: float
    mean_curvature_term: float
    trace_term: float
    trace_std_error: float
    loss: float
    num_matvecs: int
    seed: int
    engines: dict = field(default_factory=dict)


def _probes(dim: int, k: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    z = torch.randint(0, 2, (dim, k), generator=gen, dtype=torch.int8).to(device=device, dtype=dtype)
    return z.mul_(2).sub_(1)


def _quadratic_forms(op, Z: torch.Tensor) -> torch.Tensor:
    """``z_i^T H z_i`` per column (Taylor mode where the operator has it; duck-typed operators
    with only ``matmat`` get ``z * (H z)``)."""
    quad = getattr(op, "quadratic_forms", None)
    return quad(Z) if quad is not None else (Z * op.matmat(Z)).sum(0)


def _check_budget(num_matvecs: int, minimum: int, what: str) -> None:
    if not isinstance(num_matvecs, int) or num_matvecs < minimum:
        raise ValueError(f"{what} needs num_matvecs >= {minimum}, got {num_matvecs!r}")


def _hutchinson(op: HessianOperator, num_matvecs: int, gen, block_size: int, target_std_error, scale=None):
    samples: list[float] = []
    used = 0
    while used < num_matvecs:
        k = min(block_size, num_matvecs - used)
        z = _probes(op.dim, k, gen, op.dtype, op.device)
        if scale is not None:
            z = z * scale[:, None]
        samples += _quadratic_forms(op, z).double().tolist()
        used += k
        if target_std_error is not None and len(samples) >= 2:
            se = torch.tensor(samples, dtype=torch.float64).std().item() / math.sqrt(len(samples))
            if se <= target_std_error:
                break
    return samples, used


@records_engines
@full_precision()
def hessian_trace(op: HessianOperator, num_matvecs: int = 64, method: str = "hutch++", seed: int = 0, *,
                  target_std_error: float | None = None, block_size: int = 16,
                  on_nonfinite: str | None = None) -> TraceResult:
    """Estimate ``Tr(H)``.

    Args:
        op: the Hessian.
        num_matvecs: the budget of Hessian-vector products (the maximum when
            ``target_std_error`` is set).
        method: ``"hutchinson"`` or ``"hutch++"``.
        seed: seed of the Rademacher probes (same seed, same estimate).
        target_std_error: stop as soon as the standard error is at most this.
        block_size: probes per block product (:meth:`HessianOperator.matmat`).
        on_nonfinite: ``"raise"`` or ``"nan"`` (see the module doc); default: the operator's
            (``"raise"``).

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; valid: {', '.join(TRACE_METHODS)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if method == "hutchinson":
        _check_budget(num_matvecs, 2, "Hutchinson")
    else:
        _check_budget(num_matvecs, 6, "Hutch++")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    try:
        with measuring(op, "hessian_trace") as checked:
            return _hessian_trace(checked, num_matvecs, method, seed, target_std_error, block_size, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        return TraceResult(NAN, NAN, num_matvecs, method, seed, [], time.perf_counter() - t0)


def _hessian_trace(op, num_matvecs, method, seed, target_std_error, block_size, t0) -> TraceResult:
    gen = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        samples, used = _hutchinson(op, num_matvecs, gen, block_size, target_std_error)
        s = torch.tensor(samples, dtype=torch.float64)
        return TraceResult(s.mean().item(), s.std().item() / math.sqrt(len(s)), used, method, seed, samples,
                           time.perf_counter() - t0)
    s_dim = min(num_matvecs // 3, op.dim)
    S = _probes(op.dim, s_dim, gen, op.dtype, op.device)
    Y = op.matmat(S)
    Q, _ = torch.linalg.qr(Y.double())
    Q = Q.to(op.dtype)
    t_exact = float(_quadratic_forms(op, Q).double().sum())  # Tr(Q^T H Q): forms, not products
    used = 2 * s_dim
    samples: list[float] = []
    while used < num_matvecs:
        k = min(block_size, num_matvecs - used)
        G = _probes(op.dim, k, gen, op.dtype, op.device)
        G = G - Q @ (Q.T @ G)
        samples += _quadratic_forms(op, G).double().tolist()
        used += k
        if target_std_error is not None and len(samples) >= 2:
            if torch.tensor(samples).std().item() / math.sqrt(len(samples)) <= target_std_error:
                break
    s = torch.tensor(samples, dtype=torch.float64)
    se = s.std().item() / math.sqrt(len(s)) if len(s) > 1 else float("nan")
    return TraceResult(t_exact + (s.mean().item() if len(s) else 0.0), se, used, method, seed, samples,
                       time.perf_counter() - t0)


@records_engines
@full_precision()
def block_traces(op: HessianOperator, num_matvecs: int = 64, seed: int = 0, *, group: str = "module",
                 block_size: int = 16, on_nonfinite: str | None = None) -> BlockTraceResult:
    """Traces of the diagonal blocks of H in one pass of Hutchinson probes.

    ``Tr(H_bb) = E[z_b^T (H z)_b]`` for every block ``b`` at once (the cross terms vanish in
    expectation), so one set of products gives every block.

    Args:
        group: ``"module"`` (a layer's weight and bias together) or ``"param"`` (each tensor).
        on_nonfinite: ``"raise"`` or ``"nan"`` (NaN for every block); default: the operator's.

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
    """
    if group not in ("module", "param"):
        raise ValueError(f"group must be 'module' or 'param', got {group!r}")
    _check_budget(num_matvecs, 2, "block_traces")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    keys = {n: (n.rsplit(".", 1)[0] if group == "module" and "." in n else n) for n in op.names}
    try:
        with measuring(op, "block_traces") as checked:
            return _block_traces(checked, num_matvecs, seed, keys, block_size, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        nan = dict.fromkeys(keys.values(), NAN)
        return BlockTraceResult(nan, dict(nan), NAN, NAN, num_matvecs, seed, time.perf_counter() - t0)


def _block_traces(op, num_matvecs, seed, keys, block_size, t0) -> BlockTraceResult:
    gen = torch.Generator().manual_seed(seed)
    slices = op.block_slices()
    per: dict[str, list[torch.Tensor]] = {}
    used = 0
    while used < num_matvecs:
        k = min(block_size, num_matvecs - used)
        z = _probes(op.dim, k, gen, op.dtype, op.device)
        prod = (z * op.matmat(z)).double()
        block: dict[str, torch.Tensor] = {}
        for n, sl in slices.items():  # per probe, sum the parameters of a group
            block[keys[n]] = block.get(keys[n], 0) + prod[sl].sum(0)
        for key, v in block.items():
            per.setdefault(key, []).append(v)
        used += k
    samples = {key: torch.cat(chunks) for key, chunks in per.items()}
    total = torch.stack(list(samples.values())).sum(0)
    root = math.sqrt(used)
    return BlockTraceResult({k: v.mean().item() for k, v in samples.items()},
                            {k: v.std().item() / root for k, v in samples.items()},
                            total.mean().item(), total.std().item() / root, used, seed, time.perf_counter() - t0)


def expand_to_params(op: HessianOperator, values, name: str = "variances") -> torch.Tensor:
    """A flat vector (length ``op.dim``) from per-parameter values.

    ``values`` is a flat tensor, or a dict by parameter name of tensors that broadcast against
    the parameter from the left (a per-output-channel ``(C,)`` vector for a ``(C, ...)`` weight);
    parameters missing from the dict get 0.
    """
    if isinstance(values, torch.Tensor):
        if values.shape != (op.dim,):
            raise ValueError(f"{name}: a flat vector must have length {op.dim}, got {tuple(values.shape)}")
        return values.to(device=op.device, dtype=op.dtype)
    unknown = set(values) - set(op.names)
    if unknown:
        raise ValueError(f"{name}: not parameters of the operator: {sorted(unknown)[:5]}")
    parts = []
    for n, shape in zip(op.names, op.shapes):
        if n not in values:
            parts.append(torch.zeros(shape.numel(), dtype=op.dtype, device=op.device))
            continue
        v = torch.as_tensor(values[n], dtype=op.dtype, device=op.device)
        v = v.reshape(v.shape + (1,) * (len(shape) - v.dim()))
        try:
            parts.append(v.expand(shape).reshape(-1))
        except RuntimeError:
            raise ValueError(f"{name}[{n!r}] of shape {tuple(values[n].shape)} does not broadcast to the "
                             f"parameter's shape {tuple(shape)}") from None
    return torch.cat(parts)


@records_engines
@full_precision()
def noise_weighted_trace(op: HessianOperator, variances, num_matvecs: int = 64, seed: int = 0, *,
                         target_std_error: float | None = None, block_size: int = 16,
                         on_nonfinite: str | None = None) -> TraceResult:
    """Estimate ``Tr(H Sigma)`` for a diagonal covariance ``Sigma`` given per parameter.

    Hutchinson with probes ``Sigma^{1/2} z``: ``E[z^T Sigma^{1/2} H Sigma^{1/2} z] = Tr(H Sigma)``.
    For quantization noise, ``variances`` is the per-channel variance of ``Q(W) - W``.

    Args:
        variances: flat tensor or dict by parameter name (see :func:`expand_to_params`); >= 0.
        on_nonfinite: ``"raise"`` or ``"nan"``; default: the operator's.

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
    """
    _check_budget(num_matvecs, 2, "noise_weighted_trace")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    var = expand_to_params(op, variances)
    if bool((var < 0).any()) or not bool(torch.isfinite(var).all()):
        raise ValueError("variances must be finite and >= 0")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    try:
        with measuring(op, "noise_weighted_trace") as checked:
            samples, used = _hutchinson(checked, num_matvecs, gen, block_size, target_std_error, scale=var.sqrt())
    except NonFiniteError:
        if policy == "raise":
            raise
        return TraceResult(NAN, NAN, num_matvecs, "hutchinson", seed, [], time.perf_counter() - t0)
    s = torch.tensor(samples, dtype=torch.float64)
    return TraceResult(s.mean().item(), s.std().item() / math.sqrt(len(s)), used, "hutchinson", seed, samples,
                       time.perf_counter() - t0)


@records_engines
@full_precision()
def predicted_loss_increase(op: HessianOperator, variances, mean=None, num_matvecs: int = 64, seed: int = 0,
                            block_size: int = 16, *, on_nonfinite: str | None = None) -> LossIncreasePrediction:
    """Second-order prediction of the expected loss increase under ``delta ~ (mu, Sigma)``.

    ``E[L(w + delta)] - L(w) ~ g.mu + 1/2 (mu^T H mu + Tr(H Sigma))`` with ``g`` the gradient.
    Costs one gradient pass, one product for ``mu^T H mu`` (if ``mean`` is given) and
    ``num_matvecs`` products for the trace.

    Args:
        on_nonfinite: ``"raise"`` or ``"nan"`` (every term NaN); default: the operator's.

    Raises:
        NonFiniteError: a NaN or Inf loss, gradient or product (``on_nonfinite="raise"``).
    """
    _check_budget(num_matvecs, 2, "predicted_loss_increase")
    policy = nonfinite_policy(op, on_nonfinite)
    try:
        with measuring(op, "predicted_loss_increase") as checked:
            g, loss = checked.gradient()
            tr = noise_weighted_trace(checked, variances, num_matvecs, seed, block_size=block_size,
                                      on_nonfinite="raise")
            used = tr.num_matvecs
            g_mu = mu_h_mu = 0.0
            if mean is not None:
                mu = expand_to_params(op, mean, "mean")
                g_mu = float(g.double() @ mu.double())
                mu_h_mu = float(mu.double() @ checked.matvec(mu).double())
                used += 1
    except NonFiniteError:
        if policy == "raise":
            raise
        return LossIncreasePrediction(NAN, NAN, NAN, NAN, NAN, NAN, num_matvecs + (mean is not None), seed)
    pred = g_mu + 0.5 * (mu_h_mu + tr.value)
    return LossIncreasePrediction(pred, g_mu, 0.5 * mu_h_mu, 0.5 * tr.value, 0.5 * tr.std_error, loss, used, seed)
