"""Regression of PTQ degradation against flatness, across a table of models.

For each pair (a flatness measure ``x``, a degradation ``y``): the ordinary least-squares line
with t-based confidence intervals for slope and intercept and a confidence band for the mean,
Pearson's r, Spearman's rho and Kendall's tau with their p-values (``scipy.stats``), and
percentile-bootstrap intervals for the slope and for rho (seeded: same seed, same interval).
``log=True`` fits ``log10 y`` on ``log10 x`` (a power law); rows that are not finite, or not
positive under ``log``, are dropped and counted.

The bootstrap resamples rows, or, given ``groups`` (for example the training configuration of
each model, shared by its seeds), whole groups (a cluster bootstrap, :func:`cluster_bootstrap_counts`):
models that share everything but the seed are not independent, and resampling them one by one
makes the intervals too narrow.

Multiplicity: :func:`holm` (family-wise error, Holm 1979) and :func:`benjamini_hochberg` (false
discovery rate, Benjamini & Hochberg 1995) adjust a family of p-values;
``correlation_table(fits, adjust=True)`` adds both to every p-value column, the family being the
fits passed in one call.

:func:`prediction_slope` fits measured against predicted loss increase: the second-order
theory says the slope is 1 and the intercept 0. :func:`prediction_holdout` checks that
prediction out of sample: calibrated on some seeds, scored on the others.

Works on any table: a list of dicts (one per model), a dict of columns, or a pandas DataFrame.

Example:
    >>> from landscape.regress import fit
    >>> r = fit([1, 2, 3, 4, 5], [2.1, 3.9, 6.2, 8.1, 9.8], n_boot=200)
    >>> round(r.slope, 2), round(r.spearman_rho, 6)
    (1.96, 1.0)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .results import Result


@dataclass(repr=False)
class FitResult(Result):
    """A least-squares fit ``y = intercept + slope * x`` with correlation statistics.

    Attributes:
        x_name, y_name: column names.
        n: rows used; n_dropped: rows dropped (not finite, or not positive under ``log``).
        log: whether the fit is on ``log10`` of both columns.
        slope, intercept, slope_se, intercept_se: least-squares estimates and standard errors.
        slope_ci, intercept_ci: t-based ``confidence`` intervals (rows taken as independent).
        r2: coefficient of determination.
        pearson_r, pearson_p, spearman_rho, spearman_p, kendall_tau, kendall_p: ``scipy.stats``
            (rows taken as independent).
        bootstrap_slope_ci, bootstrap_spearman_ci: percentile bootstrap intervals.
        bootstrap_unit: what the bootstrap resampled: ``"row"``, or ``"cluster"`` (whole groups).
        n_groups: the number of groups among the rows used (``None`` for a row bootstrap).
        x, y: the values used (after the log, if any).
    """

    x_name: str
    y_name: str
    n: int
    n_dropped: int
    log: bool
    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    slope_ci: tuple
    intercept_ci: tuple
    r2: float
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    kendall_tau: float
    kendall_p: float
    bootstrap_slope_ci: tuple
    bootstrap_spearman_ci: tuple
    confidence: float
    n_boot: int
    seed: int
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    bootstrap_unit: str = "row"
    n_groups: int | None = None
    _exclude = ()

    def predict(self, x) -> np.ndarray:
        """The fitted mean at ``x`` (on the fit's scale: ``log10`` when ``log``)."""
        return self.intercept + self.slope * np.asarray(x, dtype=float)

    def band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper ``confidence`` band of the fitted mean at ``x`` (the fit's scale)."""
        x = np.asarray(x, dtype=float)
        xs = np.asarray(self.x, dtype=float)
        n = len(xs)
        resid = np.asarray(self.y, dtype=float) - self.predict(xs)
        s = math.sqrt(float(resid @ resid) / (n - 2)) if n > 2 else float("nan")
        sxx = float(((xs - xs.mean()) ** 2).sum())
        t = stats.t.ppf(0.5 + self.confidence / 2, n - 2)
        half = t * s * np.sqrt(1 / n + (x - xs.mean()) ** 2 / sxx)
        mid = self.predict(x)
        return mid - half, mid + half


def column(table, name: str) -> np.ndarray:
    """One column of a table (list of dicts, dict of lists, or DataFrame) as float64."""
    if hasattr(table, "to_dict") and not isinstance(table, dict):  # a pandas DataFrame
        table = table.to_dict(orient="list")
    if isinstance(table, dict):
        if name not in table:
            raise KeyError(f"no column {name!r}; columns: {sorted(table)}")
        values = table[name]
    else:
        rows = list(table)
        missing = [i for i, r in enumerate(rows) if name not in r]
        if missing:
            raise KeyError(f"no column {name!r} in row {missing[0]}; columns there: {sorted(rows[missing[0]])}")
        values = [r[name] for r in rows]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


# -- multiplicity -------------------------------------------------------------------------------
def _pvalues(pvalues, who: str) -> np.ndarray:
    try:
        p = np.asarray(pvalues, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{who}: p-values must be numbers (NaN for a missing test): {e}") from None
    bad = ~np.isnan(p) & ~((p >= 0) & (p <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(f"{who}: p-values must lie in [0, 1] (NaN for a missing test); "
                         f"{int(bad.sum())} do not, the first is {float(p.ravel()[i])!r} at position {i}")
    return p


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order.

    With the ``m`` non-NaN p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value of
    ``p_(i)`` is ``max_{j <= i} min(1, (m - j + 1) p_(j))`` (Holm, S. (1979). A simple
    sequentially rejective multiple test procedure. *Scandinavian Journal of Statistics* 6(2),
    65-70). Rejecting where the adjusted value is ``<= alpha`` controls the probability of any
    false rejection at ``alpha`` under any dependence between the tests; it is uniformly more
    powerful than Bonferroni. NaN entries (tests not made) stay NaN and do not count in ``m``.

    Args:
        pvalues: array-like of p-values in [0, 1], NaN allowed; any shape.

    Returns:
        np.ndarray of the adjusted p-values, the shape and order of ``pvalues``.

    Raises:
        ValueError: a p-value outside [0, 1] (or not a number).

    Example:
        >>> from landscape.regress import holm
        >>> holm([0.01, 0.04, 0.03, 0.005]).round(4).tolist()
        [0.03, 0.06, 0.06, 0.02]
    """
    return _step(pvalues, "holm", lambda ps, m: np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ps)))


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg q-values (false discovery rate), in the input order.

    With the ``m`` non-NaN p-values sorted, ``p_(1) <= ... <= p_(m)``, the q-value of ``p_(i)``
    is ``min_{j >= i} min(1, m p_(j) / j)`` (Benjamini, Y. and Hochberg, Y. (1995). Controlling
    the false discovery rate: a practical and powerful approach to multiple testing. *Journal of
    the Royal Statistical Society B* 57(1), 289-300). Rejecting where ``q <= alpha`` (the step-up
    procedure) keeps the expected share of false rejections among the rejections at or below
    ``alpha`` for independent or positively dependent tests. NaN entries stay NaN and do not
    count in ``m``.

    Args:
        pvalues: array-like of p-values in [0, 1], NaN allowed; any shape.

    Returns:
        np.ndarray of the q-values, the shape and order of ``pvalues``.

    Raises:
        ValueError: a p-value outside [0, 1] (or not a number).

    Example:
        >>> from landscape.regress import benjamini_hochberg
        >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.005]).round(4).tolist()
        [0.02, 0.04, 0.04, 0.02]
    """
    return _step(pvalues, "benjamini_hochberg",
                 lambda ps, m: np.minimum.accumulate(np.minimum(1.0, ps * m / np.arange(1, m + 1))[::-1])[::-1])


def _step(pvalues, name: str, adjust) -> np.ndarray:
    """Apply a step-wise adjustment ``adjust(sorted p-values, m)`` to the non-NaN p-values and
    put the results back in the input order (NaN stays NaN)."""
    p = _pvalues(pvalues, name)
    flat = p.ravel()
    out = np.full(flat.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(flat))
    if len(ok):
        order = ok[np.argsort(flat[ok], kind="stable")]
        out[order] = adjust(flat[order], len(ok))
    return out.reshape(p.shape)


_ADJUST = {"holm": holm, "bh": benjamini_hochberg}


def adjust_pvalues(pvalues, method: str = "holm") -> np.ndarray:
    """Adjust a family of p-values: ``"holm"`` (:func:`holm`) or ``"bh"`` (:func:`benjamini_hochberg`).

    Args:
        pvalues: array-like of p-values in [0, 1], NaN for tests not made.
        method: ``"holm"`` (family-wise error) or ``"bh"`` (false discovery rate).

    Returns:
        np.ndarray of adjusted p-values (Holm) or q-values (BH), in the input order.

    Raises:
        ValueError: an unknown ``method``, or a p-value outside [0, 1].

    Example:
        >>> from landscape.regress import adjust_pvalues
        >>> adjust_pvalues([0.01, 0.02, 0.03], "bh").round(4).tolist()
        [0.03, 0.03, 0.03]
    """
    if method not in _ADJUST:
        raise ValueError(f"adjust_pvalues: method must be one of {sorted(_ADJUST)}, got {method!r}")
    return _ADJUST[method](pvalues)


# -- the bootstrap -------------------------------------------------------------------------------
def _group_codes(groups, n: int, who: str) -> tuple[np.ndarray, list]:
    """Integer codes ``0..G-1`` of the group labels (in order of first appearance) and the labels."""
    try:
        labels = list(groups)
    except TypeError:
        raise ValueError(f"{who}: groups must be a sequence of labels, got {type(groups).__name__}") from None
    if len(labels) != n:
        raise ValueError(f"{who}: groups has {len(labels)} labels for {n} rows")
    codes, seen = np.empty(n, dtype=np.int64), {}
    for i, g in enumerate(labels):
        if g is None or (isinstance(g, float) and math.isnan(g)):
            raise ValueError(f"{who}: group label of row {i} is missing ({g!r}); give every row a group")
        if isinstance(g, np.generic):
            g = g.item()
        try:
            codes[i] = seen.setdefault(g, len(seen))
        except TypeError:
            raise ValueError(f"{who}: group label of row {i} is not hashable ({type(g).__name__})") from None
    return codes, list(seen)


def cluster_bootstrap_counts(groups, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each row appears in each of ``n_boot`` cluster-bootstrap resamples.

    Each resample draws the ``G`` distinct groups ``G`` times with replacement and takes every
    row of every drawn group: a group drawn ``k`` times contributes all its rows ``k`` times, and
    no group is ever split. (Resampling rows instead treats models that share everything but a
    seed as independent and makes the intervals too narrow.)

    Args:
        groups: one hashable label per row (``None`` / NaN not allowed).
        n_boot: number of resamples (>= 0).
        rng: a ``numpy.random.Generator`` (seeded: same seed, same resamples).

    Returns:
        ``(n_boot, n)`` int64 array; row ``b`` is the multiplicity of each row in resample ``b``.
        It is constant within a group, and its group totals sum to ``G``.

    Raises:
        ValueError: a missing or unhashable label, or ``n_boot < 0``.

    Example:
        >>> import numpy as np
        >>> c = cluster_bootstrap_counts(["a", "a", "b", "c"], 3, np.random.default_rng(0))
        >>> c.shape, bool((c[:, 0] == c[:, 1]).all())
        ((3, 4), True)
    """
    if n_boot < 0:
        raise ValueError(f"cluster_bootstrap_counts: n_boot must be >= 0, got {n_boot}")
    labels = list(groups)
    codes, uniq = _group_codes(labels, len(labels), "cluster_bootstrap_counts")
    g = len(uniq)
    if g == 0 or n_boot == 0:
        return np.zeros((n_boot, len(codes)), dtype=np.int64)
    draws = rng.integers(0, g, size=(n_boot, g))
    per_group = np.bincount((draws + g * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * g)
    return per_group.reshape(n_boot, g)[:, codes]


def cluster_bootstrap_indices(groups, n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The row indices of each cluster-bootstrap resample (:func:`cluster_bootstrap_counts` expanded).

    Resamples differ in length when groups differ in size.

    Args:
        groups: one hashable label per row.
        n_boot: number of resamples.
        rng: a ``numpy.random.Generator``.

    Returns:
        A list of ``n_boot`` int arrays of row indices (a row repeated as often as its group was drawn).

    Example:
        >>> import numpy as np
        >>> idx = cluster_bootstrap_indices([0, 0, 1], 2, np.random.default_rng(0))
        >>> all(sorted(set(i.tolist())) in ([0, 1], [2], [0, 1, 2]) for i in idx)
        True
    """
    counts = cluster_bootstrap_counts(groups, n_boot, rng)
    rows = np.arange(counts.shape[1])
    return [np.repeat(rows, c) for c in counts]


def _weighted_ranks(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties averaged) of the values ``v`` in each resample ``w`` (counts)."""
    uniq, inv = np.unique(v, return_inverse=True)
    k, nb = len(uniq), w.shape[0]
    wu = np.bincount((inv[None, :] + k * np.arange(nb)[:, None]).ravel(), weights=w.ravel().astype(float),
                     minlength=nb * k).reshape(nb, k)
    below = np.cumsum(wu, axis=1) - wu
    return (below + (wu + 1) / 2)[:, inv]


def _weighted_stats(x: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Slope and Spearman's rho of each resample given by counts ``w`` (n_boot, n): exactly those
    of the resample with each row repeated ``w`` times."""
    w = w.astype(float)
    tot = w.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm, ym = (w * x).sum(1, keepdims=True) / tot, (w * y).sum(1, keepdims=True) / tot
        sxx = (w * (x - xm) ** 2).sum(1)
        sxy = (w * (x - xm) * (y - ym)).sum(1)
        slope = np.where(sxx > 1e-300, sxy / sxx, np.nan)
        rx, ry = _weighted_ranks(x, w), _weighted_ranks(y, w)
        rxm = rx - (w * rx).sum(1, keepdims=True) / tot
        rym = ry - (w * ry).sum(1, keepdims=True) / tot
        den = np.sqrt((w * rxm ** 2).sum(1) * (w * rym ** 2).sum(1))
        rho = np.where(den > 1e-300, (w * rxm * rym).sum(1) / den, np.nan)
    return slope, rho


def fit(x, y, *, log: bool = False, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0,
        x_name: str = "x", y_name: str = "y", groups=None) -> FitResult:
    """Fit ``y`` on ``x`` (arrays of equal length) and compute the correlation statistics.

    Args:
        x, y: the values, one per row.
        log: fit ``log10 y`` on ``log10 x``.
        confidence: level of every interval.
        n_boot: bootstrap resamples (0: no bootstrap, NaN intervals).
        seed: the bootstrap's seed (same seed, same interval).
        x_name, y_name: names for the result and messages.
        groups: optional label per row (for example the training configuration shared by the
            seeds of one setting). Given, the bootstrap resamples whole groups with replacement
            (:func:`cluster_bootstrap_counts`), never splitting one; rows dropped for non-finite
            values drop their label too. With fewer than 2 groups the bootstrap intervals are
            NaN (a warning says so). The t-intervals and p-values still take rows as independent.

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: lengths differ, fewer than 3 usable rows, ``x`` constant, a bad
            ``confidence`` / ``n_boot``, or a missing / unhashable group label.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    codes = None
    if groups is not None:
        codes, _ = _group_codes(groups, len(x), f"fit {y_name} ~ {x_name}")
    keep = np.isfinite(x) & np.isfinite(y)
    if log:
        keep &= (x > 0) & (y > 0)
    dropped = int((~keep).sum())
    if dropped:
        why = "not finite or not positive (log scale)" if log else "not finite"
        warnings.warn(f"fit {y_name} ~ {x_name}: {dropped} of {len(x)} rows dropped ({why})", stacklevel=2)
    x, y = x[keep], y[keep]
    if codes is not None:
        codes = codes[keep]
    if log:
        x, y = np.log10(x), np.log10(y)
    n = len(x)
    if n < 3:
        raise ValueError(f"fit {y_name} ~ {x_name}: need at least 3 usable rows, got {n}")
    if np.ptp(x) == 0:
        raise ValueError(f"fit {y_name} ~ {x_name}: x is constant; a slope is undefined")
    lr = stats.linregress(x, y)
    t = stats.t.ppf(0.5 + confidence / 2, n - 2)
    constant_y = np.ptp(y) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant y: correlations are NaN, said by the NaN itself
        rho = stats.spearmanr(x, y)
        tau = stats.kendalltau(x, y)
    n_groups = None
    if codes is None:
        boot_slope, boot_rho = _bootstrap(x, y, n_boot, seed)
    else:
        n_groups = len(np.unique(codes))
        if n_groups < 2:
            if n_boot:
                warnings.warn(f"fit {y_name} ~ {x_name}: one group only; no cluster-bootstrap interval", stacklevel=2)
            boot_slope, boot_rho = np.array([]), np.array([])
        else:
            w = cluster_bootstrap_counts(codes, n_boot, np.random.default_rng(seed))
            boot_slope, boot_rho = _weighted_stats(x, y, w) if n_boot else (np.array([]), np.array([]))
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)

    def pct(a):
        a = a[np.isfinite(a)]
        return (float(np.percentile(a, lo)), float(np.percentile(a, hi))) if len(a) else (math.nan, math.nan)

    return FitResult(
        x_name=x_name, y_name=y_name, n=n, n_dropped=dropped, log=log,
        slope=float(lr.slope), intercept=float(lr.intercept), slope_se=float(lr.stderr),
        intercept_se=float(lr.intercept_stderr),
        slope_ci=(float(lr.slope - t * lr.stderr), float(lr.slope + t * lr.stderr)),
        intercept_ci=(float(lr.intercept - t * lr.intercept_stderr), float(lr.intercept + t * lr.intercept_stderr)),
        r2=float(lr.rvalue ** 2) if not constant_y else math.nan,
        pearson_r=float(lr.rvalue) if not constant_y else math.nan,
        pearson_p=float(lr.pvalue) if not constant_y else math.nan,
        spearman_rho=float(rho.statistic), spearman_p=float(rho.pvalue),
        kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue),
        bootstrap_slope_ci=pct(boot_slope), bootstrap_spearman_ci=pct(boot_rho),
        confidence=confidence, n_boot=n_boot, seed=seed, x=x.tolist(), y=y.tolist(),
        bootstrap_unit="row" if codes is None else "cluster", n_groups=n_groups)


def _bootstrap(x, y, n_boot: int, seed: int):
    if n_boot == 0:
        return np.array([]), np.array([])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    xb, yb = x[idx], y[idx]
    xm, ym = xb.mean(1, keepdims=True), yb.mean(1, keepdims=True)
    sxx = ((xb - xm) ** 2).sum(1)
    sxy = ((xb - xm) * (yb - ym)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, sxy / sxx, np.nan)
    rx = stats.rankdata(xb, axis=1)
    ry = stats.rankdata(yb, axis=1)
    rxm, rym = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rxm ** 2).sum(1) * (rym ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, (rxm * rym).sum(1) / den, np.nan)
    return slope, rho


def regress(table, x: str | list[str], y: str | list[str], *, log: bool = False, groups: str | None = None,
            **kwargs) -> list[FitResult]:
    """Fit every ``y`` column on every ``x`` column of ``table``; keyword arguments go to :func:`fit`.

    ``groups`` names a column of group labels (for example ``"config"``) for a cluster bootstrap.

    Example: ``regress(rows, ["trace", "top_eigenvalue"], ["acc_drop_W4A4", "acc_drop_W3A3"])``.
    """
    xs = [x] if isinstance(x, str) else list(x)
    ys = [y] if isinstance(y, str) else list(y)
    g = None if groups is None else _labels(table, groups)
    return [fit(column(table, a), column(table, b), log=log, x_name=a, y_name=b, groups=g, **kwargs)
            for b in ys for a in xs]


def _labels(table, name: str) -> list:
    if hasattr(table, "to_dict") and not isinstance(table, dict):
        table = table.to_dict(orient="list")
    if isinstance(table, dict):
        if name not in table:
            raise KeyError(f"no column {name!r}; columns: {sorted(table)}")
        return list(table[name])
    rows = list(table)
    missing = [i for i, r in enumerate(rows) if name not in r]
    if missing:
        raise KeyError(f"no column {name!r} in row {missing[0]}; columns there: {sorted(rows[missing[0]])}")
    return [r[name] for r in rows]


def prediction_slope(measured, predicted, **kwargs) -> FitResult:
    """Fit measured against predicted loss increase (theory: slope 1, intercept 0).

    ``measured`` and ``predicted`` are arrays; keyword arguments go to :func:`fit`.
    """
    kwargs.setdefault("x_name", "predicted loss increase")
    kwargs.setdefault("y_name", "measured loss increase")
    return fit(predicted, measured, **kwargs)


# -- out-of-sample check of the second-order prediction -----------------------------------------
@dataclass(repr=False)
class HoldoutResult(Result):
    """The second-order prediction calibrated on some seeds and scored on the others.

    Attributes:
        fit_seeds, test_seeds: the seeds of the fitting half and of the held-out half.
        n_fit, n_test: rows in each; n_dropped: rows dropped (non-finite values or no seed).
        intercept, slope, slope_se, slope_ci: ``measured = intercept + slope * predicted``
            by least squares on the fitting half, the slope's t-interval at ``confidence``.
        rmse_calibrated, mae_calibrated: held-out errors of ``intercept + slope * predicted``.
        rmse_raw, mae_raw: held-out errors of the raw prediction (``measured`` against
            ``predicted``: slope 1, intercept 0, as the theory says).
        bias_raw: held-out mean of ``measured - predicted``.
        rmse_constant: held-out RMSE of the fitting half's mean of ``measured`` (a baseline that
            ignores the prediction).
    """

    fit_seeds: list
    test_seeds: list
    n_fit: int
    n_test: int
    n_dropped: int
    intercept: float
    slope: float
    slope_se: float
    slope_ci: tuple
    confidence: float
    rmse_calibrated: float
    mae_calibrated: float
    rmse_raw: float
    mae_raw: float
    bias_raw: float
    rmse_constant: float


def prediction_holdout(measured, predicted, seeds, *, fit_seeds=None, confidence: float = 0.95) -> HoldoutResult:
    """Out-of-sample check of the predicted loss increase: calibrate on some seeds, score on the rest.

    ``measured = intercept + slope * predicted`` is fitted by least squares on the rows whose seed
    is in ``fit_seeds`` (default: the first half of the sorted distinct seeds, rounded up); the
    other rows are held out. Models of one configuration differ in their seed only, so splitting
    by seed keeps every configuration on both sides while no held-out model was seen by the fit.

    Args:
        measured: measured loss increase per row.
        predicted: predicted loss increase per row.
        seeds: the training seed per row (``None`` rows are dropped, as are non-finite values).
        fit_seeds: seeds of the fitting half (default: the first half of the sorted seeds).
        confidence: level of the slope's t-interval.

    Returns:
        A :class:`HoldoutResult`.

    Raises:
        ValueError: lengths differ; fewer than 2 distinct seeds; ``fit_seeds`` not among the
            seeds or leaving none held out; fewer than 3 rows in the fitting half or a constant
            prediction there; a bad ``confidence``.

    Example:
        >>> r = prediction_holdout([0.2, 0.4, 0.6, 0.3, 0.5], [0.1, 0.2, 0.3, 0.15, 0.25], [0, 0, 0, 1, 1])
        >>> round(r.slope, 6), round(r.rmse_calibrated, 6), round(r.mae_raw, 6)
        (2.0, 0.0, 0.2)
    """
    y = np.asarray(measured, dtype=float).ravel()
    x = np.asarray(predicted, dtype=float).ravel()
    s = list(seeds)
    if not (len(x) == len(y) == len(s)):
        raise ValueError(f"prediction_holdout: measured, predicted and seeds differ in length "
                         f"({len(y)}, {len(x)}, {len(s)})")
    if not 0 < confidence < 1:
        raise ValueError(f"prediction_holdout: confidence must be in (0, 1), got {confidence}")
    s = [v.item() if isinstance(v, np.generic) else v for v in s]
    keep = np.isfinite(x) & np.isfinite(y) & np.array([v is not None for v in s], dtype=bool)
    dropped = int((~keep).sum())
    x, y = x[keep], y[keep]
    s = [v for v, k in zip(s, keep) if k]
    distinct = sorted(set(s))
    if len(distinct) < 2:
        raise ValueError(f"prediction_holdout: need at least 2 distinct seeds to hold some out, got "
                         f"{len(distinct)} ({distinct})")
    if fit_seeds is None:
        chosen = distinct[: (len(distinct) + 1) // 2]
    else:
        chosen = sorted(set(fit_seeds))
        unknown = [v for v in chosen if v not in distinct]
        if unknown:
            raise ValueError(f"prediction_holdout: fit_seeds {unknown} are not among the seeds {distinct}")
        if len(chosen) == len(distinct):
            raise ValueError("prediction_holdout: fit_seeds takes every seed; none is left to hold out")
    in_fit = np.array([v in chosen for v in s], dtype=bool)
    xf, yf, xt, yt = x[in_fit], y[in_fit], x[~in_fit], y[~in_fit]
    if len(xf) < 3:
        raise ValueError(f"prediction_holdout: need at least 3 rows in the fitting half (seeds {chosen}), "
                         f"got {len(xf)}")
    if np.ptp(xf) == 0:
        raise ValueError("prediction_holdout: the prediction is constant on the fitting half; no slope")
    lr = stats.linregress(xf, yf)
    t = stats.t.ppf(0.5 + confidence / 2, len(xf) - 2)
    cal = yt - (lr.intercept + lr.slope * xt)
    raw = yt - xt
    const = yt - yf.mean()
    return HoldoutResult(
        fit_seeds=chosen, test_seeds=[v for v in distinct if v not in chosen], n_fit=int(len(xf)),
        n_test=int(len(xt)), n_dropped=dropped, intercept=float(lr.intercept), slope=float(lr.slope),
        slope_se=float(lr.stderr), slope_ci=(float(lr.slope - t * lr.stderr), float(lr.slope + t * lr.stderr)),
        confidence=confidence, rmse_calibrated=float(np.sqrt(np.mean(cal ** 2))),
        mae_calibrated=float(np.mean(np.abs(cal))), rmse_raw=float(np.sqrt(np.mean(raw ** 2))),
        mae_raw=float(np.mean(np.abs(raw))), bias_raw=float(np.mean(raw)),
        rmse_constant=float(np.sqrt(np.mean(const ** 2))))


# -- tables ---------------------------------------------------------------------------------------
_TESTS = ("spearman", "kendall", "pearson")


def correlation_table(fits: list[FitResult], *, adjust: bool = False) -> list[dict]:
    """One row per fit with the headline numbers (for CSV/JSON and printing).

    Args:
        fits: the fits; with ``adjust``, they are one family of tests.
        adjust: add multiplicity-adjusted p-values over the fits passed: for each statistic
            ``s`` in spearman, kendall, pearson, ``{s}_p_holm`` (:func:`holm`) and ``{s}_q_bh``
            (:func:`benjamini_hochberg`), each adjusted over the ``m`` fits with a p-value for that
            statistic (NaN p-values, e.g. a constant ``y``, are not tests); ``m_tests`` is that
            ``m`` for Spearman's rho. Call once per family.

    Returns:
        One dict per fit, in order: names, ``n``, slope with its t-interval and bootstrap
        interval, the three correlations with p-values, rho's bootstrap interval,
        ``bootstrap_unit`` and ``n_groups`` (and the adjusted columns).
    """
    rows = [{"x": f.x_name, "y": f.y_name, "log": f.log, "n": f.n, "slope": f.slope,
             "slope_ci_low": f.slope_ci[0], "slope_ci_high": f.slope_ci[1], "pearson_r": f.pearson_r,
             "pearson_p": f.pearson_p, "spearman_rho": f.spearman_rho, "spearman_p": f.spearman_p,
             "kendall_tau": f.kendall_tau, "kendall_p": f.kendall_p,
             "bootstrap_rho_low": f.bootstrap_spearman_ci[0], "bootstrap_rho_high": f.bootstrap_spearman_ci[1],
             "bootstrap_slope_low": f.bootstrap_slope_ci[0], "bootstrap_slope_high": f.bootstrap_slope_ci[1],
             "bootstrap_unit": f.bootstrap_unit, "n_groups": f.n_groups}
            for f in fits]
    if adjust:
        for s in _TESTS:
            p = np.array([r[f"{s}_p"] for r in rows], dtype=float)
            for r, h, q in zip(rows, holm(p), benjamini_hochberg(p)):
                r[f"{s}_p_holm"], r[f"{s}_q_bh"] = float(h), float(q)
        m = int(np.isfinite(np.array([r["spearman_p"] for r in rows], dtype=float)).sum())
        for r in rows:
            r["m_tests"] = m
    return rows
