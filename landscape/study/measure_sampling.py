"""The sampling error of the curvature (``sampling``, with ``instruments.replicates`` N >= 2): the
trace and the top eigenvalue again on N disjoint subsets of ``hessian_samples`` training images
(:func:`dnq.data.training_subsets`; the first is the study's own curvature images), each
subset's value, estimator error and engines, and their :func:`spread` (the report's
sampling-error section, :mod:`landscape.report_sampling`).

Example:
    >>> s = spread([1.0, 1.2, 0.8], [0.1, 0.1, 0.1])
    >>> round(s["mean"], 6), round(s["std"], 6), round(s["spread_to_error"], 6)
    (1.0, 0.2, 2.0)
"""

from __future__ import annotations

import math
import statistics

from dnq.data import training_subsets

from ..eigen import top_eigenvalues
from ..hessian import HessianOperator
from ..trace import hessian_trace
from .context import MeasureContext
from .keys import EigenKey, SamplingKey, TraceKey

__all__ = ["sampling", "spread"]


def spread(values: list[float], errors: list[float | None]) -> dict:
    """The between-subset spread of ``values`` (one per subset) next to the estimator's own error.

    Returns:
        ``n``, ``mean``, ``std`` (sample standard deviation over subsets, None for one),
        ``relative_spread`` (``std / |mean|``), ``min_max_ratio`` (``min / max``; None unless every
        value is positive), ``mean_estimator_error`` (mean of ``errors``, None without any) and
        ``spread_to_error`` (``std / mean_estimator_error``: about 1 when the subsets differ no
        more than the estimator's noise, well above 1 when the images matter).
    """
    vals = [float(v) for v in values]
    errs = [float(e) for e in errors if e is not None and math.isfinite(e)]
    mean = statistics.fmean(vals) if vals else None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    err = statistics.fmean(errs) if errs else None
    return {"n": len(vals), "mean": mean, "std": std,
            "relative_spread": None if std is None or not mean else std / abs(mean),
            "min_max_ratio": min(vals) / max(vals) if vals and min(vals) > 0 else None,
            "mean_estimator_error": err,
            "spread_to_error": None if std is None or not err else std / err}


def _recorded(ctx: MeasureContext, name: str, key) -> dict | None:
    """The value of measurement ``name`` when it is recorded with ``key``, else None."""
    have = ctx.recorded.get(name)
    if have is not None and have.get("key") == key.digest(ctx.train_key, name):
        return have["value"]
    return None


def _replicate(ctx: MeasureContext, key: SamplingKey, r: int, idx, batches) -> dict:
    """Subset ``r``: its trace and top eigenvalue (for subset 0, the study's own when recorded
    with the same settings)."""
    seed = key.seed + r
    rep = {"replicate": r, "images": len(idx), "reused": []}
    trace_key = TraceKey(samples=key.samples, batch=key.batch, seed=key.seed, method=key.trace_method,
                         matvecs=key.trace_matvecs)
    eigen_key = EigenKey(samples=key.samples, batch=key.batch, seed=key.seed, k=key.eig_k, tol=key.eig_tol)
    have_t = _recorded(ctx, "trace", trace_key) if r == 0 else None
    have_e = _recorded(ctx, "eigen", eigen_key) if r == 0 else None
    op = None
    if have_t is not None:
        t, engines = have_t, have_t.get("engines", {})
        rep["reused"].append("trace")
    else:
        op = HessianOperator(ctx.model, ctx.loss_fn, ctx.shard(batches))
        res = hessian_trace(op, key.trace_matvecs, key.trace_method, seed=seed, progress=ctx.progress)
        t, engines = res.to_dict(), getattr(res, "engines", {})
    rep["trace"] = {"value": t["value"], "std_error": t["std_error"], "num_matvecs": t["num_matvecs"],
                    "seed": t["seed"], "engines": dict(engines or {})}
    if have_e is not None:
        e, engines = have_e, have_e.get("engines", {})
        rep["reused"].append("eigen")
    else:
        op = op or HessianOperator(ctx.model, ctx.loss_fn, ctx.shard(batches))
        res = top_eigenvalues(op, k=key.eig_k, tol=key.eig_tol, seed=seed, progress=ctx.progress)
        e, engines = res.to_dict(), getattr(res, "engines", {})
    rep["top_eigenvalue"] = {"value": e["eigenvalues"][0], "residual_norm": e["residual_norms"][0],
                             "converged": e["converged"], "num_matvecs": e["num_matvecs"], "seed": e["seed"],
                             "engines": dict(engines or {})}
    return rep


def sampling(ctx: MeasureContext, key: SamplingKey) -> dict:
    """The trace and the top eigenvalue on ``key.replicates`` disjoint subsets of ``key.samples``
    training images (:func:`dnq.data.training_subsets`; subset 0 is the study's own curvature
    images, whose ``trace`` and ``eigen`` measurements are reused when recorded with the same
    settings). Subset ``r`` uses probe and start-vector seed ``key.seed + r``, so the
    between-subset spread holds both the images' and the estimator's variation, and is compared
    with the estimator's own error (:func:`spread`): the trace's standard error, and the Lanczos
    residual norm of the top eigenpair (a bound on the distance of the reported value to an
    eigenvalue of that subset's Hessian).

    Returns:
        ``replicates``: per subset its ``images`` (count), ``trace`` (``value``,
        ``std_error``, ``num_matvecs``, ``seed``, ``engines``: the operator's engines as
        ``{name: products}``), ``top_eigenvalue`` (``value``, ``residual_norm``,
        ``converged``, ``num_matvecs``, ``seed``, ``engines``) and ``reused`` (the
        measurements taken from the study's own); then ``trace`` and ``top_eigenvalue``:
        their :func:`spread`.
    """
    subsets = training_subsets(ctx.ds, key.samples, key.replicates, key.seed, key.batch)
    reps = [_replicate(ctx, key, r, idx, batches) for r, (idx, batches) in enumerate(subsets)]
    return {"replicates": reps,
            "trace": spread([p["trace"]["value"] for p in reps], [p["trace"]["std_error"] for p in reps]),
            "top_eigenvalue": spread([p["top_eigenvalue"]["value"] for p in reps],
                                     [p["top_eigenvalue"]["residual_norm"] for p in reps])}
