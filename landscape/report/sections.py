"""The HTML sections of a study's report, one function each: the header and the training × PTQ
grid, the summary of all models, the methods chosen on validation, the scatter plots, the
correlation families, the measured-against-predicted fits and their out-of-sample check, and one
folding section per model.

Each takes what it shows (computed by :mod:`landscape.report.analysis`) and returns a list of HTML
strings; figures go through ``place(fig, stem=None)``, which embeds the figure and returns its
``<div>`` (a ``stem`` also writes it to ``figures/<stem>.png`` and ``.pdf``).

Example:
    >>> from landscape.report.sections import summary_section
    >>> rows = [{"model": "sgd-s0", "method": "sgd", "seed": 0, "fp_acc": 0.98, "ptq_acc_W4A4": 0.9}]
    >>> html = "".join(summary_section(rows, ["W4A4"], [("rtn", "", "round to nearest")]))
    >>> "<h2 id='summary'>" in html and "<td class=''>0.9</td>" in html
    True
"""

from __future__ import annotations

import re

from ..plot import (
    plot_density,
    plot_mixed_bits,
    plot_prediction,
    plot_quantization_slices,
    plot_sharpness,
    plot_surface_2d,
)
from .analysis import anchor_columns, grid_html, ptq_settings_text, splits_text
from .html import esc, table

__all__ = ["correlation_section", "grid_section", "header", "methods_section", "model_section",
           "prediction_section", "scatter_section", "summary_section"]


def _trained_for(cfg: dict) -> str:
    """The bit-widths the noise methods were trained for: the study's ``train_bits``, and those
    runs name themselves (a run's ``train_bits``)."""
    own = []
    for r in cfg.get("runs") or []:
        v = r.get("train_bits") if isinstance(r, dict) else None
        own += [str(b) for b in (v if isinstance(v, list) else [v] if v is not None else [])]
    own = list(dict.fromkeys(own))
    text = f"noise methods trained for {cfg.get('train_bits')}"
    return text + (f", or for the bit-width their run names ({', '.join(own)}: the run's label ends with it)"
                   if own else "")


def header(cfg: dict, meta: dict, bits: list[str], n_models: int) -> list[str]:
    """The title, the study in one line, its PTQ settings (quantization convention first) and
    splits, and the rendering status."""
    return [f"<h1>Flatness and PTQ accuracy: {esc(cfg.get('name'))}</h1>",
            f"<p class='note'>{n_models} models ({esc(cfg.get('model'))} on {esc(cfg.get('data'))}), bit-widths "
            f"{esc(', '.join(bits))}; {esc(_trained_for(cfg))}. Study hash {esc(meta.get('hash'))}.</p>",
            f"<p class='note' id='ptq-settings'>{esc(ptq_settings_text(cfg, bits))}</p>",
            f"<p class='note' id='splits'>{esc(splits_text(meta, cfg))}</p>",
            "<p id='report-status'>rendering...</p>"]


def grid_section(grid: dict, bits: list[str], vars_: list, anchors: dict | None = None,
                 convention: str | None = None) -> list[str]:
    """The training method × PTQ method tables, one per bit-width; ``anchors``
    (:func:`landscape.report.anchors.anchors_for`) adds the published figures in columns of their
    own, with their source (``convention``: the study's, compared with the published one)."""
    parts = ["<h2 id='grid'>Training method × PTQ method</h2>",
             "<p class='note'>Test accuracy (%): mean ± standard deviation over seeds, per training configuration "
             "(rows) and PTQ method (columns), one table per bit-width; FP is the full-precision model. * and bold: "
             "the highest mean of the column (read a difference smaller than the standard deviations as none). Every "
             "training configuration gets the same PTQ, calibration images and BatchNorm rule; compare training "
             "methods within a column and PTQ methods within a row.</p>"]
    if anchors:
        conv = convention or "dnq"
        caveat = ("" if conv == "paper" else f" This study quantizes under the {conv} convention, not the papers': "
                  "the published figures are a reference, not the same quantizer.")
        parts.append("<p class='note' id='anchors'>" + esc(
            f"Columns marked ({anchors['short']}), in grey italics: published figures, not measured here. Source: "
            f"{anchors['source']}; {anchors['setting']}; FP {anchors['fp']:.2f}. One published number per column, "
            "beside every training row; never part of the * marking, of grid.csv or of any statistic of this report "
            "(summary.json keeps them under published_anchors)." + caveat) + "</p>")
    for b in bits:
        parts.append(f"<h3 id='grid-{esc(b)}'>{esc(b)}</h3>")
        parts.append(grid_html(grid[b], vars_, anchor_columns(anchors, b)))
    return parts


def summary_section(rows: list[dict], bits: list[str], vars_: list) -> list[str]:
    """One row per model: FP and PTQ accuracies, flatness."""
    scols = [("model", "model")] + ([("config", "config")] if any("config" in r for r in rows) else [])
    scols += [("method", "method"), ("lambda_max", "lambda"), ("sam_rho", "rho"), ("seed", "seed"),
              ("fp_val_acc", "FP val acc"), ("fp_acc", "FP test acc")]
    scols += [(f"ptq_acc_{b}{sfx}", f"{b} {name} test acc") for b in bits for name, sfx, _ in vars_]
    scols += [("trace", "trace"), ("trace_se", "+- SE"), ("top_eigenvalue", "top eig")]
    scols += [(f"trace_h_sigma_{b}", f"Tr(H Sigma) {b}") for b in bits]
    return ["<h2 id='summary'>Summary of all models</h2>", table(rows, scols, left={"model", "config", "method"}),
            "<p class='note'>PTQ variants: " + "; ".join(esc(f"{n}: {d}") for n, _, d in vars_)
            + ". Accuracies on the split named in the header; curvature on training images.</p>"]


def methods_section(comparison: list[dict], bits: list[str], vars_: list) -> list[str]:
    """Per training method, the configuration chosen on validation and its test accuracy
    (``comparison``: :func:`landscape.report.analysis.method_comparison`)."""
    ccols_m = [("method", "method"), ("configs", "configs")] + [
        (c, c) for c in ["FP"] + [f"{b} {name}" for b in bits for name, _, _ in vars_]]
    return ["<h2 id='methods'>Methods compared, choices on validation</h2>",
            "<p class='note'>Test accuracy (%) per method: mean ± standard deviation over seeds (n) of the "
            "configuration [in brackets, when the method has several] with the best mean validation accuracy "
            "in that column. The choice uses the validation split only; test numbers never take part in it. "
            "Noise methods are trained for the study's train_bits; compare methods on the same column only, "
            "and read differences smaller than a standard deviation as none.</p>",
            table(comparison, ccols_m, left={"method"})]


def scatter_section(rows: list[dict], fits: list, bits: list[str], vars_: list, adjusted: dict, place) -> list[str]:
    """Accuracy drop against the flatness measures, one figure per bit-width."""
    return ["<h2 id='scatter'>Sharpness against PTQ accuracy</h2>"] + [
        place(plot_sharpness(rows, fits, b, vars_, adjusted=adjusted), stem=f"sharpness_vs_ptq_{b}") for b in bits]


_CORR_COLUMNS = [("x", "flatness"), ("y", "degradation"), ("n", "n"), ("n_groups", "configs"),
                 ("spearman_rho", "rho"), ("spearman_p", "p"), ("spearman_p_holm", "p Holm"), ("spearman_q_bh", "q BH"),
                 ("bootstrap_rho_low", "rho low"), ("bootstrap_rho_high", "rho high"), ("kendall_tau", "tau"),
                 ("kendall_p", "p"), ("kendall_p_holm", "p Holm"), ("pearson_r", "r"), ("pearson_p", "p"),
                 ("pearson_p_holm", "p Holm"), ("slope", "slope"), ("slope_ci_low", "t low"),
                 ("slope_ci_high", "t high"), ("bootstrap_slope_low", "boot low"),
                 ("bootstrap_slope_high", "boot high")]


def correlation_section(families: list[dict], n_boot: int, unit_note: str, clustered: bool) -> list[str]:
    """One table per family of tests (bit-width, PTQ method), with its multiplicity note."""
    parts = ["<h2 id='correlations'>Correlation of PTQ degradation with flatness</h2>",
             "<p class='note'>One table per bit-width and PTQ variant; nothing is pooled across bit-widths (they "
             "are the same models again) or variants. Each table is one family of tests: every (flatness "
             "measure, degradation) pair fitted in it, one test per pair and statistic. rho: Spearman (the "
             "primary test), tau: Kendall, r: Pearson, each with its p-value as computed (models taken as "
             "independent); Holm: the p-value Holm-adjusted over the table's family (family-wise error; Holm "
             "1979); BH: the Benjamini-Hochberg q-value over the same family (false discovery rate; Benjamini and "
             "Hochberg 1995). Kendall's and Pearson's p-values are adjusted over the same pairs, each on its own. "
             "correlations.csv adds Spearman's p Holm-adjusted over every table of the report "
             f"(spearman_p_holm_report, m = {sum(f['m_tests'] for f in families)}). slope: least squares with its "
             f"95% t-interval. The bootstrap intervals (rho and slope, 95% percentile, {n_boot} resamples) are "
             f"computed {esc(unit_note)}.</p>"]
    unit = "cluster bootstrap over configs" if clustered else "bootstrap over models (no config column)"
    for fam in families:
        fid = re.sub(r"[^A-Za-z0-9_-]", "_", f"corr-{fam['bits']}-{fam['variant']}")
        parts.append(f"<h3 id='{esc(fid)}'>{esc(fam['bits'])}, PTQ variant {esc(fam['variant'])}</h3>")
        m = fam["m_tests"]
        parts.append("<p class='note family'>" + esc(f"m = {m} tests per statistic in this table; Holm: family-wise "
                                                      f"adjusted p over these {m}; BH: q-values over these {m}; "
                                                      f"intervals: {unit}.") + "</p>")
        if fam["table"]:
            parts.append(table(fam["table"], _CORR_COLUMNS, left={"x", "y"}))
        if fam["skipped"]:
            parts.append("<p class='note'>Not fitted: " + "; ".join(esc(f"{s['y']} ~ {s['x']}: {s['reason']}")
                                                                     for s in fam["skipped"]) + "</p>")
    if not families:
        parts.append("<p class='note'>No correlation: no bit-width or PTQ column in this study.</p>")
    return parts


def prediction_section(rows: list[dict], bits: list[str], pfits: dict, holdouts: dict, unit_note: str,
                       place) -> list[str]:
    """Measured against predicted loss increase: the fits, the out-of-sample check, the figure."""
    parts = ["<h2 id='prediction'>Measured against predicted loss increase</h2>",
             "<p class='note'>Weights only: the model's own quantization error Q(W) - W, its per-channel mean mu "
             "and variance Sigma; the second-order theory predicts slope 1 and intercept 0. Measured and "
             "predicted on the same training images; one fit per bit-width (never pooled). The t-interval takes "
             f"models as independent; the bootstrap interval is computed {esc(unit_note)}.</p>"]
    prow = [{"bits": b, "n": f.n, "configs": f.n_groups, "slope": f.slope, "low": f.slope_ci[0], "high": f.slope_ci[1],
             "blow": f.bootstrap_slope_ci[0], "bhigh": f.bootstrap_slope_ci[1], "intercept": f.intercept,
             "r": f.pearson_r} for b, f in pfits.items()]
    if prow:
        parts.append(table(prow, [("bits", "bit-width"), ("n", "n"), ("configs", "configs"), ("slope", "slope"),
                                  ("low", "t low"), ("high", "t high"), ("blow", "boot low"), ("bhigh", "boot high"),
                                  ("intercept", "intercept"), ("r", "Pearson r")], left={"bits"}))
    else:
        parts.append("<p class='note'>Not enough models for a fit.</p>")
    parts += _holdout_parts(holdouts)
    parts.append(place(plot_prediction(rows, bits, pfits), stem="measured_vs_predicted"))
    return parts


def _holdout_parts(holdouts: dict) -> list[str]:
    parts = ["<h3 id='holdout'>Out of sample: calibrated on some seeds, scored on the others</h3>",
             "<p class='note'>Per bit-width: measured = intercept + slope * predicted fitted on the models "
             "whose seed is in the first half of the sorted seeds, then scored on the models of the other seeds "
             "(no held-out model was seen by the fit). RMSE and MAE of the calibrated prediction and of the raw "
             "prediction (slope 1, intercept 0); the constant baseline predicts the fitting half's mean.</p>"]
    hrows, hskip = [], []
    for b, h in holdouts.items():
        if isinstance(h, str):
            hskip.append(f"{b}: {h}")
            continue
        hrows.append({"bits": b, "fit": ", ".join(map(str, h.fit_seeds)), "test": ", ".join(map(str, h.test_seeds)),
                      "n_fit": h.n_fit, "n_test": h.n_test, "slope": h.slope, "low": h.slope_ci[0],
                      "high": h.slope_ci[1], "rmse_cal": h.rmse_calibrated, "mae_cal": h.mae_calibrated,
                      "rmse_raw": h.rmse_raw, "mae_raw": h.mae_raw, "rmse_const": h.rmse_constant})
    if hrows:
        parts.append(table(hrows, [("bits", "bit-width"), ("fit", "fit seeds"), ("test", "held-out seeds"),
                                   ("n_fit", "n fit"), ("n_test", "n held out"), ("slope", "slope (fit half)"),
                                   ("low", "t low"), ("high", "t high"), ("rmse_cal", "RMSE calibrated"),
                                   ("mae_cal", "MAE calibrated"), ("rmse_raw", "RMSE raw"), ("mae_raw", "MAE raw"),
                                   ("rmse_const", "RMSE constant")], left={"bits", "fit", "test"}))
    if hskip:
        parts.append("<p class='note'>No out-of-sample check: " + "; ".join(esc(t) for t in hskip) + ".</p>")
    return parts


def _accuracy_rows(row: dict, m: dict, bits: list[str], vars_: list) -> list[dict]:
    """A model's FP and PTQ accuracies and losses, one row per setting."""
    out = [{"setting": "FP", "val": row.get("fp_val_acc"), "acc": row.get("fp_acc"), "loss": row.get("fp_loss")}]
    for b in bits:
        for vname, sfx, _ in vars_:
            inc, fp_loss = row.get(f"ptq_loss_increase_{b}{sfx}"), row.get("fp_loss")
            loss = fp_loss + inc if inc is not None and fp_loss is not None else (
                (m.get(f"ptq:{b}", {}).get("value") or {}).get("test_loss") if not sfx else None)
            out.append({"setting": f"{b} {vname}", "val": row.get(f"ptq_val_acc_{b}{sfx}"),
                        "acc": row.get(f"ptq_acc_{b}{sfx}"), "loss": loss})
    return out


def _flatness_rows(row: dict, m: dict, bits: list[str]) -> list[dict]:
    """A model's trace, eigenvalues, Tr(H Sigma) and predicted / measured loss increase."""
    flat = [{"measure": "Hessian trace", "value": row.get("trace"), "se": row.get("trace_se")}]
    eig = (m.get("eigen", {}).get("value") or {}).get("eigenvalues") or []
    flat += [{"measure": f"eigenvalue {i + 1}", "value": v, "se": None} for i, v in enumerate(eig)]
    for b in bits:
        nv = m.get(f"noise:{b}", {}).get("value") or {}
        flat.append({"measure": f"Tr(H Sigma) {b}", "value": row.get(f"trace_h_sigma_{b}", nv.get("trace_h_sigma")),
                     "se": nv.get("trace_h_sigma_std_error")})
        flat.append({"measure": f"predicted / measured dL {b}", "value": row.get(f"predicted_{b}", nv.get("predicted")),
                     "se": row.get(f"measured_{b}", nv.get("measured"))})
    return flat


def _model_figures(rec: dict, name: str, cfg: dict, mixed: bool, place) -> list[str]:
    m = rec.get("measurements", {})
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in rec["id"])
    model_png = f"model_{stem}" if "surface" in m else None  # the contour next to the slices
    sec = []
    if "density" in m:
        sec.append(place(plot_density(m["density"]["value"], title="Spectral density", name=name)))
    if "surface" in m:
        surf = m["surface"]["value"]
        sec.append("<div class='grid2'>"
                   + place(plot_surface_2d(surf, "surface", title="Loss surface (filter-normalized)", name=name))
                   + place(plot_surface_2d(surf, "contour", title="Contour", name=name), stem=model_png)
                   + "</div>")
    slices = {k.split(":", 1)[1]: v["value"] for k, v in m.items() if k.startswith("slice:")}
    if slices:
        sec.append(place(plot_quantization_slices(slices, name=name), stem=model_png))
    bfig = plot_mixed_bits(rec, cfg) if mixed else None
    if bfig is not None:
        sec.append(place(bfig, stem=f"mixed_bits_{stem}"))
    return sec


def model_section(rec: dict, row: dict, bits: list[str], vars_: list, cfg: dict, mixed: bool, place) -> str:
    """One model's folding section: its accuracies, flatness, settings and figures."""
    m = rec.get("measurements", {})
    name = row["model"]
    sec = [f"<details><summary>{esc(name)}</summary>"]
    acc = table(_accuracy_rows(row, m, bits, vars_), [("setting", "setting"), ("val", "val acc"),
                                                      ("acc", "test acc"), ("loss", "test loss")], left={"setting"})
    flat = table(_flatness_rows(row, m, bits), [("measure", "flatness"), ("value", "value"),
                                                ("se", "SE / measured")], left={"measure"})
    sec.append("<div class='grid2'><div>" + acc + "</div><div>" + flat + "</div></div>")
    settings = ", ".join(f"{k}={v}" for k, v in rec.get("settings", {}).items())
    sec.append(f"<p class='note'>settings: {esc(settings)}; run: {esc(rec.get('run_dir'))}</p>")
    sec += _model_figures(rec, name, cfg, mixed, place)
    sec.append("</details>")
    return "".join(sec)
