"""Regression of PTQ degradation against flatness, across a table of models.

For each pair (a flatness measure ``x``, a degradation ``y``): the ordinary least-squares line
with t-based confidence intervals for slope and intercept and a confidence band for the mean,
Pearson's r, Spearman's rho and Kendall's tau with their p-values (``scipy.stats``), and
percentile-bootstrap intervals for the slope and for rho (rows resampled with a seeded
generator: same seed, same interval). ``log=True`` fits ``log10 y`` on ``log10 x`` (a power law);
rows that are not finite, or not positive under ``log``, are dropped and counted.

:func:`prediction_slope` fits measured against predicted loss increase: the second-order
theory says the slope is 1 and the intercept 0.

Works on any table: a list of dicts (one per model), a dict of columns, or a pandas DataFrame.

Example:
    >>> from landscape.regress import fit
    >>> r = fit([1, 2, 3, 4, 5], [2.1, 3.9, 6.2, 8.1, 9.8], n_boot=200)
    >>> round(r.slope, 2), r.spearman_rho
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
        slope_ci, intercept_ci: t-based ``confidence`` intervals.
        r2: coefficient of determination.
        pearson_r, pearson_p, spearman_rho, spearman_p, kendall_tau, kendall_p: ``scipy.stats``.
        bootstrap_slope_ci, bootstrap_spearman_ci: percentile bootstrap intervals.
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


def fit(x, y, *, log: bool = False, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0,
        x_name: str = "x", y_name: str = "y") -> FitResult:
    """Fit ``y`` on ``x`` (arrays of equal length) and compute the correlation statistics.

    Raises:
        ValueError: lengths differ, fewer than 3 usable rows, ``x`` constant, or a bad
            ``confidence`` / ``n_boot``.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    keep = np.isfinite(x) & np.isfinite(y)
    if log:
        keep &= (x > 0) & (y > 0)
    dropped = int((~keep).sum())
    if dropped:
        why = "not finite or not positive (log scale)" if log else "not finite"
        warnings.warn(f"fit {y_name} ~ {x_name}: {dropped} of {len(x)} rows dropped ({why})", stacklevel=2)
    x, y = x[keep], y[keep]
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
    boot_slope, boot_rho = _bootstrap(x, y, n_boot, seed)
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
        pearson_r=float(lr.rvalue) if not constant_y else math.nan, pearson_p=float(lr.pvalue) if not constant_y else math.nan,
        spearman_rho=float(rho.statistic), spearman_p=float(rho.pvalue),
        kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue),
        bootstrap_slope_ci=pct(boot_slope), bootstrap_spearman_ci=pct(boot_rho),
        confidence=confidence, n_boot=n_boot, seed=seed, x=x.tolist(), y=y.tolist())


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


def regress(table, x: str | list[str], y: str | list[str], *, log: bool = False, **kwargs) -> list[FitResult]:
    """Fit every ``y`` column on every ``x`` column of ``table``; keyword arguments go to :func:`fit`.

    Example: ``regress(rows, ["trace", "top_eigenvalue"], ["acc_drop_W4A4", "acc_drop_W3A3"])``.
    """
    xs = [x] if isinstance(x, str) else list(x)
    ys = [y] if isinstance(y, str) else list(y)
    return [fit(column(table, a), column(table, b), log=log, x_name=a, y_name=b, **kwargs) for b in ys for a in xs]


def prediction_slope(measured, predicted, **kwargs) -> FitResult:
    """Fit measured against predicted loss increase (theory: slope 1, intercept 0).

    ``measured`` and ``predicted`` are arrays; keyword arguments go to :func:`fit`.
    """
    kwargs.setdefault("x_name", "predicted loss increase")
    kwargs.setdefault("y_name", "measured loss increase")
    return fit(predicted, measured, **kwargs)


def correlation_table(fits: list[FitResult]) -> list[dict]:
    """One row per fit with the headline numbers (for CSV/JSON and printing)."""
    return [{"x": f.x_name, "y": f.y_name, "log": f.log, "n": f.n, "slope": f.slope,
             "slope_ci_low": f.slope_ci[0], "slope_ci_high": f.slope_ci[1], "pearson_r": f.pearson_r,
             "pearson_p": f.pearson_p, "spearman_rho": f.spearman_rho, "spearman_p": f.spearman_p,
             "kendall_tau": f.kendall_tau, "kendall_p": f.kendall_p,
             "bootstrap_rho_low": f.bootstrap_spearman_ci[0], "bootstrap_rho_high": f.bootstrap_spearman_ci[1]}
            for f in fits]
