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

import landscape.report as report
from landscape.regress import benjamini_hochberg, holm

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
