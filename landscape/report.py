"""The report of a study: ``report.html`` (one self-contained file, plotly.js embedded, works
offline), the same figures as PNG and PDF for papers, and ``summary.csv`` / ``summary.json``.
Every figure comes from a builder of :mod:`landscape.plot`; its PNG and PDF are drawn from that
same figure object by :mod:`landscape.plot_static`.

    python -m landscape.report reports/digits          # or: landscape report reports/digits
    >>> from landscape.report import build             # doctest: +SKIP
    >>> build("reports/digits")                        # doctest: +SKIP

Sections: the PTQ settings, the split sizes and which split every number comes from; the grid of
training method × PTQ method (per bit-width, test accuracy mean ± std over seeds, the best of each
column marked; :func:`training_by_ptq`, also ``grid.csv``); a summary table of all models (FP
accuracy on validation and test, PTQ test accuracy of every variant at every bit-width,
flatness); scatter plots of accuracy drop against trace, top eigenvalue and
Tr(H Sigma), per bit-width and PTQ variant, with the fit and its confidence band; the
correlation tables; measured against predicted loss increase with the identity line, and its
out-of-sample check; and per model: accuracy at every bit-width, flatness figures, the spectral
density, the 2-D surface (3-D and contour) and the 1-D slice along the model's own quantization
direction with the weight-quantized point (alpha = 1) marked.

Statistics (see :mod:`landscape.regress`): nothing is pooled across bit-widths or PTQ variants;
every fit and correlation is for one bit-width and one variant. One correlation table is one
family of tests: the (flatness measure, degradation) pairs of one (bit-width, PTQ variant), up
to 4 x 2 = 8 tests per statistic; Holm-adjusted p-values and Benjamini-Hochberg q-values are
computed over that family (Spearman's rho is the primary test; Kendall and Pearson are adjusted
over the same pairs, each on its own), and ``correlations.csv`` also gives Spearman's p Holm-
adjusted over every table of the report. The bootstrap intervals resample whole training
configurations (the ``config`` column: seeds of one configuration are not independent); a study
without that column falls back to resampling models, and the table says so.

Every user-supplied string (model names, paths, settings) is HTML-escaped, in the page and in the
figures' labels; JSON embedded in ``<script>`` has ``<``, ``>`` and ``&`` escaped. In
``summary.csv`` and ``correlations.csv``, a text cell that starts with ``=``, ``+``, ``-``, ``@``,
a tab or a carriage return (which a spreadsheet would run as a formula) gets a leading ``'``
(OWASP's rule against CSV injection); numbers are written as numbers.

The report does not lock the study folder: it reads the records (each written atomically by the
study) and writes only its own files (``report.html``, ``summary.*``, ``correlations.csv``,
``figures/``), each atomically, which a study never writes, so that a report of a study still
running can be written at any time; two reports at once leave the later one.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from dnq.recon import DESCRIPTIONS

from .plot import (
    MEASURES,
    measure_column,
    plot_density,
    plot_mixed_bits,
    plot_prediction,
    plot_quantization_slices,
    plot_sharpness,
    plot_surface_2d,
)
from .regress import correlation_table, fit, holm, prediction_holdout
from .study import VARIANT_SUFFIX, StudyError, load_records, read_study_json, summary_rows


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _script_json(obj) -> str:
    s = json.dumps(obj, default=_default)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v):
    """A value as a CSV cell that no spreadsheet runs as a formula: a string that starts with
    ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` (OWASP); numbers,
    booleans and ``None`` are returned unchanged (a negative number stays a number)."""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


def _csv_rows(rows: list[dict]) -> list[dict]:
    return [{k: csv_cell(v) for k, v in r.items()} for r in rows]


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


#: PTQ variants: (name, column suffix, what it is)
_VARIANT_TEXT = {"rtn": "round to nearest, BatchNorm folded with its saved statistics",
                 "rtn+bn": "the same, with the BatchNorm statistics re-estimated on the calibration images through "
                           "the quantized model before folding",
                 **DESCRIPTIONS}
VARIANTS = [(v, VARIANT_SUFFIX[v], _VARIANT_TEXT[v]) for v in VARIANT_SUFFIX]


def variants(rows: list[dict], bits: list[str]) -> list[tuple[str, str, str]]:
    """The PTQ variants whose columns the rows have (``(name, suffix, description)``)."""
    have = {k for r in rows for k in r}
    return [v for v in VARIANTS if any(f"acc_drop_{b}{v[1]}" in have or f"ptq_acc_{b}{v[1]}" in have for b in bits)]


def training_by_ptq(rows: list[dict], bits: list[str], vars_: list) -> dict[str, list[dict]]:
    """The grid readers look for first: per bit-width, one row per training configuration, one
    column per PTQ method, cells the *test* accuracy mean, standard deviation and number of seeds.

    Returns:
        ``{bits: [row, ...]}``; a row has ``config``, ``method``, ``n`` (seeds), ``FP`` and one key
        per PTQ method, each ``{"mean", "std", "n", "best"}`` (``std`` None with one seed) or
        ``None``; ``best`` marks the highest mean of its column (every tied one).
    """
    import statistics

    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                "n": len(vals), "best": False}

    configs = list(dict.fromkeys(r.get("config") or r.get("model") for r in rows))
    out = {}
    for b in bits:
        table = []
        for c in configs:
            mine = [r for r in rows if (r.get("config") or r.get("model")) == c]
            row = {"config": c, "method": mine[0].get("method"), "n": len(mine),
                   "FP": cell([r.get("fp_acc") for r in mine])}
            for name, sfx, _ in vars_:
                row[name] = cell([r.get(f"ptq_acc_{b}{sfx}") for r in mine])
            table.append(row)
        for col in ["FP", *(v[0] for v in vars_)]:
            means = [r[col]["mean"] for r in table if r[col] is not None]
            for r in table:
                if r[col] is not None and means and r[col]["mean"] == max(means):
                    r[col]["best"] = True
        out[b] = table
    return out


def _grid_cell(c) -> str:
    if c is None:
        return "n/a"
    sd = "" if c["std"] is None else f" ± {100 * c['std']:.2f}"
    return f"{100 * c['mean']:.2f}{sd}" + (" *" if c["best"] else "")


def _grid_html(table: list[dict], vars_: list) -> str:
    head = "<th class='l'>training</th><th>seeds</th><th>FP</th>" + "".join(f"<th>{_esc(v[0])}</th>" for v in vars_)
    body = []
    for r in table:
        cells = [f"<td class='l'>{_esc(r['config'])}</td>", f"<td>{r['n']}</td>"]
        for col in ["FP", *(v[0] for v in vars_)]:
            c = r[col]
            text = _esc(_grid_cell(c))
            cells.append(f"<td class='best'><b>{text}</b></td>" if c and c["best"] else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def grid_csv_rows(grid: dict[str, list[dict]], vars_: list) -> list[dict]:
    """``grid.csv``: one line per (bit-width, training configuration, PTQ method or FP)."""
    out = []
    for b, table in grid.items():
        for r in table:
            for col in ["FP", *(v[0] for v in vars_)]:
                c = r[col]
                out.append({"bits": b, "training": r["config"], "method": r["method"], "ptq": col,
                            "test_acc_mean": None if c is None else c["mean"],
                            "test_acc_std": None if c is None else c["std"], "n_seeds": None if c is None else c["n"],
                            "best_in_column": None if c is None else c["best"]})
    return out


def method_comparison(rows: list[dict], bits: list[str], vars_: list) -> list[dict]:
    """Per method: the configuration chosen on validation and its test accuracy, per column.

    For each method and each column (FP, and every bit-width under every PTQ variant), the
    method's configurations (its ``config`` values: a strength or radius) are ranked by their
    mean *validation* accuracy over seeds; the chosen one's *test* accuracy is reported as mean,
    standard deviation and number of seeds. Test accuracy never takes part in the choice.
    Without validation numbers (an older study) the column is left out, never chosen on test.
    """
    import statistics

    cols = [("FP", "fp_val_acc", "fp_acc")] + [
        (f"{b} {name}", f"ptq_val_acc_{b}{sfx}", f"ptq_acc_{b}{sfx}") for b in bits for name, sfx, _ in vars_]
    out = []
    for method in dict.fromkeys(r.get("method") for r in rows):
        mine = [r for r in rows if r.get("method") == method]
        configs = list(dict.fromkeys(r.get("config") or r.get("model") for r in mine))
        row = {"method": method, "configs": len(configs)}
        for label, vcol, tcol in cols:
            best, best_val = None, -math.inf
            for c in configs:
                vals = [r[vcol] for r in mine if (r.get("config") or r.get("model")) == c and r.get(vcol) is not None]
                if vals and statistics.mean(vals) > best_val:
                    best, best_val = c, statistics.mean(vals)
            if best is None:
                continue
            tests = [r[tcol] for r in mine if (r.get("config") or r.get("model")) == best and r.get(tcol) is not None]
            if not tests:
                continue
            sd = statistics.stdev(tests) if len(tests) > 1 else float("nan")
            row[label] = f"{100 * statistics.mean(tests):.2f} ± {100 * sd:.2f} (n={len(tests)})" + (
                f" [{best}]" if len(configs) > 1 else "")
        out.append(row)
    return out


def cluster_labels(rows: list[dict]) -> list | None:
    """The ``config`` label of every row (the bootstrap's cluster), or ``None`` when any is missing."""
    labels = [r.get("config") for r in rows]
    return labels if rows and all(v is not None for v in labels) else None


def _values(rows, col) -> np.ndarray:
    return np.array([np.nan if r.get(col) is None else r[col] for r in rows], dtype=float)


def correlation_families(rows: list[dict], bits: list[str], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """The correlation tables: one family of tests per (bit-width, PTQ variant).

    A family holds the fits of accuracy drop and PTQ test-loss increase (of that bit-width and
    variant) on each flatness measure (trace, top eigenvalue, and the bit-width's Tr(H Sigma) and
    predicted loss increase): up to 8 tests per statistic, adjusted together (Holm and BH, see
    :func:`landscape.regress.correlation_table`). The bootstrap is clustered on ``config`` when
    every row has one, else over rows.

    Returns:
        One dict per family: ``bits``, ``variant``, ``fits``, ``table`` (rows of
        ``correlation_table(fits, adjust=True)`` with ``bits``, ``variant``, ``family``), ``m_tests``
        and ``skipped`` (pairs with fewer than 3 usable models, with the reason).
    """
    groups = cluster_labels(rows)
    out = []
    for b in bits:
        for name, sfx, _ in variants(rows, bits):
            fits, skipped = [], []
            for y in (f"acc_drop_{b}{sfx}", f"ptq_loss_increase_{b}{sfx}"):
                for m, _ in MEASURES:
                    x = measure_column(m, b)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            fits.append(fit(_values(rows, x), _values(rows, y), x_name=x, y_name=y, n_boot=n_boot,
                                            seed=seed, groups=groups))
                    except ValueError as e:
                        skipped.append({"bits": b, "variant": name, "x": x, "y": y, "reason": str(e)})
            family = f"{b} {name}"
            table = [{"bits": b, "variant": name, "family": family, **r} for r in correlation_table(fits, adjust=True)]
            out.append({"bits": b, "variant": name, "family": family, "fits": fits, "table": table,
                        "m_tests": table[0]["m_tests"] if table else 0, "skipped": skipped})
    everything = [r for f in out for r in f["table"]]  # the whole report as one family, for the sceptical reader
    for r, h in zip(everything, holm([r["spearman_p"] for r in everything])):
        r["spearman_p_holm_report"] = float(h)
    return out


def correlations(rows: list[dict], bits: list[str], n_boot: int = 2000, seed: int = 0) -> tuple[list, list]:
    """All fits of :func:`correlation_families`, flattened: ``(fits, skipped)``."""
    fams = correlation_families(rows, bits, n_boot=n_boot, seed=seed)
    return [f for fam in fams for f in fam["fits"]], [s for fam in fams for s in fam["skipped"]]


def prediction_fits(rows: list[dict], bits: list[str], seed: int = 0, n_boot: int = 2000) -> dict:
    """Measured against predicted loss increase (weights only), one fit per bit-width (never pooled:
    the bit-widths are the same models again). The bootstrap is clustered on ``config`` when
    every row has one."""
    groups = cluster_labels(rows)
    out = {}
    for b in bits:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[b] = fit(_values(rows, f"predicted_{b}"), _values(rows, f"measured_{b}"), x_name=f"predicted_{b}",
                             y_name=f"measured_{b}", seed=seed, n_boot=n_boot, groups=groups)
        except ValueError:
            pass
    return out


def prediction_holdouts(rows: list[dict], bits: list[str]) -> dict:
    """Per bit-width, :func:`landscape.regress.prediction_holdout` of measured against predicted loss
    increase split by ``seed``; a string (the reason) where it cannot be done."""
    out = {}
    for b in bits:
        try:
            out[b] = prediction_holdout(_values(rows, f"measured_{b}"), _values(rows, f"predicted_{b}"),
                                        [r.get("seed") for r in rows])
        except ValueError as e:
            out[b] = str(e).removeprefix("prediction_holdout: ")
    return out


# -- what was measured, on which split -------------------------------------------------------------
def _wa(bits: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*[Ww](\d+)[Aa](\d+)\s*", str(bits))
    return (m[1], m[2]) if m else ("?", "?")


def ptq_settings_text(cfg: dict, bits: list[str]) -> str:
    """One sentence with the exact PTQ settings of the study (``config["ptq"]``), or "not recorded"."""
    ptq = cfg.get("ptq")
    wb = "; ".join(f"{b}: weights {_wa(b)[0]} bits, activations {_wa(b)[1]} bits" for b in bits)
    if not isinstance(ptq, dict):
        return (f"PTQ settings: not recorded in study.json (a study from before they were stored); bit-widths {wb}. "
                "Only the round-to-nearest variant was measured.")
    g = ptq.get

    def rec(v):
        return "not recorded" if v is None else v

    fold = g("fold_bn")
    named = {n: d for n, _, d in VARIANTS}
    var = "; ".join(f"{v}: {named.get(v, 'as named')}" for v in (g("variants") or [])) or "not recorded"
    recon = [v for v in (g("variants") or []) if v in ("adaround", "brecq", "qdrop")]
    recon_text = ""
    if recon:
        iters = g("recon_iters")
        iters = "20,000 on a GPU and 500 on a CPU (the device default)" if iters is None else iters
        recon_text = (f" Reconstruction ({', '.join(recon)}): BatchNorm folded first, initial ranges "
                      f"{rec(g('recon_range'))}, {iters} steps per block, batch {rec(g('recon_batch_size'))}, "
                      f"{rec(g('recon_calib_size'))} calibration images from the same split, learning rates scaled "
                      f"so that learning rate x steps is the papers' (dnq.recon.budget_lrs).")
    return (f"PTQ settings: {wb}. Weights: {rec(g('weight_mode'))}, {rec(g('weight_granularity'))}. "
            f"Activations: {rec(g('act'))}. Range: {rec(g('range'))}. First and last layers at "
            f"{rec(g('first_last_bits'))} bits. Calibration: {rec(g('calib_size'))} images from "
            f"{rec(g('calib_split'))}. BatchNorm folded into the convolutions: "
            f"{'yes' if fold is True else 'no' if fold is False else 'not recorded'}. Variants: {var}."
            + recon_text)


def splits_text(meta: dict, cfg: dict) -> str:
    """The split sizes and which split every number in the report comes from."""
    sp = meta.get("splits")
    sizes = (", ".join(f"{k} {v}" for k, v in sp.items()) if isinstance(sp, dict) and sp
             else "not recorded in study.json")
    hs = (cfg.get("instruments") or {}).get("hessian_samples", "not recorded")
    return (f"Splits: {sizes}. FP val / FP test: accuracy of the full-precision model on the validation / test split. "
            f"PTQ accuracy, accuracy drop (FP test minus PTQ test) and PTQ loss increase: test split "
            f"(PTQ validation accuracy is in summary.csv). Curvature (Hessian trace, eigenvalues, density, "
            f"Tr(H Sigma)), the predicted and measured weight-quantization loss increase, the surface and the "
            f"slices: {hs} non-augmented training images.")


# -- HTML -----------------------------------------------------------------------------------------
_STATUS_JS = """
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message)); });
window.addEventListener('unhandledrejection', function (e) { window.__reportErrors.push(String(e.reason)); });
"""

_RENDER_JS = """
(function () {
  var figs = JSON.parse(document.getElementById('figures-data').textContent);
  var done = 0, failed = 0, ids = Object.keys(figs);
  function finish() {
    var st = document.getElementById('report-status');
    st.setAttribute('data-plots', String(ids.length));
    var n = 0;
    document.querySelectorAll('div.plot').forEach(function (d) {
      if (d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg')) { n += 1; }
    });
    st.setAttribute('data-rendered', String(n));
    st.setAttribute('data-errors', String(window.__reportErrors.length + failed));
    st.textContent = 'plots: ' + ids.length + ', rendered: ' + st.getAttribute('data-rendered') +
        ', errors: ' + (window.__reportErrors.length + failed) +
        (window.__reportErrors.length ? ' ' + window.__reportErrors.join(' | ') : '');
    st.setAttribute('data-done', '1');
  }
  document.querySelectorAll('details').forEach(function (d) {
    d.addEventListener('toggle', function () {  // plots drawn while hidden get their size when shown
      if (d.open) { d.querySelectorAll('div.plot.js-plotly-plot').forEach(function (p) { Plotly.Plots.resize(p); }); }
    });
  });
  if (!ids.length) { finish(); return; }
  ids.forEach(function (id) {
    var f = figs[id];
    Plotly.newPlot(id, f.data, f.layout, {responsive: true, displaylogo: false}).then(function () {
      done += 1; if (done + failed === ids.length) finish();
    }, function (err) {
      failed += 1; window.__reportErrors.push(String(err)); if (done + failed === ids.length) finish();
    });
  });
})();
"""

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; color: #222; padding: 0 16px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
.note { color: #555; font-size: 13px; max-width: 60em; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
details { margin: 10px 0; } summary { cursor: pointer; font-weight: 600; }
#report-status { color: #888; font-size: 11px; }
"""


def _table(rows: list[dict], cols: list[tuple[str, str]], left: set = frozenset()) -> str:
    head = "".join(f"<th class='{'l' if c in left else ''}'>{_esc(t)}</th>" for c, t in cols)
    body = []
    for r in rows:
        cells = "".join(f"<td class='{'l' if c in left else ''}'>{_esc(_fmt(r.get(c)))}</td>" for c, _ in cols)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def inputs_digest(path, static: bool, n_boot: int) -> str:
    """SHA-256 of everything a report is made from: the study's ``study.json`` and model records,
    the settings, and the source of the modules that write it (a toolkit update rebuilds it)."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256(f"static={static};n_boot={n_boot}".encode())
    here = Path(__file__).parent
    meta = read_study_json(path / "study.json")
    meta.pop("updated", None)  # rewritten by every run of the study
    h.update(json.dumps(meta, sort_keys=True).encode())
    for f in [*sorted((path / "models").glob("*.json"))] + \
             [here / n for n in ("report.py", "report_mixed.py", "report_sampling.py", "plot.py", "plot_static.py",
                                 "regress.py", "study.py")]:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()


def build(path, out=None, *, static: bool = True, n_boot: int = 2000, only_if_changed: bool = False) -> Path:
    """Write ``report.html`` (and ``figures/``, ``summary.csv``, ``summary.json``, ``grid.csv``,
    ``correlations.csv``) for the study in ``path``; returns the HTML file's path.

    Args:
        path: the study directory.
        out: the HTML file (default ``path / "report.html"``); the tables and ``figures/`` go
            beside it, so that a report written elsewhere leaves the study folder untouched.
        static: also write the PNG and PDF figures.
        n_boot: bootstrap resamples per fit.
        only_if_changed: leave an existing report as it is when nothing it is made from changed
            (the study's records and configuration, these settings, the report's code: the
            digest sits in the HTML's head, which is written last); what ``landscape study``
            does after a rerun.

    Raises:
        StudyError: ``path`` holds no study, or no model has finished a measurement yet.
    """
    path = Path(path)
    records = load_records(path)
    dest = Path(out).parent if out is not None else path  # every file of the report goes here
    target = Path(out) if out is not None else path / "report.html"
    if not records:
        raise StudyError(f"{path} has no model records yet; run the study first")
    digest = inputs_digest(path, static, n_boot)
    if only_if_changed and target.is_file():
        with open(target, "rb") as f:  # the digest sits in the head of a report written whole (atomically, last)
            if f"<meta name='inputs-sha256' content='{digest}'>".encode() in f.read(4096):
                return target
    dest.mkdir(parents=True, exist_ok=True)
    meta = read_study_json(path / "study.json")
    cfg = meta["config"]
    bits = list(cfg.get("bits", []))
    rows = summary_rows(records, bits)
    vars_ = variants(rows, bits)
    families = correlation_families(rows, bits, n_boot=n_boot)
    fits = [f for fam in families for f in fam["fits"]]
    skipped = [s for fam in families for s in fam["skipped"]]
    adjusted = {(r["x"], r["y"]): r["spearman_p_holm"] for fam in families for r in fam["table"]}
    pfits = prediction_fits(rows, bits, n_boot=n_boot)
    holdouts = prediction_holdouts(rows, bits)
    grid = training_by_ptq(rows, bits, vars_)
    corr = [r for fam in families for r in fam["table"]]
    clustered = cluster_labels(rows) is not None
    n_configs = len({r["config"] for r in rows}) if clustered else None
    unit_note = (f"resampling whole training configurations (the {n_configs} values of the config column; the "
                 f"seeds of one configuration share everything but the seed and are resampled together)"
                 if clustered else
                 "resampling models one by one: this study records no training configuration (config column) "
                 "for every model, so seeds of one configuration are treated as independent and the intervals "
                 "are too narrow if there are several seeds")

    # machine-readable outputs
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="")
    w.writeheader()
    w.writerows(_csv_rows(rows))
    _atomic_text(dest / "summary.csv", buf.getvalue())
    buf = io.StringIO()
    if corr:
        w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in corr for k in r)), restval="")
        w.writeheader()
        w.writerows(_csv_rows(corr))
    _atomic_text(dest / "correlations.csv", buf.getvalue())
    buf = io.StringIO()
    grows = grid_csv_rows(grid, vars_)
    w = csv.DictWriter(buf, fieldnames=["bits", "training", "method", "ptq", "test_acc_mean", "test_acc_std",
                                        "n_seeds", "best_in_column"], restval="")
    w.writeheader()
    w.writerows(_csv_rows(grows))
    _atomic_text(dest / "grid.csv", buf.getvalue())
    from . import report_mixed

    mrows = report_mixed.mixed_rows(records, cfg)
    mtable = report_mixed.budget_table(mrows, cfg) if mrows else []
    if mrows:
        buf = io.StringIO()
        mcols = ["model", "config", "method", "seed", "ptq", "point", "budget", "avg_bits", "avg_bits_all", "test_acc",
                 "val_acc"]
        w = csv.DictWriter(buf, fieldnames=mcols, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(_csv_rows(mrows))
        _atomic_text(dest / "mixed.csv", buf.getvalue())
    summary = {"study": cfg.get("name"), "config_hash": meta.get("hash"), "ptq": cfg.get("ptq"),
               "splits": meta.get("splits"), "variants": [v[0] for v in vars_],
               "bootstrap": {"unit": "cluster" if clustered else "row",
                             "cluster_column": "config" if clustered else None,
                             "n_groups": n_configs, "n_boot": n_boot},
               "multiplicity": {"family": "one (bit-width, PTQ variant): every (flatness measure, degradation) pair "
                                          "fitted in it, one test per pair and statistic",
                                "holm": "<statistic>_p_holm", "bh": "<statistic>_q_bh",
                                "report_wide_holm": "spearman_p_holm_report"},
               "families": [{"family": f["family"], "bits": f["bits"], "variant": f["variant"], "m_tests": f["m_tests"]}
                            for f in families],
               "training_by_ptq": grid,
               "mixed": ({"settings": cfg.get("mixed"), "accuracy_at_budget": mtable, "points": mrows}
                         if mrows else None),
               "models": rows, "correlations": corr, "skipped_fits": skipped,
               "methods_chosen_on_validation": method_comparison(rows, bits, vars_),
               "prediction": {k: {"slope": f.slope, "slope_ci": f.slope_ci, "intercept": f.intercept, "n": f.n,
                                  "pearson_r": f.pearson_r, "spearman_rho": f.spearman_rho,
                                  "bootstrap_slope_ci": f.bootstrap_slope_ci, "bootstrap_unit": f.bootstrap_unit,
                                  "n_groups": f.n_groups}
                              for k, f in pfits.items()},
               "prediction_holdout": {k: {"skipped": h} if isinstance(h, str) else h.to_dict()
                                      for k, h in holdouts.items()},
               "inputs_sha256": digest}
    _atomic_text(dest / "summary.json", json.dumps(summary, indent=2, default=_default) + "\n")

    figures: dict[str, dict] = {}
    # figures/<stem>.png and .pdf: the figures placed with that stem, side by side, with their JSON
    static_figs: dict[str, list[tuple]] = {}

    def place(fig, stem: str | None = None) -> str:
        fid = f"fig{len(figures)}"
        text = fig.to_json()
        figures[fid] = json.loads(text)
        if stem is not None:
            static_figs.setdefault(stem, []).append((fig, text))
        return f"<div id='{fid}' class='plot'></div>"

    parts = [f"<h1>Flatness and PTQ accuracy: {_esc(cfg.get('name'))}</h1>",
             f"<p class='note'>{len(records)} models ({_esc(cfg.get('model'))} on {_esc(cfg.get('data'))}), bit-widths "
             f"{_esc(', '.join(bits))}; noise methods trained for {_esc(cfg.get('train_bits'))}. Study hash "
             f"{_esc(meta.get('hash'))}.</p>",
             f"<p class='note' id='ptq-settings'>{_esc(ptq_settings_text(cfg, bits))}</p>",
             f"<p class='note' id='splits'>{_esc(splits_text(meta, cfg))}</p>",
             "<p id='report-status'>rendering...</p>",
             "<h2 id='grid'>Training method × PTQ method</h2>",
             "<p class='note'>Test accuracy (%): mean ± standard deviation over seeds, per training configuration "
             "(rows) and PTQ method (columns), one table per bit-width; FP is the full-precision model. * and bold: "
             "the highest mean of the column (read a difference smaller than the standard deviations as none). Every "
             "training configuration gets the same PTQ, calibration images and BatchNorm rule; compare training "
             "methods within a column and PTQ methods within a row.</p>"]
    for b in bits:
        parts.append(f"<h3 id='grid-{_esc(b)}'>{_esc(b)}</h3>")
        parts.append(_grid_html(grid[b], vars_))
    parts += report_mixed.section(mrows, cfg, place)
    from . import report_sampling

    parts += report_sampling.section(records, dest)  # sampling.csv; [] without instruments.replicates
    parts.append("<h2 id='summary'>Summary of all models</h2>")
    scols = [("model", "model")] + ([("config", "config")] if any("config" in r for r in rows) else [])
    scols += [("method", "method"), ("lambda_max", "lambda"), ("sam_rho", "rho"), ("seed", "seed"),
              ("fp_val_acc", "FP val acc"), ("fp_acc", "FP test acc")]
    scols += [(f"ptq_acc_{b}{sfx}", f"{b} {name} test acc") for b in bits for name, sfx, _ in vars_]
    scols += [("trace", "trace"), ("trace_se", "+- SE"), ("top_eigenvalue", "top eig")]
    scols += [(f"trace_h_sigma_{b}", f"Tr(H Sigma) {b}") for b in bits]
    parts.append(_table(rows, scols, left={"model", "config", "method"}))
    parts.append("<p class='note'>PTQ variants: " + "; ".join(_esc(f"{n}: {d}") for n, _, d in vars_)
                 + ". Accuracies on the split named in the header; curvature on training images.</p>")
    comparison = method_comparison(rows, bits, vars_)
    ccols_m = [("method", "method"), ("configs", "configs")] + [
        (c, c) for c in ["FP"] + [f"{b} {name}" for b in bits for name, _, _ in vars_]]
    parts.append("<h2 id='methods'>Methods compared, choices on validation</h2>")
    parts.append("<p class='note'>Test accuracy (%) per method: mean ± standard deviation over seeds (n) of the "
                 "configuration [in brackets, when the method has several] with the best mean validation accuracy "
                 "in that column. The choice uses the validation split only; test numbers never take part in it. "
                 "Noise methods are trained for the study's train_bits; compare methods on the same column only, "
                 "and read differences smaller than a standard deviation as none.</p>")
    parts.append(_table(comparison, ccols_m, left={"method"}))
    parts.append("<h2 id='scatter'>Sharpness against PTQ accuracy</h2>")
    for b in bits:
        parts.append(place(plot_sharpness(rows, fits, b, vars_, adjusted=adjusted), stem=f"sharpness_vs_ptq_{b}"))
    parts.append("<h2 id='correlations'>Correlation of PTQ degradation with flatness</h2>")
    parts.append("<p class='note'>One table per bit-width and PTQ variant; nothing is pooled across bit-widths (they "
                 "are the same models again) or variants. Each table is one family of tests: every (flatness "
                 "measure, degradation) pair fitted in it, one test per pair and statistic. rho: Spearman (the "
                 "primary test), tau: Kendall, r: Pearson, each with its p-value as computed (models taken as "
                 "independent); Holm: the p-value Holm-adjusted over the table's family (family-wise error; Holm "
                 "1979); BH: the Benjamini-Hochberg q-value over the same family (false discovery rate; Benjamini and "
                 "Hochberg 1995). Kendall's and Pearson's p-values are adjusted over the same pairs, each on its own. "
                 "correlations.csv adds Spearman's p Holm-adjusted over every table of the report "
                 f"(spearman_p_holm_report, m = {sum(f['m_tests'] for f in families)}). slope: least squares with its "
                 f"95% t-interval. The bootstrap intervals (rho and slope, 95% percentile, {n_boot} resamples) are "
                 f"computed {_esc(unit_note)}.</p>")
    ccols = [("x", "flatness"), ("y", "degradation"), ("n", "n"), ("n_groups", "configs"),
             ("spearman_rho", "rho"), ("spearman_p", "p"), ("spearman_p_holm", "p Holm"), ("spearman_q_bh", "q BH"),
             ("bootstrap_rho_low", "rho low"), ("bootstrap_rho_high", "rho high"), ("kendall_tau", "tau"),
             ("kendall_p", "p"), ("kendall_p_holm", "p Holm"), ("pearson_r", "r"), ("pearson_p", "p"),
             ("pearson_p_holm", "p Holm"), ("slope", "slope"), ("slope_ci_low", "t low"), ("slope_ci_high", "t high"),
             ("bootstrap_slope_low", "boot low"), ("bootstrap_slope_high", "boot high")]
    for fam in families:
        fid = re.sub(r"[^A-Za-z0-9_-]", "_", f"corr-{fam['bits']}-{fam['variant']}")
        parts.append(f"<h3 id='{_esc(fid)}'>{_esc(fam['bits'])}, PTQ variant {_esc(fam['variant'])}</h3>")
        m = fam["m_tests"]
        unit = "cluster bootstrap over configs" if clustered else "bootstrap over models (no config column)"
        parts.append("<p class='note family'>" + _esc(f"m = {m} tests per statistic in this table; Holm: family-wise "
                                                       f"adjusted p over these {m}; BH: q-values over these {m}; "
                                                       f"intervals: {unit}.") + "</p>")
        if fam["table"]:
            parts.append(_table(fam["table"], ccols, left={"x", "y"}))
        if fam["skipped"]:
            parts.append("<p class='note'>Not fitted: " + "; ".join(_esc(f"{s['y']} ~ {s['x']}: {s['reason']}")
                                                                      for s in fam["skipped"]) + "</p>")
    if not families:
        parts.append("<p class='note'>No correlation: no bit-width or PTQ column in this study.</p>")
    parts.append("<h2 id='prediction'>Measured against predicted loss increase</h2>")
    parts.append("<p class='note'>Weights only: the model's own quantization error Q(W) - W, its per-channel mean mu "
                 "and variance Sigma; the second-order theory predicts slope 1 and intercept 0. Measured and "
                 "predicted on the same training images; one fit per bit-width (never pooled). The t-interval takes "
                 f"models as independent; the bootstrap interval is computed {_esc(unit_note)}.</p>")
    prow = [{"bits": b, "n": f.n, "configs": f.n_groups, "slope": f.slope, "low": f.slope_ci[0], "high": f.slope_ci[1],
             "blow": f.bootstrap_slope_ci[0], "bhigh": f.bootstrap_slope_ci[1], "intercept": f.intercept,
             "r": f.pearson_r} for b, f in pfits.items()]
    if prow:
        parts.append(_table(prow, [("bits", "bit-width"), ("n", "n"), ("configs", "configs"), ("slope", "slope"),
                                   ("low", "t low"), ("high", "t high"), ("blow", "boot low"), ("bhigh", "boot high"),
                                   ("intercept", "intercept"), ("r", "Pearson r")], left={"bits"}))
    else:
        parts.append("<p class='note'>Not enough models for a fit.</p>")
    parts.append("<h3 id='holdout'>Out of sample: calibrated on some seeds, scored on the others</h3>")
    parts.append("<p class='note'>Per bit-width: measured = intercept + slope * predicted fitted on the models "
                 "whose seed is in the first half of the sorted seeds, then scored on the models of the other seeds "
                 "(no held-out model was seen by the fit). RMSE and MAE of the calibrated prediction and of the raw "
                 "prediction (slope 1, intercept 0); the constant baseline predicts the fitting half's mean.</p>")
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
        parts.append(_table(hrows, [("bits", "bit-width"), ("fit", "fit seeds"), ("test", "held-out seeds"),
                                    ("n_fit", "n fit"), ("n_test", "n held out"), ("slope", "slope (fit half)"),
                                    ("low", "t low"), ("high", "t high"), ("rmse_cal", "RMSE calibrated"),
                                    ("mae_cal", "MAE calibrated"), ("rmse_raw", "RMSE raw"), ("mae_raw", "MAE raw"),
                                    ("rmse_const", "RMSE constant")], left={"bits", "fit", "test"}))
    if hskip:
        parts.append("<p class='note'>No out-of-sample check: " + "; ".join(_esc(t) for t in hskip) + ".</p>")
    parts.append(place(plot_prediction(rows, bits, pfits), stem="measured_vs_predicted"))
    parts.append("<h2 id='models'>Per model</h2>")
    for rec, row in zip(records, rows):
        m = rec.get("measurements", {})
        name = row["model"]
        sec = [f"<details><summary>{_esc(name)}</summary>"]
        acc_rows = [{"setting": "FP", "val": row.get("fp_val_acc"), "acc": row.get("fp_acc"),
                     "loss": row.get("fp_loss")}]
        for b in bits:
            for vname, sfx, _ in vars_:
                inc, fp_loss = row.get(f"ptq_loss_increase_{b}{sfx}"), row.get("fp_loss")
                loss = fp_loss + inc if inc is not None and fp_loss is not None else (
                    (m.get(f"ptq:{b}", {}).get("value") or {}).get("test_loss") if not sfx else None)
                acc_rows.append({"setting": f"{b} {vname}", "val": row.get(f"ptq_val_acc_{b}{sfx}"),
                                 "acc": row.get(f"ptq_acc_{b}{sfx}"), "loss": loss})
        flat = [{"measure": "Hessian trace", "value": row.get("trace"), "se": row.get("trace_se")}]
        eig = (m.get("eigen", {}).get("value") or {}).get("eigenvalues") or []
        flat += [{"measure": f"eigenvalue {i + 1}", "value": v, "se": None} for i, v in enumerate(eig)]
        for b in bits:
            nv = m.get(f"noise:{b}", {}).get("value") or {}
            flat.append({"measure": f"Tr(H Sigma) {b}",
                         "value": row.get(f"trace_h_sigma_{b}", nv.get("trace_h_sigma")),
                         "se": nv.get("trace_h_sigma_std_error")})
            flat.append({"measure": f"predicted / measured dL {b}",
                         "value": row.get(f"predicted_{b}", nv.get("predicted")),
                         "se": row.get(f"measured_{b}", nv.get("measured"))})
        sec.append("<div class='grid2'><div>" + _table(acc_rows, [("setting", "setting"), ("val", "val acc"),
                                                                   ("acc", "test acc"), ("loss", "test loss")],
                                                         left={"setting"})
                   + "</div><div>" + _table(flat, [("measure", "flatness"), ("value", "value"),
                                                   ("se", "SE / measured")],
                                            left={"measure"}) + "</div></div>")
        settings = ", ".join(f"{k}={v}" for k, v in rec.get("settings", {}).items())
        sec.append(f"<p class='note'>settings: {_esc(settings)}; run: {_esc(rec.get('run_dir'))}</p>")
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in rec["id"])
        model_png = f"model_{stem}" if "surface" in m else None  # the contour next to the slices
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
        bfig = plot_mixed_bits(rec, cfg) if mrows else None
        if bfig is not None:
            sec.append(place(bfig, stem=f"mixed_bits_{stem}"))
        sec.append("</details>")
        parts.append("".join(sec))

    written = []
    if static:
        written += _static_figures(static_figs, dest / "figures")
    if written:
        parts.append("<h2 id='files'>Files</h2><p class='note'>Static figures (PNG, PDF) in figures/: "
                     + ", ".join(_esc(w) for w in written[:12]) + (" ..." if len(written) > 12 else "")
                     + "; tables: summary.csv, summary.json, correlations.csv"
                     + (", mixed.csv" if mrows else "") + ".</p>")
    from plotly.offline import get_plotlyjs

    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='inputs-sha256' content='{digest}'>"
           f"<title>{_esc(cfg.get('name'))}: flatness and PTQ</title><style>{_CSS}</style>"
           f"<script>{_STATUS_JS}</script><script>{get_plotlyjs()}</script></head><body>"
           + "".join(parts)
           + f"<script type='application/json' id='figures-data'>{_script_json(figures)}</script>"
           + f"<script>{_RENDER_JS}</script></body></html>")
    _atomic_text(target, doc)
    return target


def _static_figures(static_figs: dict, folder: Path) -> list[str]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` for every stem (``[(figure, its JSON), ...]``),
    skipping a stem whose files exist and whose figures (and drawing code) are the ones they were
    drawn from last time: the digests are kept in ``folder/.digests.json``, written last. Drawing
    is most of a report's time (28 of 31 s for the digits study), and a rebuilt report of an
    unchanged study draws nothing."""
    import hashlib

    import matplotlib

    from . import plot_static

    index = folder / ".digests.json"
    try:
        old = json.loads(index.read_text()) if index.is_file() else {}
    except ValueError:
        old = {}
    code = Path(plot_static.__file__).read_bytes() + matplotlib.__version__.encode()
    new, written = {}, []
    for stem, placed in static_figs.items():
        digest = hashlib.sha256(code + "".join(text for _, text in placed).encode()).hexdigest()
        files = [folder / f"{stem}.{fmt}" for fmt in ("png", "pdf")]
        if old.get(stem) == digest and all(f.is_file() for f in files):
            written += [f.name for f in files]
        else:
            written += [f.name for f in plot_static.save([fig for fig, _ in placed], folder / stem)]
        new[stem] = digest
    _atomic_text(index, json.dumps(new, indent=0) + "\n")
    return written


def _atomic_text(path: Path, text: str) -> None:
    from dnq.io import atomic_write_text

    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    """``python -m landscape.report PATH [--out FILE] [--no-static] [--debug]``: as ``landscape
    report`` (errors are one line on stderr and exit code 2)."""
    from .cli import OneLineParser, debug_requested, guarded

    p = OneLineParser(prog="python -m landscape.report", description="Write the report of a study.")
    p.add_argument("path", help="the study directory")
    p.add_argument("--out", default=None, help="the HTML file (default PATH/report.html)")
    p.add_argument("--no-static", action="store_true", help="skip the PNG/PDF figures")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also DNQ_DEBUG=1)")
    return guarded("landscape report", lambda: _main(p, argv), debug_requested(argv))


def _main(p, argv) -> int:
    a = p.parse_args(argv)
    print(build(a.path, _out_file(a.out), static=not a.no_static))
    return 0


def _out_file(out: str | None) -> Path | None:
    """``--out`` of the report: a file whose folder exists (checked before anything is written)."""
    if out is None:
        return None
    target = Path(out)
    if str(out) == "" or target.is_dir():
        raise StudyError(f"--out must be a file name (the HTML report), got {out!r}")
    if not target.parent.is_dir():
        raise StudyError(f"--out {out}: the folder {target.parent} does not exist (or is not a folder); create it "
                         "first or choose another --out")
    return target


if __name__ == "__main__":
    sys.exit(main())
