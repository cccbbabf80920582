"""landscape.regress against scipy.stats and synthetic tables with a known slope."""

import math

import numpy as np
import pytest
from scipy import stats

from landscape.regress import (
    adjust_pvalues,
    benjamini_hochberg,
    cluster_bootstrap_counts,
    cluster_bootstrap_indices,
    column,
    correlation_table,
    fit,
    holm,
    prediction_holdout,
    prediction_slope,
    regress,
)


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



# -- multiplicity ---------------------------------------------------------------------------------
def test_holm_and_bh_on_a_hand_worked_example():
    # p = [0.01, 0.04, 0.03, 0.005], m = 4; sorted: 0.005 (#3), 0.01 (#0), 0.03 (#2), 0.04 (#1).
    # Holm, (m - j + 1) p_(j): 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, 1*0.04 = 0.04;
    #   running maximum: 0.02, 0.03, 0.06, 0.06  -> input order [0.03, 0.06, 0.06, 0.02].
    # BH, m p_(j) / j: 4*0.005/1 = 0.02, 4*0.01/2 = 0.02, 4*0.03/3 = 0.04, 4*0.04/4 = 0.04;
    #   running minimum from the top: 0.02, 0.02, 0.04, 0.04 -> input order [0.02, 0.04, 0.04, 0.02].
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust_pvalues(p, "holm") == pytest.approx(holm(p))
    assert adjust_pvalues(p, "bh") == pytest.approx(benjamini_hochberg(p))
    # capped at 1 and monotone: Holm 2*0.5 = 1.0, 1*0.6 -> max(1.0, 0.6); BH 2*0.5/1 = 1.0, 2*0.6/2 = 0.6 -> min
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]
    assert benjamini_hochberg([0.5, 0.6]).tolist() == pytest.approx([0.6, 0.6])
    assert holm([0.9, 0.8, 0.7]).max() == 1.0 and isinstance(holm([0.1]), np.ndarray)


def test_nan_is_not_a_test_and_stays_nan():
    # the NaN does not count: m = 2, so Holm 2*0.01 = 0.02, 1*0.04 = 0.04; BH 2*0.01/1 = 0.02, 2*0.04/2 = 0.04
    h = holm([0.01, float("nan"), 0.04])
    q = benjamini_hochberg([0.01, float("nan"), 0.04])
    assert np.isnan(h[1]) and np.isnan(q[1])
    assert [h[0], h[2]] == pytest.approx([0.02, 0.04]) and [q[0], q[2]] == pytest.approx([0.02, 0.04])
    assert np.isnan(holm([np.nan, np.nan])).all() and holm([]).shape == (0,)


def test_adjustments_agree_with_scipy_and_the_definitions_on_random_families():
    rng = np.random.default_rng(4)
    for m in (1, 2, 5, 17, 60):
        p = rng.uniform(0, 1, m) ** 3
        p[rng.integers(0, m)] = p[0]  # a tie
        assert benjamini_hochberg(p) == pytest.approx(stats.false_discovery_control(p, method="bh"))
        order = np.argsort(p, kind="stable")
        ps = p[order]
        want = np.empty(m)
        want[order] = [min(1.0, max((m - j) * ps[j] for j in range(i + 1))) for i in range(m)]
        h = holm(p)
        assert h == pytest.approx(want)
        assert np.all(h >= p) and np.all(h <= 1) and np.all(np.diff(h[order]) >= 0)
        q = benjamini_hochberg(p)
        assert np.all(q >= p) and np.all(q <= h + 1e-15) and np.all(np.diff(q[order]) >= 0)


def test_bad_p_values_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"in \[0, 1\].*1.5 at position 1"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        benjamini_hochberg([-0.01, 0.2])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        holm([float("inf")])
    with pytest.raises(ValueError, match="must be numbers"):
        holm(["a"])
    with pytest.raises(ValueError, match="method must be one of"):
        adjust_pvalues([0.1], "bonferroni")


# -- the cluster bootstrap ------------------------------------------------------------------------
def test_the_cluster_bootstrap_never_splits_a_group():
    groups = ["a"] * 3 + ["b"] * 1 + ["c"] * 4 + ["d"] * 2 + ["e"] * 3
    labels = np.array(groups)
    counts = cluster_bootstrap_counts(groups, 500, np.random.default_rng(0))
    assert counts.shape == (500, len(groups))
    for g in "abcde":  # every row of a group appears exactly as often as the group was drawn
        assert (counts[:, labels == g] == counts[:, labels == g][:, :1]).all()
    per_group = np.stack([counts[:, labels == g][:, 0] for g in "abcde"], 1)
    assert (per_group.sum(1) == 5).all()  # G = 5 draws per resample
    assert (per_group == 0).any() and (per_group >= 2).any()  # with replacement
    for idx in cluster_bootstrap_indices(groups, 200, np.random.default_rng(1)):
        drawn = labels[idx]
        for g in set(drawn):
            rows = np.flatnonzero(labels == g)
            k = int((drawn == g).sum()) // len(rows)
            assert sorted(idx[drawn == g].tolist()) == sorted(rows.tolist() * k)  # all rows, k times each
    again = cluster_bootstrap_counts(groups, 500, np.random.default_rng(0))
    assert (again == counts).all()


def test_cluster_bootstrap_statistics_are_those_of_the_expanded_resamples(monkeypatch):
    """The vectorised weighted slope and rho equal scipy on each resample written out row by row."""
    import landscape.regress as R

    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(7), [1, 2, 3, 2, 4, 1, 3])
    x = np.round(rng.normal(size=len(groups)), 1)  # rounded: ties inside and across resamples
    y = x + rng.normal(size=len(groups))
    w = cluster_bootstrap_counts(groups, 60, np.random.default_rng(3))
    slope, rho = R._weighted_stats(x, y, w)
    for b in range(60):
        idx = np.repeat(np.arange(len(x)), w[b])
        if np.ptp(x[idx]) == 0 or np.ptp(y[idx]) == 0:
            assert np.isnan(rho[b])
            continue
        assert slope[b] == pytest.approx(stats.linregress(x[idx], y[idx]).slope)
        assert rho[b] == pytest.approx(stats.spearmanr(x[idx], y[idx]).statistic)


def test_clustered_data_give_a_wider_interval_than_rows_pretend():
    # 5 configurations of 4 near-identical seeds: 5 independent points, not 20
    rng = np.random.default_rng(0)
    x = np.repeat([1.0, 2, 3, 4, 5], 4) + rng.normal(0, 0.01, 20)
    y = np.repeat([1.0, 3, 2, 5, 4], 4) + rng.normal(0, 0.01, 20)
    groups = np.repeat(["c1", "c2", "c3", "c4", "c5"], 4)
    c = fit(x, y, groups=groups, n_boot=2000, seed=1)
    r = fit(x, y, n_boot=2000, seed=1)
    assert (c.bootstrap_unit, c.n_groups, r.bootstrap_unit, r.n_groups) == ("cluster", 5, "row", None)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(c.bootstrap_slope_ci) > 1.5 * width(r.bootstrap_slope_ci)
    assert width(c.bootstrap_spearman_ci) > 1.5 * width(r.bootstrap_spearman_ci)
    assert c.slope == r.slope and c.spearman_p == r.spearman_p  # only the bootstrap changes
    assert fit(x, y, groups=groups, seed=7).bootstrap_slope_ci == fit(x, y, groups=groups, seed=7).bootstrap_slope_ci


def test_groups_follow_the_dropped_rows_and_bad_labels_are_named():
    x = [1.0, 2, 3, 4, 5, float("nan"), float("nan")]
    y = [1.0, 2.5, 2.9, 4.2, 5.1, 6, 7]
    with pytest.warns(UserWarning, match="2 of 7 rows dropped"):
        r = fit(x, y, groups=["a", "a", "b", "b", "c", "d", "d"], n_boot=100)
    assert r.n == 5 and r.n_groups == 3 and r.bootstrap_unit == "cluster"  # group d had only dropped rows
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        fit([1, 2, 3, 4], [1, 2, 3, 5], groups=["a", "b", "c"])
    with pytest.raises(ValueError, match="row 1 is missing"):
        fit([1, 2, 3, 4], [1, 2, 3, 5], groups=["a", None, "b", "b"])
    with pytest.warns(UserWarning, match="one group only"):
        one = fit([1, 2, 3, 4], [1, 2, 3, 5], groups=[0, 0, 0, 0], n_boot=50)
    assert math.isnan(one.bootstrap_slope_ci[0]) and one.n_groups == 1


def test_the_cluster_bootstrap_is_fast():
    import time

    rng = np.random.default_rng(5)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    groups = np.repeat(np.arange(20), 3)
    fit(x, y, groups=groups, n_boot=50)  # warm-up (imports, caches)
    t = time.perf_counter()
    fit(x, y, groups=groups, n_boot=2000)
    assert time.perf_counter() - t < 0.5


def test_regress_takes_a_group_column_and_the_table_shows_unit_and_adjusted_p():
    rows = [{"config": f"c{i // 2}", "trace": float(i) + 0.1 * (i % 2), "drop": 0.5 * i + 0.3 * (-1) ** i,
             "eig": float((7 * i) % 10)} for i in range(10)]
    fits = regress(rows, ["trace", "eig"], ["drop"], groups="config", n_boot=200)
    assert all(f.bootstrap_unit == "cluster" and f.n_groups == 5 for f in fits)
    plain = correlation_table(fits)
    assert "spearman_p_holm" not in plain[0] and plain[0]["bootstrap_unit"] == "cluster"
    table = correlation_table(fits, adjust=True)
    p = [f.spearman_p for f in fits]
    assert [t["spearman_p_holm"] for t in table] == pytest.approx(holm(p).tolist())
    assert [t["spearman_q_bh"] for t in table] == pytest.approx(benjamini_hochberg(p).tolist())
    assert [t["kendall_p_holm"] for t in table] == pytest.approx(holm([f.kendall_p for f in fits]).tolist())
    assert {t["m_tests"] for t in table} == {2} and table[0]["n_groups"] == 5


# -- out-of-sample check of the prediction --------------------------------------------------------
def test_holdout_of_exact_linear_data_has_no_error():
    pred = np.array([0.1, 0.2, 0.3, 0.4, 0.15, 0.25, 0.35, 0.45])
    seeds = [0, 0, 0, 0, 1, 1, 1, 1]
    r = prediction_holdout(3.0 * pred - 0.05, pred, seeds)
    assert (r.fit_seeds, r.test_seeds, r.n_fit, r.n_test) == ([0], [1], 4, 4)
    assert r.slope == pytest.approx(3.0) and r.intercept == pytest.approx(-0.05)
    assert r.rmse_calibrated == pytest.approx(0, abs=1e-12) and r.mae_calibrated == pytest.approx(0, abs=1e-12)
    # raw error on held-out: (3p - 0.05) - p = 2p - 0.05 at p = 0.15, 0.25, 0.35, 0.45: 0.25, 0.45, 0.65, 0.85
    assert r.mae_raw == pytest.approx((0.25 + 0.45 + 0.65 + 0.85) / 4)
    assert r.rmse_raw == pytest.approx(math.sqrt((0.25 ** 2 + 0.45 ** 2 + 0.65 ** 2 + 0.85 ** 2) / 4))


def test_holdout_with_a_known_offset_and_noise_by_hand():
    # measured = predicted + 0.1 exactly: raw errors are all 0.1, the calibration removes them
    pred = [1.0, 2.0, 3.0, 1.5, 2.5]
    r = prediction_holdout([p + 0.1 for p in pred], pred, [2, 2, 2, 7, 7])
    assert r.slope == pytest.approx(1.0) and r.intercept == pytest.approx(0.1)
    assert (r.rmse_raw, r.mae_raw, r.bias_raw) == (pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1))
    assert r.rmse_calibrated == pytest.approx(0, abs=1e-12)
    # fitting half (seed 0): predicted 0, 1, 2 -> measured 0, 2, 1: xbar = 1, ybar = 1, Sxx = 2,
    # Sxy = (-1)(-1) + 0 + (1)(0) = 1: slope 0.5, intercept 0.5; residuals -0.5, 1, -0.5: s^2 = 1.5 / 1,
    # se = sqrt(1.5 / 2) = 0.8660; t(0.975, 1) = 12.706.
    # held out (seed 1): predicted 4 -> measured 3: calibrated 0.5 + 0.5*4 = 2.5, error 0.5; raw error -1;
    # the fitting-half mean (1) misses by 2.
    r = prediction_holdout([0.0, 2.0, 1.0, 3.0], [0.0, 1.0, 2.0, 4.0], [0, 0, 0, 1])
    assert (r.slope, r.intercept) == (pytest.approx(0.5), pytest.approx(0.5))
    assert r.slope_se == pytest.approx(math.sqrt(0.75))
    assert r.slope_ci == (pytest.approx(0.5 - 12.7062 * math.sqrt(0.75), rel=1e-4),
                          pytest.approx(0.5 + 12.7062 * math.sqrt(0.75), rel=1e-4))
    assert (r.rmse_calibrated, r.mae_calibrated) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (r.rmse_raw, r.mae_raw, r.bias_raw) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(-1.0))
    assert r.rmse_constant == pytest.approx(2.0)
    assert r.to_dict()["test_seeds"] == [1]


def test_holdout_split_options_and_errors():
    pred = np.arange(9, dtype=float)
    meas = 2 * pred + 1
    seeds = [0, 1, 2] * 3
    r = prediction_holdout(meas, pred, seeds)
    assert r.fit_seeds == [0, 1] and r.test_seeds == [2] and (r.n_fit, r.n_test) == (6, 3)  # half, rounded up
    r = prediction_holdout(meas, pred, seeds, fit_seeds=[2])
    assert r.test_seeds == [0, 1] and r.n_fit == 3
    with pytest.raises(ValueError, match="at least 2 distinct seeds"):
        prediction_holdout(meas, pred, [0] * 9)
    with pytest.raises(ValueError, match="at least 3 rows in the fitting half"):
        prediction_holdout([1.0, 2, 3, 4], [1.0, 2, 3, 4], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="not among the seeds"):
        prediction_holdout(meas, pred, seeds, fit_seeds=[5])
    with pytest.raises(ValueError, match="none is left to hold out"):
        prediction_holdout(meas, pred, seeds, fit_seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="differ in length"):
        prediction_holdout(meas, pred, seeds[:-1])
    r = prediction_holdout([*meas, np.nan], [*pred, 1.0], [*seeds, 0])
    assert r.n_dropped == 1
