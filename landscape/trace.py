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
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
    >>> tr = hessian_trace(op, num_matvecs=30, method="hutch++", seed=0)
    >>> H = op.matmat(torch.eye(op.dim))  # the dense 67 x 67 Hessian, to compare with
    >>> tr.num_matvecs, abs(tr.value - H.trace().item()) < 3 * tr.std_error
    (30, True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ._progress import bar
from .errors import NonFiniteError, not_converged
from .fp64 import dots, orthonormalize, project_out
from .hessian import HessianOperator, measuring, nonfinite_policy
from .operator import records_engines
from .precision import full_precision
from .results import Result

TRACE_METHODS = ("hutchinson", "hutch++")
NAN = float("nan")
#: products when neither a budget nor a target is given
DEFAULT_MATVECS = 64
#: products at most when a target error is given without a budget
MAX_MATVECS = 1024


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
    return quad(Z) if quad is not None else dots(Z, op.matmat(Z))


def _check_budget(num_matvecs: int, minimum: int, what: str) -> None:
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < minimum:
        raise ValueError(f"{what} needs num_matvecs >= {minimum}, got {num_matvecs!r}")


class _Stop:
    """The stopping rule of a Hutchinson-type estimator: whether the running mean of its samples
    (plus a fixed ``offset``, Hutch++'s exact part) has reached the target standard error,
    absolute or relative to the estimate. Validates the targets."""

    def __init__(self, target_std_error, target_rel_error, offset: float = 0.0):
        for name, v in (("target_std_error", target_std_error), ("target_rel_error", target_rel_error)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not (v > 0 and math.isfinite(v))):
                raise ValueError(f"{name} must be a finite number > 0 (or None), got {v!r}")
        self.abs, self.rel, self.offset = target_std_error, target_rel_error, offset

    @property
    def wanted(self) -> bool:
        return self.abs is not None or self.rel is not None

    def budget(self, num_matvecs: int | None) -> int:
        """The product budget: as given, else :data:`DEFAULT_MATVECS` (no target) or
        :data:`MAX_MATVECS` (a target)."""
        if num_matvecs is None:
            return MAX_MATVECS if self.wanted else DEFAULT_MATVECS
        return num_matvecs

    def reached(self, samples: list) -> bool:
        if not self.wanted or len(samples) < 2:
            return False
        mean, se = _mean_se(samples)
        return ((self.abs is None or se <= self.abs)
                and (self.rel is None or se <= self.rel * abs(mean + self.offset)))

    def check(self, instrument: str, result: "TraceResult", strict: bool) -> None:
        """Warn (or raise, ``strict``) when a target was asked for and ``result`` misses it."""
        if not self.wanted or self.reached(result.samples):
            return
        parts = ([f"standard error {self.abs:g}"] if self.abs is not None else []) + \
                ([f"relative standard error {self.rel:g}"] if self.rel is not None else [])
        value, se = result.value, result.std_error
        rel = se / abs(value) if value else float("inf")
        not_converged(f"{instrument}: target {' and '.join(parts)} not reached within "
                      f"num_matvecs={result.num_matvecs} (standard error {se:.3g}, {rel:.1%} of the estimate "
                      f"{value:.6g}); raise num_matvecs, or pass strict=True to make this an error", strict)


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _hutchinson(op: HessianOperator, num_matvecs: int, gen, block_size: int, stop: _Stop, scale=None,
                pbar=None):
    samples: list[float] = []
    used = 0
    while used < num_matvecs:
        k = min(block_size, num_matvecs - used)
        z = _probes(op.dim, k, gen, op.dtype, op.device)
        if scale is not None:
            z = z * scale[:, None]
        samples += _quadratic_forms(op, z).double().tolist()
        used += k
        if pbar is not None:
            pbar.update(k)
        if stop.reached(samples):
            break
    return samples, used


def _mean_se(samples: list) -> tuple[float, float]:
    s = torch.tensor(samples, dtype=torch.float64)
    if len(s) == 0:
        return 0.0, float("nan")
    return s.mean().item(), (s.std().item() / math.sqrt(len(s)) if len(s) > 1 else float("nan"))


@records_engines
@full_precision()
def hessian_trace(op: HessianOperator, num_matvecs: int | None = None, method: str = "hutch++", seed: int = 0, *,
                  target_std_error: float | None = None, target_rel_error: float | None = None,
                  block_size: int = 16, on_nonfinite: str | None = None, strict: bool = False,
                  progress: bool = True) -> TraceResult:
    """Estimate ``Tr(H)``.

    **Expected error.** The standard error falls as ``1/sqrt(num_matvecs)``; how large it is
    depends on the spectrum (Hutchinson's variance is ``2 (||H||_F^2 - sum_i H_ii^2)`` per
    probe; Hutch++ removes the top of the spectrum first). Hutch++'s relative standard error
    was 0.7% with 48 products on the project's trained cnn-digits, 1.2-1.3% on its trained
    resnet20 (BENCHMARKS.md, "Sampling error of the study's curvature"), and 22.6% with the
    default 64 on an untrained torchvision resnet18 with 64 CIFAR images, whose spectrum is
    spread out (BENCHMARKS.md, "Instruments at scale"). Every result carries its own
    ``std_error``; to ask for an error instead of a budget, pass ``target_std_error`` (absolute)
    or ``target_rel_error`` (relative to the estimate, e.g. 0.02): the estimator then stops as
    soon as it is reached, spending at most ``num_matvecs`` (default 1024 with a target).

    Args:
        op: the Hessian.
        num_matvecs: the budget of Hessian-vector products (the maximum when a target is set);
            default 64 without a target, 1024 with one.
        method: ``"hutchinson"`` or ``"hutch++"``.
        seed: seed of the Rademacher probes (same seed, same estimate).
        target_std_error: stop as soon as the standard error is at most this.
        target_rel_error: stop as soon as the standard error is at most this fraction of the
            estimate (both targets: both must hold).
        block_size: probes per block product (:meth:`HessianOperator.matmat`).
        on_nonfinite: ``"raise"`` or ``"nan"`` (see the module doc); default: the operator's
            (``"raise"``).
        strict: a target not reached within the budget raises
            :class:`landscape.errors.ConvergenceError` (default: a
            :class:`landscape.errors.ConvergenceWarning` naming the error reached).
        progress: a progress bar over the products (shown after 2 s; ``False`` silences it).

    **Memory**: Hutch++ holds ``num_matvecs / 3`` sketch vectors of ``dim`` floats (21 for the
    default budget: 940 MB for an 11.18M-parameter model; orthonormalized in place) besides a
    block of probes and their products.

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
        ConvergenceError: ``strict=True`` and a target missed.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; valid: {', '.join(TRACE_METHODS)}")
    _check_block_size(block_size)
    stop = _Stop(target_std_error, target_rel_error)
    num_matvecs = stop.budget(num_matvecs)
    if method == "hutchinson":
        _check_budget(num_matvecs, 2, "Hutchinson")
    else:
        _check_budget(num_matvecs, 6, "Hutch++")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    try:
        with measuring(op, "hessian_trace") as checked, bar(progress, num_matvecs, "hessian_trace", "matvec") as pbar:
            result = _hessian_trace(checked, num_matvecs, method, seed, stop, block_size, pbar, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        return TraceResult(NAN, NAN, num_matvecs, method, seed, [], time.perf_counter() - t0)
    stop.check("hessian_trace", result, strict)
    return result


def _hessian_trace(op, num_matvecs, method, seed, stop, block_size, pbar, t0) -> TraceResult:
    gen = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        samples, used = _hutchinson(op, num_matvecs, gen, block_size, stop, pbar=pbar)
        mean, se = _mean_se(samples)
        return TraceResult(mean, se, used, method, seed, samples, time.perf_counter() - t0)
    s_dim = min(num_matvecs // 3, op.dim)
    Y = op.matmat(_probes(op.dim, s_dim, gen, op.dtype, op.device))
    pbar.update(s_dim)
    Q = orthonormalize(Y, inplace=True)  # float64 Gram, CholeskyQR2, over Y; rank-deficient sketches lose columns
    t_exact = float(_quadratic_forms(op, Q).double().sum()) if Q.shape[1] else 0.0  # Tr(Q^T H Q): forms
    pbar.update(s_dim)
    used = 2 * s_dim
    stop.offset = t_exact
    samples: list[float] = []
    while used < num_matvecs:
        k = min(block_size, num_matvecs - used)
        G = project_out(Q, _probes(op.dim, k, gen, op.dtype, op.device))
        samples += _quadratic_forms(op, G).double().tolist()
        used += k
        pbar.update(k)
        if stop.reached(samples):
            break
    mean, se = _mean_se(samples)
    return TraceResult(t_exact + mean, se, used, method, seed, samples, time.perf_counter() - t0)


@records_engines
@full_precision()
def block_traces(op: HessianOperator, num_matvecs: int = 64, seed: int = 0, *, group: str = "module",
                 block_size: int = 16, on_nonfinite: str | None = None, progress: bool = True) -> BlockTraceResult:
    """Traces of the diagonal blocks of H in one pass of Hutchinson probes.

    ``Tr(H_bb) = E[z_b^T (H z)_b]`` for every block ``b`` at once (the cross terms vanish in
    expectation), so one set of products gives every block.

    Args:
        group: ``"module"`` (a layer's weight and bias together) or ``"param"`` (each tensor).
        on_nonfinite: ``"raise"`` or ``"nan"`` (NaN for every block); default: the operator's.
        progress: a progress bar over the products (shown after 2 s; ``False`` silences it).

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
    """
    if group not in ("module", "param"):
        raise ValueError(f"group must be 'module' or 'param', got {group!r}")
    _check_budget(num_matvecs, 2, "block_traces")
    _check_block_size(block_size)
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    keys = {n: (n.rsplit(".", 1)[0] if group == "module" and "." in n else n) for n in op.names}
    try:
        with measuring(op, "block_traces") as checked, bar(progress, num_matvecs, "block_traces", "matvec") as pbar:
            return _block_traces(checked, num_matvecs, seed, keys, block_size, pbar, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        nan = dict.fromkeys(keys.values(), NAN)
        return BlockTraceResult(nan, dict(nan), NAN, NAN, num_matvecs, seed, time.perf_counter() - t0)


def _block_traces(op, num_matvecs, seed, keys, block_size, pbar, t0) -> BlockTraceResult:
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
        pbar.update(k)
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
def noise_weighted_trace(op: HessianOperator, variances, num_matvecs: int | None = None, seed: int = 0, *,
                         target_std_error: float | None = None, target_rel_error: float | None = None,
                         block_size: int = 16, on_nonfinite: str | None = None, strict: bool = False,
                         progress: bool = True) -> TraceResult:
    """Estimate ``Tr(H Sigma)`` for a diagonal covariance ``Sigma`` given per parameter.

    Hutchinson with probes ``Sigma^{1/2} z``: ``E[z^T Sigma^{1/2} H Sigma^{1/2} z] = Tr(H Sigma)``.
    For quantization noise, ``variances`` is the per-channel variance of ``Q(W) - W``.

    Args:
        variances: flat tensor or dict by parameter name (see :func:`expand_to_params`); >= 0.
        num_matvecs, target_std_error, target_rel_error, strict, progress: as for
            :func:`hessian_trace` (default 64 products; 1024 at most with a target).
        on_nonfinite: ``"raise"`` or ``"nan"``; default: the operator's.

    Raises:
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
        ConvergenceError: ``strict=True`` and a target missed.
    """
    stop = _Stop(target_std_error, target_rel_error)
    num_matvecs = stop.budget(num_matvecs)
    _check_budget(num_matvecs, 2, "noise_weighted_trace")
    _check_block_size(block_size)
    var = expand_to_params(op, variances)
    if bool((var < 0).any()) or not bool(torch.isfinite(var).all()):
        raise ValueError("variances must be finite and >= 0")
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    try:
        with measuring(op, "noise_weighted_trace") as checked, \
                bar(progress, num_matvecs, "noise_weighted_trace", "matvec") as pbar:
            samples, used = _hutchinson(checked, num_matvecs, gen, block_size, stop, scale=var.sqrt(), pbar=pbar)
    except NonFiniteError:
        if policy == "raise":
            raise
        return TraceResult(NAN, NAN, num_matvecs, "hutchinson", seed, [], time.perf_counter() - t0)
    mean, se = _mean_se(samples)
    result = TraceResult(mean, se, used, "hutchinson", seed, samples, time.perf_counter() - t0)
    stop.check("noise_weighted_trace", result, strict)
    return result


@records_engines
@full_precision()
def predicted_loss_increase(op: HessianOperator, variances, mean=None, num_matvecs: int = 64, seed: int = 0,
                            block_size: int = 16, *, on_nonfinite: str | None = None,
                            progress: bool = True) -> LossIncreasePrediction:
    """Second-order prediction of the expected loss increase under ``delta ~ (mu, Sigma)``.

    ``E[L(w + delta)] - L(w) ~ g.mu + 1/2 (mu^T H mu + Tr(H Sigma))`` with ``g`` the gradient.
    Costs one gradient pass, one product for ``mu^T H mu`` (if ``mean`` is given) and
    ``num_matvecs`` products for the trace.

    Args:
        variances: ``Sigma``'s diagonal: a flat tensor of length ``op.dim``, or a dict by
            parameter name of tensors that broadcast from the left against the parameter (a
            per-output-channel ``(C,)`` vector for a ``(C, ...)`` weight; missing parameters get
            0); see :func:`expand_to_params`. ``landscape.error_moments(Q(W) - W)`` gives the
            per-channel ``(mean, variance)`` of a quantization error.
        mean: ``mu`` in the same forms (``None``: zero mean).
        on_nonfinite: ``"raise"`` or ``"nan"`` (every term NaN); default: the operator's.
        progress: a progress bar over the trace's products (shown after 2 s).

    Raises:
        NonFiniteError: a NaN or Inf loss, gradient or product (``on_nonfinite="raise"``).
    """
    _check_budget(num_matvecs, 2, "predicted_loss_increase")
    policy = nonfinite_policy(op, on_nonfinite)
    try:
        with measuring(op, "predicted_loss_increase") as checked:
            g, loss = checked.gradient()
            tr = noise_weighted_trace(checked, variances, num_matvecs, seed, block_size=block_size,
                                      on_nonfinite="raise", progress=progress)
            used = tr.num_matvecs
            g_mu = mu_h_mu = 0.0
            if mean is not None:
                mu = expand_to_params(op, mean, "mean")
                g_mu = float(dots(g, mu))
                mu_h_mu = float(dots(mu, checked.matvec(mu)))
                used += 1
    except NonFiniteError:
        if policy == "raise":
            raise
        return LossIncreasePrediction(NAN, NAN, NAN, NAN, NAN, NAN, num_matvecs + (mean is not None), seed)
    pred = g_mu + 0.5 * (mu_h_mu + tr.value)
    return LossIncreasePrediction(pred, g_mu, 0.5 * mu_h_mu, 0.5 * tr.value, 0.5 * tr.std_error, loss, used, seed)
