"""Per-layer sensitivity to a perturbation of known mean and variance: the second-order
prediction of the loss increase, and HAWQ-V2's trace proxy, for every layer and bit-width from
one shared batch of Hessian-vector products.

For a layer ``l`` perturbed by ``delta_l ~ (mu_l, Sigma_l)`` (``Sigma_l`` diagonal, given per
element or per output channel) and every other layer left alone, the second-order expansion of
the loss gives

    ``predicted_l = g_l . mu_l + (mu_l^T H_ll mu_l + Tr(H_ll Sigma_l)) / 2``

with ``g_l`` and ``H_ll`` the layer's gradient and diagonal Hessian block. Summing
``predicted_l`` over layers is the *block-diagonal* approximation: the cross-layer terms
``mu_l^T H_lk mu_k`` are dropped, as HAWQ (Dong et al., ICCV 2019; HAWQ-V2, NeurIPS 2020; HAWQ-V3,
ICML 2021) does when it adds per-layer sensitivities inside its integer program.

HAWQ-V2's proxy for the same quantity is ``hawq_l = Tr(H_ll) / n_l * ||delta_l||^2``: the
average Hessian eigenvalue of the layer times the squared norm of its quantization error
(``||delta_l||^2 = sum_i (mu_i^2 + sigma_i^2)``, exact for the error's own per-channel moments).

Cost: one gradient, one quadratic form per (layer, bit-width) for ``mu^T H mu`` (Taylor mode
where the operator has it), and ``num_matvecs`` Hessian-vector products for every trace at once:
with Hutchinson probes ``z``, ``E[z_i (H z)_i] = H_ii``, so ``sum_i sigma_i^2 z_i (H z)_i`` is an
unbiased estimate of ``Tr(H_ll Sigma_l)`` for every layer and every ``Sigma`` from the same
products (only the diagonal of ``H_ll`` enters a diagonal ``Sigma``). The standard errors are the
sample standard deviations over probes divided by ``sqrt(#probes)``; they are correlated across
layers and bit-widths (the same probes). ``method="exact"`` takes the diagonal of every block
from unit vectors instead (one product per parameter: for small models and tests).

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator, layer_sensitivity
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (torch.randn(32, 4), torch.randint(0, 3, (32,))))
    >>> errors = {"0.weight": {4: (torch.zeros(8), torch.full((8,), 1e-4)),
    ...                        2: (torch.zeros(8), torch.full((8,), 1e-2))}}
    >>> res = layer_sensitivity(op, errors, num_matvecs=32, seed=0)
    >>> res.predicted["0.weight"][2] > res.predicted["0.weight"][4]
    True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dnq_landscape_common.tensors import channel_moments

from .errors import NonFiniteError
from .hessian import HessianOperator, measuring, nonfinite_policy
from .operator import records_engines
from .precision import full_precision
from .results import Result
from .trace import _probes, _quadratic_forms

SENSITIVITY_METHODS = ("hutchinson", "exact")
OBJECTIVES = ("predicted", "hawq")


@dataclass(repr=False)
class LayerSensitivityResult(Result):
    """Per-layer sensitivities, indexed ``[layer][bits]`` (layer = a parameter's name).

    Attributes:
        layers: the parameter names, in the order of ``errors``.
        bits: the bit-widths (sorted).
        predicted: ``g.mu + (mu^T H_ll mu + Tr(H_ll Sigma)) / 2`` per layer and bits.
        predicted_std_error: its standard error (from the trace term only: the gradient and
            ``mu^T H mu`` terms are exact for the data).
        hawq: ``Tr(H_ll) / n_l * ||delta_l||^2``.
        hawq_std_error: its standard error.
        gradient_term, mean_curvature_term, trace_term: the three parts of ``predicted``
            (``g.mu``, ``mu^T H mu / 2``, ``Tr(H Sigma) / 2``).
        layer_trace, layer_trace_std_error: ``Tr(H_ll)`` per layer and its standard error.
        numel: ``n_l``, the parameters of each layer.
        error_sq_norm: ``||delta_l||^2 = sum (mu^2 + sigma^2)`` per layer and bits.
        loss: the loss at the unperturbed parameters.
        method: ``"hutchinson"`` or ``"exact"``.
        num_matvecs: Hessian-vector products spent on the traces.
        num_quadratic_forms: quadratic forms ``mu^T H mu`` (one per layer and bits with a nonzero mean).
        num_gradients: gradients (1).
        seed: seed of the probes.
        time_s: wall time.
    """

    layers: list
    bits: list
    predicted: dict
    predicted_std_error: dict
    hawq: dict
    hawq_std_error: dict
    gradient_term: dict
    mean_curvature_term: dict
    trace_term: dict
    layer_trace: dict
    layer_trace_std_error: dict
    numel: dict
    error_sq_norm: dict
    loss: float
    method: str
    num_matvecs: int
    num_quadratic_forms: int
    num_gradients: int
    seed: int
    time_s: float = 0.0
    engines: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    _exclude = ("samples",)

    def table(self, objective: str = "predicted") -> dict:
        """``{layer: {bits: value}}`` of one objective (``"predicted"`` or ``"hawq"``)."""
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        return {n: dict(v) for n, v in getattr(self, objective).items()}


def error_moments(error: torch.Tensor, per: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, variance)`` of a perturbation tensor, for :func:`layer_sensitivity`.

    Args:
        error: the perturbation of one parameter, e.g. ``Q(W) - W``.
        per: ``"channel"``: the mean and the *population* variance (divided by ``n``) over each
            output channel (dimension 0), so that ``n_c (mean^2 + variance)`` is the channel's
            squared error; ``"element"``: the error itself as the mean, variance 0 (the
            prediction is then the second-order Taylor expansion at that exact perturbation).

    Returns:
        float64 tensors of shape ``(C,)`` (channel) or ``error.shape`` (element).
    """
    if per == "element":
        e = error.detach().double()
        return e.clone(), torch.zeros_like(e)
    if per != "channel":
        raise ValueError(f"per must be 'channel' or 'element', got {per!r}")
    return channel_moments(error)


def _expand(value, shape: torch.Size, what: str, dtype, device) -> torch.Tensor:
    v = torch.as_tensor(value).to(device=device, dtype=dtype)
    if v.dim() > len(shape) or tuple(v.shape) != tuple(shape[: v.dim()]):
        raise ValueError(f"{what} has shape {tuple(v.shape)}, which is neither the parameter's {tuple(shape)} nor a "
                         f"per-channel prefix of it (e.g. ({shape[0] if len(shape) else 1},))")
    return v.reshape(v.shape + (1,) * (len(shape) - v.dim())).expand(shape).reshape(-1)


def _check_errors(op: HessianOperator, errors) -> tuple[list[str], list[int], dict]:
    """Validate ``errors`` and expand every (mean, variance) to the parameter's flat length."""
    if not isinstance(errors, dict) or not errors:
        raise ValueError("errors must be a non-empty dict {parameter name: {bits: (mean, variance)}}")
    shapes = dict(zip(op.names, op.shapes))
    unknown = [n for n in errors if n not in shapes]
    if unknown:
        raise ValueError(f"errors names parameters the operator does not have: {unknown[:5]}; the operator's "
                         f"parameters are {op.names[:5]}{'...' if len(op.names) > 5 else ''} (pass params= to "
                         "HessianOperator to include them)")
    bits: set = set()
    out: dict = {}
    for n, per_bits in errors.items():
        if not isinstance(per_bits, dict) or not per_bits:
            raise ValueError(f"errors[{n!r}] must be a non-empty dict {{bits: (mean, variance)}}")
        out[n] = {}
        for b, mv in per_bits.items():
            if isinstance(b, bool) or not isinstance(b, int):
                raise ValueError(f"errors[{n!r}] has bit-width key {b!r}; use integers such as 2, 4, 8")
            if not isinstance(mv, (tuple, list)) or len(mv) != 2:
                raise ValueError(f"errors[{n!r}][{b}] must be a pair (mean, variance)")
            mean = _expand(mv[0], shapes[n], f"errors[{n!r}][{b}] mean", torch.float64, op.device)
            var = _expand(mv[1], shapes[n], f"errors[{n!r}][{b}] variance", torch.float64, op.device)
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())) or bool((var < 0).any()):
                raise ValueError(f"errors[{n!r}][{b}]: the mean must be finite and the variance finite and >= 0")
            out[n][b] = (mean, var)
            bits.add(b)
    return list(errors), sorted(bits), out


@records_engines
@full_precision()
def layer_sensitivity(op: HessianOperator, errors: dict, num_matvecs: int = 64, seed: int = 0, *,
                      method: str = "hutchinson", block_size: int = 16, progress: bool = False,
                      on_nonfinite: str | None = None) -> LayerSensitivityResult:
    """Second-order and HAWQ sensitivities of every layer at every bit-width (see the module doc).

    Args:
        op: the Hessian of the loss (its parameters must include every name in ``errors``).
        errors: ``{parameter name: {bits: (mean, variance)}}``, each a tensor of the parameter's
            shape (per element) or of its leading dimensions (per output channel, ``(C,)``);
            :func:`error_moments` makes them from an error tensor. The variance is the
            population variance of the error (for ``hawq``'s ``||delta||^2``).
        num_matvecs: Hutchinson probes shared by every layer and bit-width (``method="hutchinson"``).
        seed: seed of the probes (same seed, same numbers).
        method: ``"hutchinson"`` or ``"exact"`` (the diagonal of every layer's block from unit
            vectors: one product per parameter of the layers in ``errors``).
        block_size: probes (or unit vectors) per batched product.
        progress: a progress bar over the products.
        on_nonfinite: ``"raise"`` or ``"nan"``; default: the operator's.

    Returns:
        A :class:`LayerSensitivityResult`.

    Raises:
        ValueError: bad ``errors`` (unknown parameter, shape that does not broadcast, negative
            variance), budget or method.
        NonFiniteError: a NaN or Inf loss or product (``on_nonfinite="raise"``).
    """
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(SENSITIVITY_METHODS)}")
    if method == "hutchinson" and (isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int)
                                   or num_matvecs < 2):
        raise ValueError(f"layer_sensitivity needs num_matvecs >= 2 (Hutchinson probes), got {num_matvecs!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    layers, bits, err = _check_errors(op, errors)
    policy = nonfinite_policy(op, on_nonfinite)
    t0 = time.perf_counter()
    try:
        with measuring(op, "layer_sensitivity") as checked:
            return _sensitivity(checked, op, layers, bits, err, num_matvecs, seed, method, block_size, progress, t0)
    except NonFiniteError:
        if policy == "raise":
            raise
        nan = {n: dict.fromkeys(err[n], math.nan) for n in layers}
        tr = dict.fromkeys(layers, math.nan)
        return LayerSensitivityResult(layers, bits, nan, nan, nan, nan, nan, nan, nan, tr, tr,
                                      {n: op.numels[op.names.index(n)] for n in layers}, nan, math.nan, method,
                                      num_matvecs if method == "hutchinson" else 0, 0, 1, seed,
                                      time.perf_counter() - t0)


def _sensitivity(op, raw_op, layers, bits, err, num_matvecs, seed, method, block_size, progress, t0):
    sl = raw_op.block_slices()
    g, loss = op.gradient()
    g = g.double()
    # --- diagonal samples z_i (Hz)_i (Hutchinson) or the exact diagonal, on the layers' slices
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in layers}  # each (numel, k) chunks
    used = 0
    if method == "hutchinson":
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(total=num_matvecs, desc="sensitivity", leave=False, disable=not progress)
        while used < num_matvecs:
            k = min(block_size, num_matvecs - used)
            z = _probes(raw_op.dim, k, gen, raw_op.dtype, raw_op.device)
            d = (z * op.matmat(z)).double()
            for n in layers:
                samples[n].append(d[sl[n]])
            used += k
            bar.update(k)
        bar.close()
        stacked = {n: torch.cat(samples[n], dim=1) for n in layers}  # (numel, probes)
    else:
        diag = {}
        total = sum(sl[n].stop - sl[n].start for n in layers)
        bar = tqdm(total=total, desc="sensitivity (exact)", leave=False, disable=not progress)
        for n in layers:
            idx = torch.arange(sl[n].start, sl[n].stop, device=raw_op.device)
            parts = []
            for chunk in idx.split(block_size):
                E = torch.zeros(raw_op.dim, len(chunk), dtype=raw_op.dtype, device=raw_op.device)
                E[chunk, torch.arange(len(chunk), device=raw_op.device)] = 1
                parts.append(op.matmat(E)[chunk, torch.arange(len(chunk), device=raw_op.device)].double())
                used += len(chunk)
                bar.update(len(chunk))
            diag[n] = torch.cat(parts)
        bar.close()
        stacked = {n: diag[n][:, None] for n in layers}  # one exact "sample"
    # --- mu^T H_ll mu per (layer, bits): quadratic forms of zero-padded means, in blocks
    pairs = [(n, b) for n in layers for b in err[n] if bool(err[n][b][0].abs().sum() > 0)]
    mu_h_mu: dict = {}
    for start in range(0, len(pairs), block_size):
        chunk = pairs[start:start + block_size]
        Z = torch.zeros(raw_op.dim, len(chunk), dtype=raw_op.dtype, device=raw_op.device)
        for j, (n, b) in enumerate(chunk):
            Z[sl[n], j] = err[n][b][0].to(raw_op.dtype)
        q = _quadratic_forms(op, Z).double()
        for j, key in enumerate(chunk):
            mu_h_mu[key] = float(q[j])
    # --- assemble
    k = next(iter(stacked.values())).shape[1]
    root = math.sqrt(k)

    def mean_se(s: torch.Tensor) -> tuple[float, float]:
        return float(s.mean()), (float(s.std()) / root if k > 1 else 0.0)

    out = {name: {} for name in ("predicted", "predicted_std_error", "hawq", "hawq_std_error", "gradient_term",
                                 "mean_curvature_term", "trace_term", "error_sq_norm")}
    layer_trace, layer_trace_se, numel, kept = {}, {}, {}, {}
    for n in layers:
        s = stacked[n]
        numel[n] = s.shape[0]
        tr_samples = s.sum(0)
        layer_trace[n], layer_trace_se[n] = mean_se(tr_samples)
        kept[n] = tr_samples.tolist()
        for key in out:
            out[key][n] = {}
        for b in sorted(err[n]):
            mean, var = err[n][b]
            t, t_se = mean_se(var @ s)  # Tr(H_ll Sigma) per probe
            g_mu = float(g[sl[n]] @ mean)
            m_term = 0.5 * mu_h_mu.get((n, b), 0.0)
            sq = float((mean * mean + var).sum())
            out["gradient_term"][n][b] = g_mu
            out["mean_curvature_term"][n][b] = m_term
            out["trace_term"][n][b] = 0.5 * t
            out["predicted"][n][b] = g_mu + m_term + 0.5 * t
            out["predicted_std_error"][n][b] = 0.5 * t_se
            out["error_sq_norm"][n][b] = sq
            out["hawq"][n][b] = layer_trace[n] / numel[n] * sq
            out["hawq_std_error"][n][b] = layer_trace_se[n] / numel[n] * sq
    return LayerSensitivityResult(layers, bits, out["predicted"], out["predicted_std_error"], out["hawq"],
                                  out["hawq_std_error"], out["gradient_term"], out["mean_curvature_term"],
                                  out["trace_term"], layer_trace, layer_trace_se, numel, out["error_sq_norm"], loss,
                                  method, used, len(pairs), 1, seed, time.perf_counter() - t0, kept)
