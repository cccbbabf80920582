"""landscape.report on a study directory written by hand (study.json + models/*.json), so that it
does not depend on training anything: the PTQ settings and splits in the header, one correlation
family per (bit-width, PTQ variant) with its test count and Holm / BH columns, the cluster
bootstrap over training configurations, the out-of-sample check of the prediction, no pooling
across bit-widths, and graceful fallbacks for a study that predates those fields.

The loaders (``load_records``, ``summary_rows``) are replaced by plain readers of the rows stored
in the fake records, so these tests exercise the report alone.
"""

import csv
import json
import math
import re

import numpy as np
import pytest

import landscape.report.writer as report  # build, and the names it reads (monkeypatched)
from landscape.regress import benjamini_hochberg, holm
from landscape.report import analysis

BITS = ["W4A4", "W3A3"]
EVIL = "<b>x&y</b>"
PTQ = {"variants": ["rtn", "rtn+bn"], "weight_mode": "symmetric", "weight_granularity": "per output channel",
       "act": "asymmetric per tensor", "range": "minmax", "first_last_bits": 8, "calib_size": 256,
       "calib_split": "train (validation images excluded)", "fold_bn": True}


def _rows(n_configs=5, seeds=(0, 1, 2), new=True, seed=0):
    """Summary rows as ``summary_rows`` gives them: n_configs configurations x seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_configs):
        sharp = 1.0 + c  # configurations differ in flatness, seeds a little
        for s in seeds:
            trace = sharp * 100 * (1 + 0.05 * rng.normal())
            row = {"model": f"{EVIL} c{c} (seed {s})" if c == 0 else f"c{c} (seed {s})",
                   "method": "dnq" if c % 2 else "sgd", "lambda_max": float(c), "sam_rho": None, "seed": s,
                   "fp_acc": 0.95 - 0.001 * c, "fp_loss": 0.2 + 0.01 * rng.normal(), "trace": trace,
                   "trace_se": 1.0, "top_eigenvalue": sharp * 10 * (1 + 0.05 * rng.normal())}
            if new:
                row.update(config=f"cfg{c}", fp_val_acc=0.94 - 0.001 * c, fp_val_loss=0.21)
            for k, b in enumerate(BITS):
                scale = 1.0 + 3 * k
                drop = 0.01 * scale * sharp + 0.003 * rng.normal()
                pred = 0.02 * scale * sharp * (1 + 0.1 * rng.normal())
                row.update({f"ptq_acc_{b}": row["fp_acc"] - drop, f"acc_drop_{b}": drop,
                            f"ptq_loss_increase_{b}": 5 * drop, f"trace_h_sigma_{b}": trace * 1e-3 * scale,
                            f"predicted_{b}": pred, f"measured_{b}": 1.2 * pred + 0.001 * rng.normal()})
                if new:
                    row.update({f"ptq_acc_{b}_bn": row["fp_acc"] - drop / 2, f"acc_drop_{b}_bn": drop / 2,
                                f"ptq_loss_increase_{b}_bn": 2 * drop + 0.001 * rng.normal(),
                                f"ptq_val_acc_{b}": row["fp_val_acc"] - drop,
                                f"ptq_val_acc_{b}_bn": row["fp_val_acc"] - drop / 2})
            rows.append(row)
    return rows


def _write_study(path, rows, *, new=True, name="fake"):
    """study.json and one models/<id>.json per row (the row kept in the record for the fake loaders)."""
    (path / "models").mkdir(parents=True)
    cfg = {"name": name, "data": "digits", "model": "cnn-digits", "runs": [{"method": "sgd"}], "seeds": [0],
           "bits": BITS, "train_bits": "W3A3", "train": {}, "instruments": {"hessian_samples": 512}}
    meta = {"config": cfg, "hash": "abc123"}
    if new:
        cfg["ptq"] = PTQ
        meta["splits"] = {"train": 1437, "val": 180, "test": 180}
    (path / "study.json").write_text(json.dumps(meta))
    for i, row in enumerate(rows):
        rid = f"m{i:02d}"
        rec = {"id": rid, "name": row["model"], "settings": {"method": row["method"], "seed": row["seed"]},
               "run_dir": f"runs/{rid}", "measurements": {}, "_row": row}
        (path / "models" / f"{rid}.json").write_text(json.dumps(rec))
    return path


@pytest.fixture(autouse=True)
def fake_loaders(monkeypatch):
    def load_records(path):
        path = report.Path(path)
        if not (path / "study.json").is_file():
            raise report.StudyError(f"{path} holds no study.json")
        return [json.loads(p.read_text()) for p in sorted((path / "models").glob("*.json"))]

    monkeypatch.setattr(report, "load_records", load_records)
    monkeypatch.setattr(report, "summary_rows", lambda records, bits=None: [dict(r["_row"]) for r in records])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = _write_study(tmp_path_factory.mktemp("fake") / "study", _rows())
    with pytest.MonkeyPatch.context() as mp:  # the module-scoped build needs the fake loaders too
        mp.setattr(report, "load_records",
                   lambda p: [json.loads(f.read_text()) for f in sorted((report.Path(p) / "models").glob("*.json"))])
        mp.setattr(report, "summary_rows", lambda records, bits=None: [dict(r["_row"]) for r in records])
        html = report.build(path, n_boot=300)
    return path, html.read_text(), json.loads((path / "summary.json").read_text())


def test_header_states_the_ptq_settings_the_splits_and_where_each_number_comes_from(built):
    _, html, summary = built
    header = re.search(r"<p class='note' id='ptq-settings'>(.*?)</p>", html, re.S).group(1)
    for want in ("W4A4: weights 4 bits, activations 4 bits", "W3A3: weights 3 bits, activations 3 bits",
                 "symmetric, per output channel", "asymmetric per tensor", "Range: minmax",
                 "First and last layers at 8 bits", "256 images from train (validation images excluded)",
                 "BatchNorm folded into the convolutions: yes", "rtn+bn", "re-estimated on the calibration images"):
        assert want in header, want
    splits = re.search(r"<p class='note' id='splits'>(.*?)</p>", html, re.S).group(1)
    assert "train 1437, val 180, test 180" in splits
    assert "FP val / FP test" in splits and "PTQ accuracy" in splits and "test split" in splits
    assert "512 non-augmented training images" in splits
    assert summary["ptq"] == PTQ and summary["splits"] == {"train": 1437, "val": 180, "test": 180}


def test_summary_table_shows_fp_val_and_test_and_both_variants(built):
    _, html, _ = built
    summary = html.split("<h2 id='summary'>", 1)[1].split("</table>", 1)[0]
    for col in ("FP val acc", "FP test acc", "W4A4 rtn test acc", "W4A4 rtn+bn test acc", "W3A3 rtn+bn test acc"):
        assert f">{col}<" in summary, col


def test_one_correlation_family_per_bit_width_and_variant_with_its_test_count(built):
    _, html, summary = built
    assert [(f["bits"], f["variant"], f["m_tests"]) for f in summary["families"]] == [
        ("W4A4", "rtn", 8), ("W4A4", "rtn+bn", 8), ("W3A3", "rtn", 8), ("W3A3", "rtn+bn", 8)]
    corr = html.split("<h2 id='correlations'>", 1)[1].split("<h2 id='prediction'>", 1)[0]
    assert len(re.findall(r"<h3 id='corr-", corr)) == 4
    notes = re.findall(r"<p class='note family'>(.*?)</p>", corr)
    assert len(notes) == 4 and all(n.startswith("m = 8 tests per statistic in this table; Holm") and "BH" in n
                                   for n in notes)
    assert "cluster bootstrap over configs" in notes[0]
    for head in (">p Holm<", ">q BH<", ">configs<", ">boot low<"):
        assert head in corr
    # the adjusted columns are Holm / BH over exactly the family's 8 Spearman p-values
    for fam in summary["families"]:
        rows = [r for r in summary["correlations"] if r["family"] == fam["family"]]
        assert len(rows) == 8 and {r["y"].endswith("_bn") for r in rows} == {fam["variant"] == "rtn+bn"}
        p = [r["spearman_p"] for r in rows]
        assert [r["spearman_p_holm"] for r in rows] == pytest.approx(holm(p).tolist())
        assert [r["spearman_q_bh"] for r in rows] == pytest.approx(benjamini_hochberg(p).tolist())
        assert all(r["bootstrap_unit"] == "cluster" and r["n_groups"] == 5 for r in rows)
    allp = [r["spearman_p"] for r in summary["correlations"]]
    assert [r["spearman_p_holm_report"] for r in summary["correlations"]] == pytest.approx(holm(allp).tolist())


def test_correlations_csv_has_variant_unit_and_adjusted_columns(built):
    path, _, _ = built
    with open(path / "correlations.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32
    for col in ("bits", "variant", "family", "m_tests", "bootstrap_unit", "n_groups", "spearman_p_holm",
                "spearman_q_bh", "kendall_p_holm", "pearson_q_bh", "spearman_p_holm_report"):
        assert col in rows[0], col
    assert {r["variant"] for r in rows} == {"rtn", "rtn+bn"} and {r["bootstrap_unit"] for r in rows} == {"cluster"}
    with open(path / "summary.csv") as f:
        srows = list(csv.DictReader(f))
    assert {"config", "fp_val_acc", "ptq_acc_W4A4_bn", "ptq_val_acc_W3A3_bn"} <= set(srows[0])


def test_no_fit_is_pooled_across_bit_widths(built):
    _, html, summary = built
    assert set(summary["prediction"]) == set(BITS)
    assert "Pooled" not in html and "pooled over" not in html.lower()
    assert {r["bits"] for r in summary["correlations"]} == set(BITS)
    for r in summary["correlations"]:  # every y belongs to its row's bit-width
        assert r["bits"] in r["y"]
    assert all(p["bootstrap_unit"] == "cluster" for p in summary["prediction"].values())


def test_prediction_section_has_the_out_of_sample_check(built):
    _, html, summary = built
    pred = html.split("<h2 id='prediction'>", 1)[1].split("<h2 id='models'>", 1)[0]
    for head in ("RMSE calibrated", "MAE calibrated", "RMSE raw", "MAE raw", "slope (fit half)", "held-out seeds"):
        assert f">{head}<" in pred, head
    h = summary["prediction_holdout"]["W4A4"]
    assert h["fit_seeds"] == [0, 1] and h["test_seeds"] == [2] and h["n_fit"] == 10 and h["n_test"] == 5
    # measured = 1.2 predicted (+ tiny noise): the calibration beats the raw prediction out of sample
    assert h["rmse_calibrated"] < h["rmse_raw"] and 1.0 < h["slope"] < 1.4


def test_user_strings_are_escaped(built):
    _, html, _ = built
    body = html.split("<body>", 1)[1].split("<script type='application/json'", 1)[0]
    assert EVIL not in html  # nowhere: not in the page, not in the figures' JSON
    assert EVIL not in body and "&lt;b&gt;x&amp;y&lt;/b&gt;" in body


def test_static_figures_per_variant(built):
    path, _, _ = built
    for stem in ("sharpness_vs_ptq_W4A4", "sharpness_vs_ptq_W3A3", "measured_vs_predicted"):
        for ext in ("png", "pdf"):
            assert (path / "figures" / f"{stem}.{ext}").stat().st_size > 1000


def test_an_old_study_without_the_new_fields_falls_back_and_says_so(tmp_path):
    path = _write_study(tmp_path / "old", _rows(new=False), new=False)
    text = report.build(path, static=False, n_boot=100).read_text()
    summary = json.loads((path / "summary.json").read_text())
    header = re.search(r"<p class='note' id='ptq-settings'>(.*?)</p>", text, re.S).group(1)
    assert "not recorded" in header and "W4A4: weights 4 bits" in header
    assert "Splits: not recorded" in text
    assert [f["variant"] for f in summary["families"]] == ["rtn", "rtn"]
    assert all(r["bootstrap_unit"] == "row" and r["n_groups"] is None for r in summary["correlations"])
    corr = text.split("<h2 id='correlations'>", 1)[1].split("<h2 id='prediction'>", 1)[0]
    assert "no config column" in corr and "resampling models one by one" in corr
    assert ">W4A4 rtn+bn test acc<" not in text and summary["bootstrap"]["unit"] == "row"


def test_a_study_still_running_and_too_few_seeds(tmp_path):
    rows = _rows(n_configs=4, seeds=(0,))
    for r in rows[2:]:  # two models not measured yet
        for k in list(r):
            if k.startswith(("ptq_", "acc_drop_", "trace", "predicted_", "measured_", "top_")):
                r[k] = None
    path = _write_study(tmp_path / "running", rows)
    text = report.build(path, static=False, n_boot=50).read_text()
    summary = json.loads((path / "summary.json").read_text())
    assert summary["families"] and all(f["m_tests"] == 0 for f in summary["families"])
    assert "need at least 3 usable rows" in text
    assert "No out-of-sample check" in text and "at least 2 distinct seeds" in text
    assert all("skipped" in h for h in summary["prediction_holdout"].values())


def test_one_seed_per_configuration_gives_no_holdout_but_cluster_bootstrap_still_works(tmp_path):
    path = _write_study(tmp_path / "s", _rows(n_configs=6, seeds=(3,)))
    report.build(path, static=False, n_boot=100)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["prediction_holdout"]["W4A4"] == {"skipped": "need at least 2 distinct seeds to hold some out, "
                                                                "got 1 ([3])"}
    assert all(r["n_groups"] == 6 for r in summary["correlations"])
    assert all(math.isfinite(r["bootstrap_rho_low"]) for r in summary["correlations"])


def test_the_per_variant_figures_render_in_a_real_browser(built, tmp_path):
    import os
    import shutil
    import subprocess

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    if browser is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("no chromium on PATH, and REQUIRE_BROWSER=1")
        pytest.skip("no chromium on PATH")
    path, _, _ = built
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
                        "--virtual-time-budget=60000", "--dump-dom", (path / "report.html").resolve().as_uri()],
                       capture_output=True, text=True, timeout=300)
    status = re.search(r"<p id=\"report-status\"([^>]*)>(.*?)</p>", r.stdout, re.S)
    assert status is not None, r.stderr[-3000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', status.group(1)))
    assert attrs.get("done") == "1" and attrs["errors"] == "0", status.group(0)
    assert int(attrs["plots"]) == 3 and attrs["rendered"] == attrs["plots"], status.group(2)


def test_method_comparison_chooses_on_validation_never_on_test():
    from landscape.report import VARIANTS, method_comparison

    rows = []
    # config a: better on validation, worse on test; config b: the reverse
    for cfg, val, test in (("dnq-lam1", 0.9, 0.5), ("dnq-lam2", 0.8, 0.99)):
        for seed, jitter in ((0, 0.0), (1, 0.02)):
            rows.append({"method": "dnq", "config": cfg, "seed": seed, "fp_val_acc": val, "fp_acc": test + jitter,
                         "ptq_val_acc_W2A4": val, "ptq_acc_W2A4": test + jitter})
    rows.append({"method": "sgd", "config": "sgd", "seed": 0, "fp_val_acc": 0.7, "fp_acc": 0.7,
                 "ptq_val_acc_W2A4": None, "ptq_acc_W2A4": 0.6})  # no validation number: no choice
    table = method_comparison(rows, ["W2A4"], [VARIANTS[0]])
    dnq = next(r for r in table if r["method"] == "dnq")
    assert dnq["configs"] == 2
    assert dnq["FP"] == "51.00 ± 1.41 (n=2) [dnq-lam1]"  # mean of 0.50 and 0.52, sd 0.0141
    assert dnq["W2A4 rtn"].startswith("51.00") and "[dnq-lam1]" in dnq["W2A4 rtn"]
    sgd = next(r for r in table if r["method"] == "sgd")
    assert "W2A4 rtn" not in sgd and sgd["FP"].startswith("70.00 ± nan (n=1)")


# ------------------------------------------------------------- training method x PTQ method grid
def _grid_rows():
    """3 configurations x 2 seeds with rtn, rtn+bn and qdrop columns (qdrop best except for c2)."""
    rows = _rows(n_configs=3, seeds=(0, 1))
    for i, r in enumerate(rows):
        for b in BITS:
            r[f"ptq_acc_{b}_qdrop"] = r[f"ptq_acc_{b}_bn"] + 0.01 * (1 + i % 2)
            r[f"ptq_val_acc_{b}_qdrop"] = r[f"ptq_val_acc_{b}_bn"] + 0.01
            r[f"acc_drop_{b}_qdrop"] = r["fp_acc"] - r[f"ptq_acc_{b}_qdrop"]
            r[f"ptq_loss_increase_{b}_qdrop"] = r[f"acc_drop_{b}_qdrop"] * 3
    return rows


def test_training_by_ptq_grid_mean_std_over_seeds_and_the_best_per_column(tmp_path):
    rows = _grid_rows()
    path = _write_study(tmp_path / "study", rows)
    meta = json.loads((path / "study.json").read_text())
    meta["config"]["ptq"] = {**PTQ, "variants": ["rtn", "rtn+bn", "qdrop"], "recon_iters": 500,
                             "recon_calib_size": 1024, "recon_batch_size": 32, "recon_range": "mse"}
    (path / "study.json").write_text(json.dumps(meta))
    html = report.build(path, n_boot=50, static=False).read_text()
    summary = json.loads((path / "summary.json").read_text())
    grid = summary["training_by_ptq"]
    assert list(grid) == BITS and summary["variants"] == ["rtn", "rtn+bn", "qdrop"]
    for b in BITS:
        assert [r["config"] for r in grid[b]] == ["cfg0", "cfg1", "cfg2"]
        for r in grid[b]:
            mine = [x for x in rows if x["config"] == r["config"]]
            for col, key in (("FP", "fp_acc"), ("rtn", f"ptq_acc_{b}"), ("rtn+bn", f"ptq_acc_{b}_bn"),
                             ("qdrop", f"ptq_acc_{b}_qdrop")):
                vals = np.array([x[key] for x in mine])
                assert r[col]["mean"] == pytest.approx(vals.mean(), abs=1e-12)
                assert r[col]["std"] == pytest.approx(vals.std(ddof=1), abs=1e-12) and r[col]["n"] == 2
        for col in ("FP", "rtn", "rtn+bn", "qdrop"):
            means = [r[col]["mean"] for r in grid[b]]
            assert [r[col]["best"] for r in grid[b]] == [m == max(means) for m in means]
    # the html: a grid section before the summary, one table per bit-width, best cells bold with a star
    section = html.split("<h2 id='grid'>", 1)[1].split("<h2 id='summary'>", 1)[0]
    assert section.count("<table class='grid'>") == 2
    best = grid["W4A4"][0]["qdrop"] if grid["W4A4"][0]["qdrop"]["best"] else next(
        r["qdrop"] for r in grid["W4A4"] if r["qdrop"]["best"])
    assert f"<b>{100 * best['mean']:.2f} ± {100 * best['std']:.2f} *</b>" in section
    assert "Reconstruction (qdrop)" in html and "500 steps per block" in html
    # grid.csv: one line per (bits, training, PTQ column)
    with open(path / "grid.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * 3 * 4
    line = next(x for x in lines if x["bits"] == "W3A3" and x["training"] == "cfg1" and x["ptq"] == "qdrop")
    assert float(line["test_acc_mean"]) == pytest.approx(grid["W3A3"][1]["qdrop"]["mean"])
    # sharpness against PTQ accuracy per PTQ method: qdrop has its own correlation family
    assert [(f["bits"], f["variant"]) for f in summary["families"]] == [
        (b, v) for b in BITS for v in ("rtn", "rtn+bn", "qdrop")]


# ------------------------------------------------------------- figures: one builder each, static copies
def _plain(fig) -> str:
    """The figure's JSON with ``<`` and ``>`` as they are (``to_json`` writes them as \\u003c)."""
    return json.dumps(json.loads(fig.to_json()))


def _density():
    import torch

    from landscape import DensityResult

    grid = torch.linspace(-1.0, 5.0, 60, dtype=torch.float64)
    density = torch.exp(-grid ** 2) + 0.3 * torch.exp(-(grid - 4) ** 2 / 0.1)
    density[-5:] = 0.0  # below the log axis' floor
    return DensityResult(nodes=torch.zeros(1, 2), weights=torch.zeros(1, 2), grid=grid, density=density, sigma=0.1,
                         num_matvecs=8, seed=0)


def _surface_2d():
    from landscape import SurfaceResult

    a, b = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 4)
    loss = a[:, None] ** 2 + 3 * b[None, :] ** 2 + 0.2 * a[:, None]  # indexed [alpha, beta]
    loss[0, 0] = np.inf  # not finite: left out
    return SurfaceResult(alphas=a, betas=b, loss=loss, accuracy=np.full_like(loss, np.nan), directions=[],
                         center_loss=0.0, num_points=20)


def _slices():
    a = np.linspace(-0.5, 1.5, 9)
    return {"W4A4": {"alphas": a.tolist(), "loss": (0.1 + a ** 2).tolist(), "ptq_alpha": 1.0},
            f"{EVIL}": {"alphas": a.tolist(), "loss": (0.2 + 2 * a ** 2).tolist(), "ptq_alpha": 0.5}}


MIXED = {"methods": ["rtn+bn"], "uniform_bits": [2, 4], "budgets": [2.5, 3.0], "objectives": ["hawq", "measured"],
         "kind": "avg-bits", "abits": 4, "bits": [2, 4]}


def _mixed_rows():
    rows = []
    for c, shift in (("sgd", 0.0), (EVIL, 0.05)):
        for seed in (0, 1):
            for b in (2, 4):
                rows.append({"config": c, "ptq": "rtn+bn", "point": "uniform", "budget": float(b), "avg_bits": float(b),
                             "test_acc": 0.5 + 0.1 * b + shift + 0.01 * seed, "seed": seed})
            for budget in (2.5, 3.0):
                for k, obj in enumerate(MIXED["objectives"]):
                    rows.append({"config": c, "ptq": "rtn+bn", "point": obj, "budget": budget, "seed": seed,
                                 "avg_bits": budget - 0.1 * k - 0.05 * seed,
                                 "test_acc": 0.6 + 0.1 * budget + 0.02 * seed})
    return rows


def _mixed_measurements(measured_sign=1.0):
    layers = ["0", "3", "7", "10", "12"]
    sens = {"layers": [{"name": n, "order": i} for i, n in enumerate(layers)], "bits": [2, 4],
            "hawq": {n: {"2": 0.1 * (i + 1), "4": 0.01} for i, n in enumerate(layers)},
            "measured": {n: {"2": measured_sign * 0.05 * (i + 1), "4": 0.0} for i, n in enumerate(layers)}}
    meas = {"sensitivity:minmax": {"value": sens}}
    for budget in MIXED["budgets"]:
        for obj in MIXED["objectives"]:
            bits = {n: 2 + (i + int(budget)) % 3 for i, n in enumerate(layers[1:-1])}
            meas[f"mixed+rtn+bn:avg-bits={budget:g}:{obj}"] = {"value": {"allocation": {
                "bits": bits, "fixed": {"0": 8, "12": 8}, "avg_bits": budget - 0.1, "avg_bits_all": budget + 1},
                "test_acc": 0.8, "val_acc": 0.79}}
    return layers, meas


def _sharpness_fits(rows):
    from landscape.plot import measure_column
    from landscape.regress import fit

    fits = []
    for b in BITS:
        for sfx in ("", "_bn"):
            for m in ("trace", "top_eigenvalue", "trace_h_sigma"):
                x, y = measure_column(m, b), f"acc_drop_{b}{sfx}"
                fits.append(fit(analysis._values(rows, x), analysis._values(rows, y), x_name=x, y_name=y, n_boot=20))
    return fits


def _report_figures():
    """One figure of every kind the report emits, built as the report builds it."""
    from landscape import plot
    from landscape.regress import fit

    rows = _rows()
    vars_ = [("rtn", "", ""), ("rtn+bn", "_bn", "")]
    pfits = {b: fit(analysis._values(rows, f"predicted_{b}"), analysis._values(rows, f"measured_{b}"), n_boot=20)
             for b in BITS}
    cfg = {"mixed": MIXED}
    _, meas = _mixed_measurements()
    return {"density": plot.plot_density(_density().to_dict(), name=EVIL),
            "surface": plot.plot_surface_2d(_surface_2d().to_dict(), "surface", name=EVIL),
            "contour": plot.plot_surface_2d(_surface_2d().to_dict(), "contour", name=EVIL),
            "slices": plot.plot_quantization_slices(_slices(), name=EVIL),
            "sharpness": plot.plot_sharpness(rows, _sharpness_fits(rows), "W4A4", vars_, adjusted={}),
            "prediction": plot.plot_prediction(rows, BITS, pfits),
            "pareto": plot.plot_pareto(_mixed_rows(), cfg, "rtn+bn", "sgd"),
            "pareto_overlay": plot.plot_pareto(_mixed_rows(), cfg, "rtn+bn"),
            "bits": plot.plot_mixed_bits({"id": "m0", "name": EVIL, "measurements": meas}, cfg)}


def test_density_figure_is_the_results_density_from_the_object_or_its_dict():
    from landscape.plot import plot_density

    d = _density()
    grid, dens = d.grid.numpy(), d.density.numpy()
    for form in (d, d.to_dict()):
        lin = plot_density(form, log=False)
        np.testing.assert_array_equal(lin.data[0].x, grid)
        np.testing.assert_array_equal(lin.data[0].y, dens)
        log = plot_density(form)
        assert log.layout.yaxis.type == "log" and lin.layout.yaxis.type == "linear"
        np.testing.assert_array_equal(log.data[0].y, np.maximum(dens, dens.max() * 1e-6))
    assert plot_density(d, name=EVIL).layout.title.text.endswith("&lt;b&gt;x&amp;y&lt;/b&gt;")


def test_surface_figures_are_the_loss_grid_transposed():
    from landscape.plot import plot_surface_2d

    s = _surface_2d()
    want = np.where(np.isfinite(s.loss), s.loss, np.nan).T  # plotly's rows are beta
    for form in (s, s.to_dict()):
        for kind, trace in (("surface", "surface"), ("contour", "contour")):
            fig = plot_surface_2d(form, kind)
            t = fig.data[0]
            assert t.type == trace
            np.testing.assert_array_equal(np.array(t.z, dtype=float), want)
            np.testing.assert_array_equal(t.x, s.alphas)
            np.testing.assert_array_equal(t.y, s.betas)
    with pytest.raises(ValueError, match="kind"):
        plot_surface_2d(s, "wireframe")


def test_slice_trace_eigen_and_1d_figures_carry_their_numbers():
    from landscape.plot import plot_eigenvalues, plot_quantization_slices, plot_surface_1d, plot_trace

    sl = _slices()
    fig = plot_quantization_slices(sl)
    for k, (_b, s) in enumerate(sl.items()):
        line, mark = fig.data[2 * k], fig.data[2 * k + 1]
        assert list(line.y) == s["loss"] and list(line.x) == s["alphas"]
        at = int(np.argmin(np.abs(np.array(s["alphas"]) - s["ptq_alpha"])))
        assert list(mark.x) == [s["alphas"][at]] and list(mark.y) == [s["loss"][at]]
    assert EVIL not in _plain(fig) and "&lt;b&gt;" in fig.data[2].name
    one = {"alphas": [-1.0, 0.0, 1.0], "loss": [2.0, 1.0, 3.0], "accuracy": [0.5, 0.9, 0.4]}
    fig = plot_surface_1d(one, mark=1.0)
    assert list(fig.data[0].y) == one["loss"] and list(fig.data[1].y) == one["accuracy"]
    assert len(plot_surface_1d({**one, "accuracy": [float("nan")] * 3}).data) == 1
    tr = {"samples": [3.0, 4.0, 8.0], "value": 5.0, "std_error": 1.5, "method": "hutchinson"}
    fig = plot_trace(tr)
    assert list(fig.data[0].x) == tr["samples"] and fig.layout.shapes[0].x0 == 5.0
    eig = {"eigenvalues": [9.0, 4.0], "residual_norms": [0.1, 0.3], "method": "lanczos", "num_matvecs": 12}
    fig = plot_eigenvalues(eig)
    assert list(fig.data[0].y) == eig["eigenvalues"] and list(fig.data[0].error_y.array) == eig["residual_norms"]


def test_sharpness_and_prediction_figures_carry_the_rows_and_the_fits():
    from landscape.plot import plot_prediction, plot_sharpness

    rows = _rows()
    fits = _sharpness_fits(rows)
    vars_ = [("rtn", "", ""), ("rtn+bn", "_bn", "")]
    for form in (fits, [f.to_dict() for f in fits]):
        fig = plot_sharpness(rows, form, "W3A3", vars_)
        pts = [t for t in fig.data if t.mode == "markers"]
        assert len(pts) == 2 * 3 * 2  # variants x measures x methods
        sgd_trace_rtn = next(t for t in pts if t.name == "sgd" and t.xaxis == "x")
        mine = [r for r in rows if r["method"] == "sgd"]
        np.testing.assert_allclose(sgd_trace_rtn.x, [r["trace"] for r in mine])
        np.testing.assert_allclose(sgd_trace_rtn.y, [100 * r["acc_drop_W3A3"] for r in mine])
        bn = next(t for t in pts if t.name == "sgd" and t.xaxis == "x6")  # rtn+bn, Tr(H Sigma)
        np.testing.assert_allclose(bn.x, [r["trace_h_sigma_W3A3"] for r in mine])
        np.testing.assert_allclose(bn.y, [100 * r["acc_drop_W3A3_bn"] for r in mine])
        f = next(f for f in fits if f.x_name == "trace" and f.y_name == "acc_drop_W3A3")
        line = next(t for t in fig.data if t.mode == "lines" and t.xaxis == "x")
        np.testing.assert_allclose(line.y, 100 * f.predict(np.asarray(line.x)))
        assert f"rho={f.spearman_rho:.2f}" in fig.layout.annotations[0].text
    assert EVIL not in _plain(fig) and "&lt;b&gt;x&amp;y&lt;/b&gt; c0" in _plain(fig)  # hover text, escaped
    fig = plot_prediction(rows, BITS)
    for j, b in enumerate(BITS):
        t = fig.data[2 * j]
        np.testing.assert_allclose(t.x, [r[f"predicted_{b}"] for r in rows])
        np.testing.assert_allclose(t.y, [r[f"measured_{b}"] for r in rows])


def test_mixed_figures_carry_means_over_seeds_and_the_chosen_bits():
    import statistics

    from landscape.plot import plot_mixed_bits, plot_pareto

    mrows = _mixed_rows()
    cfg = {"mixed": MIXED}
    fig = plot_pareto(mrows, cfg, "rtn+bn", "sgd")
    uni = fig.data[0]
    for b, y, e in zip(uni.x, uni.y, uni.error_y.array):
        accs = [r["test_acc"] for r in mrows if r["config"] == "sgd" and r["point"] == "uniform" and r["budget"] == b]
        assert y == pytest.approx(100 * statistics.mean(accs)) and e == pytest.approx(100 * statistics.stdev(accs))
    hawq = next(t for t in fig.data if t.name == "hawq")
    sel = [r for r in mrows if r["config"] == "sgd" and r["point"] == "hawq" and r["budget"] == 2.5]
    assert hawq.x[0] == pytest.approx(statistics.mean(r["avg_bits"] for r in sel))
    assert hawq.y[0] == pytest.approx(100 * statistics.mean(r["test_acc"] for r in sel))
    overlay = plot_pareto(mrows, cfg, "rtn+bn")
    assert len(overlay.data) == 2 * (1 + len(MIXED["objectives"])) and EVIL not in _plain(overlay)
    assert plot_pareto(mrows, cfg, "qdrop") is None
    layers, meas = _mixed_measurements()
    fig = plot_mixed_bits({"id": "m0", "name": EVIL, "measurements": meas}, cfg)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == len(MIXED["budgets"]) * len(MIXED["objectives"])
    alloc = meas["mixed+rtn+bn:avg-bits=2.5:hawq"]["value"]["allocation"]
    assert list(bars[0].x) == layers and list(bars[0].y) == [{**alloc["fixed"], **alloc["bits"]}[n] for n in layers]
    hawq = next(t for t in fig.data if t.name == "hawq at W2")
    assert list(hawq.y) == [meas["sensitivity:minmax"]["value"]["hawq"][n]["2"] for n in layers]
    assert fig.layout.yaxis2.type == "log" and EVIL not in _plain(fig)
    _, neg = _mixed_measurements(measured_sign=-1.0)  # a negative sensitivity: no log axis
    assert plot_mixed_bits({"id": "m0", "measurements": neg}, cfg).layout.yaxis2.type is None
    assert plot_mixed_bits({"id": "m1", "measurements": {}}, cfg) is None


def _png_pixels(data: bytes) -> np.ndarray:
    import io

    import matplotlib.image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(io.BytesIO(data), format="png")


@pytest.mark.parametrize("kind", ["density", "surface", "contour", "slices", "sharpness", "prediction", "pareto",
                                  "pareto_overlay", "bits"])
def test_every_report_figure_renders_to_png_and_pdf(kind):
    from landscape.plot_static import render, to_bytes

    fig = _report_figures()[kind]
    px = _png_pixels(to_bytes(fig, "png"))
    assert px.shape[0] > 200 and px.shape[1] > 200
    assert px[..., :3].std() > 0.02 and len(np.unique(px[..., :3].reshape(-1, 3), axis=0)) > 10
    pdf = to_bytes(fig, "pdf")
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    # the drawing carries the figure's numbers
    mfig = render(fig)
    axes = [a for a in mfig.axes if a.get_label() != "<colorbar>"]
    if kind == "density":
        np.testing.assert_allclose(axes[0].lines[0].get_ydata(), fig.data[0].y)
        assert axes[0].get_yscale() == "log"
    elif kind in ("surface", "contour"):
        from matplotlib.contour import QuadContourSet

        filled = [c for c in axes[0].get_children() if isinstance(c, QuadContourSet) and c.filled]
        z = np.array(fig.data[0].z, dtype=float)
        assert filled and filled[0].levels[0] <= np.nanmin(z) and filled[0].levels[-1] >= np.nanmax(z)
        assert axes[0].get_xlabel() == "alpha" and axes[0].get_ylabel() == "beta"
    elif kind == "bits":
        heights = [p.get_height() for p in axes[0].patches]
        assert heights == [v for t in fig.data if t.type == "bar" for v in t.y]
        assert axes[1].get_yscale() == "log"
        assert [t.get_text() for t in axes[1].get_xticklabels()] == list(fig.data[0].x)
    else:  # every point and line is drawn (the bands are polygons)
        drawn = {round(float(v), 9) for a in axes for line in a.lines for v in line.get_ydata()}
        assert {round(float(v), 9) for t in fig.data if t.fill is None for v in t.y} <= drawn
        if kind == "sharpness":
            assert len(axes) == 6 and axes[0].get_title().startswith("rtn: Hessian trace: rho=")
            assert [len(a.patches) for a in axes] == [1] * 6  # each panel's confidence band
    assert EVIL not in _plain(fig)


def test_static_export_composes_figures_and_refuses_what_it_cannot_draw(tmp_path):
    import plotly.graph_objects as go

    from landscape.plot_static import render, save

    figs = _report_figures()
    written = save([figs["contour"], figs["slices"]], tmp_path / "model_a.b")
    assert [p.name for p in written] == ["model_a.b.png", "model_a.b.pdf"]
    assert _png_pixels(written[0].read_bytes()).std() > 0.02 and written[1].read_bytes().startswith(b"%PDF")
    assert len(render([figs["pareto"], figs["pareto_overlay"], figs["density"]]).subfigs) == 3
    title = render(figs["density"]).get_suptitle()
    assert title.endswith(EVIL)  # escaped for plotly, plain text on paper
    with pytest.raises(ValueError, match="pie"):
        render(go.Figure(go.Pie(values=[1, 2])))
    with pytest.raises(ValueError, match="fill"):
        render(go.Figure(go.Scatter(x=[0, 1], y=[0, 1], fill="tozeroy")))


def test_the_report_draws_its_static_files_from_the_html_figures(tmp_path, monkeypatch):
    import landscape.plot_static as plot_static

    rows = _rows(n_configs=3, seeds=(0, 1))
    path = _write_study(tmp_path / "study", rows)
    meta = json.loads((path / "study.json").read_text())
    meta["config"]["mixed"] = {**MIXED, "uniform_bits": []}
    meta["config"]["ptq"] = {**PTQ, "variants": ["rtn", "rtn+bn"]}
    (path / "study.json").write_text(json.dumps(meta))
    _, mixed = _mixed_measurements()
    for i in (0, 1):
        f = path / "models" / f"m{i:02d}.json"
        rec = json.loads(f.read_text())
        rec["measurements"] = {"density": {"value": _density().to_dict()},
                               "surface": {"value": _surface_2d().to_dict()},
                               **{f"slice:{b}": {"value": s} for b, s in zip(BITS, _slices().values())}, **mixed}
        f.write_text(json.dumps(rec))
    calls, real = [], plot_static.save

    def save(figs, stem, **kw):
        calls.append((stem.name, figs))
        return real(figs, stem, **kw)

    monkeypatch.setattr(plot_static, "save", save)
    text = report.build(path, n_boot=30).read_text()
    figures = json.loads(re.search(r"<script type='application/json' id='figures-data'>(.*?)</script>", text,
                                   re.S).group(1))
    assert EVIL not in json.dumps(figures) and "&lt;b&gt;x&amp;y&lt;/b&gt;" in json.dumps(figures)
    stems = [c[0] for c in calls]
    assert stems == ["mixed_pareto_rtn_bn", "sharpness_vs_ptq_W4A4", "sharpness_vs_ptq_W3A3", "measured_vs_predicted",
                     "model_m00", "mixed_bits_m00", "model_m01", "mixed_bits_m01"]
    in_html = [json.dumps(f, sort_keys=True) for f in figures.values()]
    for stem, figs in calls:  # every static copy is a figure of the HTML, not a figure of its own
        for fig in figs:
            assert json.dumps(json.loads(fig.to_json()), sort_keys=True) in in_html, stem
        for ext in ("png", "pdf"):
            assert (path / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert [len(figs) for _, figs in calls][-4:] == [2, 1, 2, 1]  # model_*: the contour beside the slices
    dens = next(f for f in figures.values() if f["layout"]["title"]["text"].startswith("Spectral density"))
    np.testing.assert_allclose(dens["data"][0]["x"], _density().grid.numpy())
    assert len(figures) == 3 + 2 * 5 + 3  # sharpness x2, prediction; per model 5; pareto 2 configs + overlay


def test_plot_examples_run():
    import doctest

    import landscape.plot
    import landscape.plot_static

    for mod in (landscape.plot, landscape.plot_static):
        r = doctest.testmod(mod, raise_on_error=False)
        assert r.attempted > 0 and r.failed == 0, mod.__name__
