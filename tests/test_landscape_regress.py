"""landscape.regress against scipy.stats and synthetic tables with a known slope."""

import math

import numpy as np
import pytest
from scipy import stats

from landscape.regress import column, correlation_table, fit, prediction_slope, regress


def test_statistics_equal_scipy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5, 30)
    y = 0.7 * x + rng.normal(0, 1, 30)
    r = fit(x, y, n_boot=0)
    lr = stats.linregress(x, y)
    assert r.slope == pytest.approx(lr.slope) and r.intercept == pytest.approx(lr.intercept)
    assert r.slope_se == pytest.approx(lr.stderr) and r.pearson_p == pytest.approx(lr.pvalue)
    rho, p_rho = stats.spearmanr(x, y)
    tau, p_tau = stats.kendalltau(x, y)
    assert (r.spearman_rho, r.spearman_p) == (pytest.approx(rho), pytest.approx(p_rho))
    assert (r.kendall_tau, r.kendall_p) == (pytest.approx(tau), pytest.approx(p_tau))
    # t interval by hand
    t = stats.t.ppf(0.975, 28)
    assert r.slope_ci == (pytest.approx(lr.slope - t * lr.stderr), pytest.approx(lr.slope + t * lr.stderr))


def test_confidence_interval_covers_the_true_slope_at_its_level():
    rng = np.random.default_rng(1)
    hits = boot_hits = 0
    sims = 300
    for i in range(sims):
        x = rng.uniform(0, 1, 15)
        y = 1.0 + 2.0 * x + rng.normal(0, 0.3, 15)
        r = fit(x, y, n_boot=300, seed=i)
        hits += r.slope_ci[0] <= 2.0 <= r.slope_ci[1]
        boot_hits += r.bootstrap_slope_ci[0] <= 2.0 <= r.bootstrap_slope_ci[1]
    assert 0.91 <= hits / sims <= 0.98
    assert 0.85 <= boot_hits / sims <= 0.98  # percentile bootstrap undercovers a little at n = 15


def test_band_of_the_mean_covers_the_true_line_and_widens_away_from_the_centre():
    rng = np.random.default_rng(2)
    x = np.linspace(0, 1, 40)
    y = 3 - x + rng.normal(0, 0.1, 40)
    r = fit(x, y, n_boot=0)
    lo, hi = r.band([0.5, 2.0])
    assert lo[0] <= 2.5 <= hi[0]
    assert (hi - lo)[1] > (hi - lo)[0]


def test_log_fit_recovers_a_power_law_and_drops_nonpositive_rows():
    x = np.array([1.0, 2, 4, 8, 16, 32])
    y = 0.5 * x ** 1.5
    with pytest.warns(UserWarning, match="1 of 7 rows dropped"):
        r = fit(np.append(x, 3.0), np.append(y, -1.0), log=True, n_boot=50)
    assert r.slope == pytest.approx(1.5) and r.intercept == pytest.approx(math.log10(0.5)) and r.n_dropped == 1


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert fit(x, y, seed=5).bootstrap_slope_ci == fit(x, y, seed=5).bootstrap_slope_ci
    assert fit(x, y, seed=5).bootstrap_slope_ci != fit(x, y, seed=6).bootstrap_slope_ci


def test_tables_of_any_shape_and_prediction_slope():
    rows = [{"name": f"m{i}", "trace": float(i + 1), "drop": 2.0 * (i + 1) + 0.1 * (-1) ** i} for i in range(6)]
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    a = regress(rows, ["trace"], ["drop"], n_boot=0)[0]
    b = regress(cols, "trace", "drop", n_boot=0)[0]
    assert a.slope == b.slope and a.x_name == "trace" and a.y_name == "drop"
    assert correlation_table([a])[0]["spearman_rho"] == a.spearman_rho
    with pytest.raises(KeyError, match="no column 'sharpness'"):
        column(rows, "sharpness")
    p = prediction_slope(measured=[0.1, 0.21, 0.29, 0.42], predicted=[0.1, 0.2, 0.3, 0.4], n_boot=0)
    assert p.slope_ci[0] < 1 < p.slope_ci[1] and p.y_name == "measured loss increase"


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="at least 3 usable rows"):
        fit([1, 2], [1, 2])
    with pytest.raises(ValueError, match="x is constant"):
        fit([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="differ in length"):
        fit([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="confidence"):
        fit([1, 2, 3], [1, 2, 4], confidence=95)
