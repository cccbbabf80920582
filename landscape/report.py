"""The report of a study: ``report.html`` (one self-contained file, plotly.js embedded, works
offline), the same figures as PNG and PDF for papers, and ``summary.csv`` / ``summary.json``.

    python -m landscape.report reports/digits          # or: landscape report reports/digits
    >>> from landscape.report import build             # doctest: +SKIP
    >>> build("reports/digits")                        # doctest: +SKIP

Sections: a summary table of all models; the correlation table (PTQ degradation against each
flatness measure, per bit-width: Spearman, Kendall, Pearson with p-values, least-squares slope
with its confidence interval); scatter plots of accuracy drop against trace, top eigenvalue and
Tr(H Sigma) per bit-width with the fit and its confidence band; measured against predicted loss
increase with the identity line; and per model: accuracy at every bit-width, flatness figures,
the spectral density, the 2-D surface (3-D and contour) and the 1-D slice along the model's own
quantization direction with the weight-quantized point (alpha = 1) marked.

Every user-supplied string (model names, paths, settings) is HTML-escaped, in the page and in the
figures' labels; JSON embedded in ``<script>`` has ``<``, ``>`` and ``&`` escaped.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from .regress import correlation_table, fit
from .study import StudyError, load_records, summary_rows

MEASURES = [("trace", "Hessian trace"), ("top_eigenvalue", "top eigenvalue"), ("trace_h_sigma", "Tr(H Sigma)"),
            ("predicted", "predicted loss increase")]


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


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def _x_col(measure: str, bits: str) -> str:
    return f"{measure}_{bits}" if measure in ("trace_h_sigma", "predicted") else measure


def correlations(rows: list[dict], bits: list[str], n_boot: int = 2000, seed: int = 0) -> tuple[list, list]:
    """Fits of accuracy drop and PTQ loss increase on each flatness measure, per bit-width.

    Returns ``(fits, skipped)``; a pair with fewer than 3 usable models is skipped with its reason.
    """
    fits, skipped = [], []
    for b in bits:
        for y in (f"acc_drop_{b}", f"ptq_loss_increase_{b}"):
            for m, _ in MEASURES:
                x = _x_col(m, b)
                xs = np.array([np.nan if r.get(x) is None else r[x] for r in rows], dtype=float)
                ys = np.array([np.nan if r.get(y) is None else r[y] for r in rows], dtype=float)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fits.append(fit(xs, ys, x_name=x, y_name=y, n_boot=n_boot, seed=seed))
                except ValueError as e:
                    skipped.append({"x": x, "y": y, "reason": str(e)})
    return fits, skipped


def prediction_fits(rows: list[dict], bits: list[str], seed: int = 0) -> dict:
    """Measured against predicted loss increase (weights only), per bit-width and pooled."""
    out = {}
    pooled_x, pooled_y = [], []
    for b in bits:
        xs = [r.get(f"predicted_{b}") for r in rows]
        ys = [r.get(f"measured_{b}") for r in rows]
        pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
        pooled_x += [p[0] for p in pairs]
        pooled_y += [p[1] for p in pairs]
        try:
            out[b] = fit([p[0] for p in pairs], [p[1] for p in pairs], x_name=f"predicted_{b}",
                         y_name=f"measured_{b}", seed=seed)
        except ValueError:
            pass
    try:
        out["all"] = fit(pooled_x, pooled_y, x_name="predicted", y_name="measured", seed=seed)
    except ValueError:
        pass
    return out


# -- figures (plotly) ---------------------------------------------------------------------------
def _go():
    import plotly.graph_objects as go

    return go


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _scatter_figure(rows, fits_by_key, bits: str, y: str, ytitle: str):
    from plotly.subplots import make_subplots

    go = _go()
    titles = []
    for m, label in MEASURES[:3]:
        f = fits_by_key.get((_x_col(m, bits), y))
        titles.append(label if f is None else
                      f"{label}: rho={f.spearman_rho:.2f} (p={f.spearman_p:.2g}), tau={f.kendall_tau:.2f}")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.07)
    methods = sorted({str(r.get("method")) for r in rows})
    for j, (m, label) in enumerate(MEASURES[:3], start=1):
        x = _x_col(m, bits)
        f = fits_by_key.get((x, y))
        if f is not None:
            grid = np.linspace(min(f.x), max(f.x), 50)
            lo, hi = f.band(grid)
            fig.add_trace(go.Scatter(x=np.r_[grid, grid[::-1]].tolist(), y=(100 * np.r_[hi, lo[::-1]]).tolist(),
                                     fill="toself", fillcolor="rgba(60,60,60,0.12)", line=dict(width=0),
                                     hoverinfo="skip", showlegend=False), row=1, col=j)
            fig.add_trace(go.Scatter(x=grid.tolist(), y=(100 * f.predict(grid)).tolist(), mode="lines",
                                     line=dict(color="#444"), name="least squares, 95% band", showlegend=j == 1),
                          row=1, col=j)
        for k, meth in enumerate(methods):  # one colour per method, the same in every panel
            pts = [(r[x], r[y], r["model"]) for r in rows
                   if str(r.get("method")) == meth and r.get(x) is not None and r.get(y) is not None]
            if pts:
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[100 * p[1] for p in pts], mode="markers",
                                         text=[_esc(p[2]) for p in pts], name=_esc(meth), legendgroup=_esc(meth),
                                         hovertemplate="%{text}<br>x=%{x:.4g}<br>y=%{y:.3g}",
                                         marker=dict(size=9, color=_COLORS[k % len(_COLORS)]), showlegend=j == 1),
                              row=1, col=j)
        fig.update_xaxes(title_text=label, row=1, col=j)
    fig.update_yaxes(title_text=f"{ytitle} (points)", row=1, col=1)
    fig.update_layout(height=400, margin=dict(l=60, r=20, t=60, b=50), title=f"{ytitle} at {bits} against flatness")
    fig.update_annotations(font_size=11)
    return fig


def _prediction_figure(rows, bits: list[str], pfits: dict):
    from plotly.subplots import make_subplots

    go = _go()
    titles = []
    for b in bits:
        f = pfits.get(b)
        titles.append(b if f is None else f"{b}: slope {f.slope:.3g} [{f.slope_ci[0]:.3g}, {f.slope_ci[1]:.3g}], "
                                          f"r={f.pearson_r:.2f}")
    fig = make_subplots(rows=1, cols=max(len(bits), 1), subplot_titles=titles, horizontal_spacing=0.07)
    for j, b in enumerate(bits, start=1):  # one panel per bit-width: their scales differ by 100x
        pts = [(r.get(f"predicted_{b}"), r.get(f"measured_{b}"), r["model"]) for r in rows]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", showlegend=False,
                                 marker=dict(size=9, color=_COLORS[0]), text=[_esc(p[2]) for p in pts],
                                 hovertemplate="%{text}<br>predicted %{x:.4g}<br>measured %{y:.4g}"), row=1, col=j)
        vals = [v for p in pts for v in p[:2]]
        lo, hi = min(vals), max(vals)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="identity (theory)", showlegend=j == 1,
                                 line=dict(dash="dash", color="black")), row=1, col=j)
        f = pfits.get(b)
        if f is not None:
            grid = np.linspace(min(f.x), max(f.x), 20)
            fig.add_trace(go.Scatter(x=grid.tolist(), y=f.predict(grid).tolist(), mode="lines", name="least squares",
                                     showlegend=j == 1, line=dict(color="#d62728")), row=1, col=j)
        fig.update_xaxes(title_text="predicted", row=1, col=j)
    fig.update_yaxes(title_text="measured  L(Q(W)) - L(W)", row=1, col=1)
    fig.update_layout(height=400, margin=dict(l=60, r=20, t=70, b=50), title="Second-order prediction of the "
                      "weight-quantization loss increase: g.mu + (mu^T H mu + Tr(H Sigma))/2")
    fig.update_annotations(font_size=11)
    return fig


def _density_figure(d: dict, name: str):
    go = _go()
    floor = max(max(d["density"]), 1e-300) * 1e-6  # a log axis: six decades below the peak
    fig = go.Figure(go.Scatter(x=d["grid"], y=[max(v, floor) for v in d["density"]], mode="lines"))
    fig.update_layout(height=300, title=f"Spectral density: {_esc(name)}", xaxis_title="eigenvalue",
                      yaxis_title="density", yaxis_type="log", margin=dict(l=60, r=20, t=50, b=40))
    return fig


def _surface_figures(s: dict, name: str):
    go = _go()
    z = np.array(s["loss"], dtype=float)
    z = np.where(np.isfinite(z), z, np.nan)
    x, y = s["alphas"], s["betas"]
    f3 = go.Figure(go.Surface(x=x, y=y, z=z.T.tolist(), colorscale="Viridis", showscale=False))
    f3.update_layout(height=420, title=f"Loss surface (filter-normalized): {_esc(name)}",
                     scene=dict(xaxis_title="alpha", yaxis_title="beta", zaxis_title="loss"),
                     margin=dict(l=0, r=0, t=50, b=0))
    fc = go.Figure(go.Contour(x=x, y=y, z=z.T.tolist(), colorscale="Viridis", contours=dict(showlabels=True)))
    fc.update_layout(height=420, title=f"Contour: {_esc(name)}", xaxis_title="alpha", yaxis_title="beta",
                     margin=dict(l=60, r=20, t=50, b=40))
    return f3, fc


def _slice_figure(slices: dict, name: str):
    go = _go()
    fig = go.Figure()
    for k, (b, s) in enumerate(slices.items()):
        color = _COLORS[k % len(_COLORS)]
        fig.add_trace(go.Scatter(x=s["alphas"], y=s["loss"], mode="lines", name=f"{b}: Q(W) - W", line=dict(color=color)))
        at = int(np.argmin(np.abs(np.array(s["alphas"]) - s.get("ptq_alpha", 1.0))))
        fig.add_trace(go.Scatter(x=[s["alphas"][at]], y=[s["loss"][at]], mode="markers",
                                 marker=dict(size=11, symbol="x", color=color),
                                 name=f"{b}: quantized weights (alpha=1)"))
    fig.update_layout(height=340, title=f"Loss along the quantization direction: {_esc(name)}",
                      xaxis_title="alpha (0 = FP weights, 1 = quantized weights)", yaxis_title="training loss",
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig


# -- static figures (matplotlib) -----------------------------------------------------------------
def _static(figdir: Path, rows, fits_by_key, bits, pfits, records) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []

    def save(fig, stem):
        for ext in ("png", "pdf"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=130, bbox_inches="tight")
            _atomic_bytes(figdir / f"{stem}.{ext}", buf.getvalue())
            written.append(f"{stem}.{ext}")
        plt.close(fig)

    for b in bits:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, (m, label) in zip(axes, MEASURES[:3]):
            x, y = _x_col(m, b), f"acc_drop_{b}"
            pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], s=25)
            f = fits_by_key.get((x, y))
            if f is not None:
                grid = np.linspace(min(f.x), max(f.x), 50)
                lo, hi = f.band(grid)
                ax.plot(grid, 100 * f.predict(grid), color="C0")
                ax.fill_between(grid, 100 * lo, 100 * hi, color="C0", alpha=0.15)
                ax.set_title(f"rho={f.spearman_rho:.2f} (p={f.spearman_p:.2g})", fontsize=9)
            ax.set_xlabel(label)
        axes[0].set_ylabel(f"accuracy drop at {b} (points)")
        save(fig, f"sharpness_vs_ptq_{b}")
    fig, axes = plt.subplots(1, max(len(bits), 1), figsize=(4.3 * max(len(bits), 1), 3.8), squeeze=False)
    for ax, b in zip(axes[0], bits):  # one panel per bit-width: their scales differ by 100x
        pts = [(r.get(f"predicted_{b}"), r.get(f"measured_{b}")) for r in rows]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            vals = [v for p in pts for v in p]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=25)
            ax.plot([min(vals), max(vals)], [min(vals), max(vals)], "k--", label="identity")
        f = pfits.get(b)
        ax.set_title(b if f is None else f"{b}: slope {f.slope:.3g} [{f.slope_ci[0]:.3g}, {f.slope_ci[1]:.3g}]",
                     fontsize=9)
        ax.set_xlabel("predicted loss increase")
    axes[0][0].set_ylabel("measured loss increase")
    save(fig, "measured_vs_predicted")
    for rec in records:
        m = rec.get("measurements", {})
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in rec["id"])
        if "surface" in m:
            s = m["surface"]["value"]
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
            z = np.array(s["loss"], dtype=float)
            cs = a1.contourf(s["alphas"], s["betas"], z.T, levels=20, cmap="viridis")
            fig.colorbar(cs, ax=a1)
            a1.set_title(f"{rec['id']}: 2-D surface", fontsize=9)
            for k, v in m.items():
                if k.startswith("slice:"):
                    sv = v["value"]
                    a2.plot(sv["alphas"], sv["loss"], label=k.split(":", 1)[1])
            a2.axvline(1.0, color="gray", ls=":")
            a2.set_xlabel("alpha along Q(W) - W")
            a2.set_ylabel("loss")
            a2.legend(fontsize=8)
            save(fig, f"model_{stem}")
    return written


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
        ', errors: ' + (window.__reportErrors.length + failed) + (window.__reportErrors.length ? ' ' + window.__reportErrors.join(' | ') : '');
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


def build(path, out=None, *, static: bool = True, n_boot: int = 2000) -> Path:
    """Write ``report.html`` (and ``figures/``, ``summary.csv``, ``summary.json``) for the study
    in ``path``; returns the HTML file's path.

    Raises:
        StudyError: ``path`` holds no study, or no model has finished a measurement yet.
    """
    path = Path(path)
    records = load_records(path)
    if not records:
        raise StudyError(f"{path} has no model records yet; run the study first")
    meta = json.loads((path / "study.json").read_text())
    cfg = meta["config"]
    bits = list(cfg.get("bits", []))
    rows = summary_rows(records, bits)
    fits, skipped = correlations(rows, bits, n_boot=n_boot)
    fits_by_key = {(f.x_name, f.y_name): f for f in fits}
    pfits = prediction_fits(rows, bits)
    corr = correlation_table(fits)

    # machine-readable outputs
    cols = list(rows[0].keys())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    _atomic_text(path / "summary.csv", buf.getvalue())
    buf = io.StringIO()
    if corr:
        w = csv.DictWriter(buf, fieldnames=list(corr[0].keys()))
        w.writeheader()
        w.writerows(corr)
    _atomic_text(path / "correlations.csv", buf.getvalue())
    summary = {"study": cfg.get("name"), "config_hash": meta.get("hash"), "models": rows, "correlations": corr,
               "skipped_fits": skipped,
               "prediction": {k: {"slope": f.slope, "slope_ci": f.slope_ci, "intercept": f.intercept, "n": f.n,
                                  "pearson_r": f.pearson_r, "spearman_rho": f.spearman_rho}
                              for k, f in pfits.items()}}
    _atomic_text(path / "summary.json", json.dumps(summary, indent=2, default=_default) + "\n")

    figures: dict[str, dict] = {}

    def place(fig, cls: str = "plot") -> str:
        fid = f"fig{len(figures)}"
        figures[fid] = json.loads(fig.to_json())
        return f"<div id='{fid}' class='{cls}'></div>"

    parts = [f"<h1>Flatness and PTQ accuracy: {_esc(cfg.get('name'))}</h1>",
             f"<p class='note'>{len(records)} models ({_esc(cfg.get('model'))} on {_esc(cfg.get('data'))}), bit-widths "
             f"{_esc(', '.join(bits))}; noise methods trained for {_esc(cfg.get('train_bits'))}. Study hash "
             f"{_esc(meta.get('hash'))}. Curvature on {_esc(cfg['instruments']['hessian_samples'])} training images, "
             f"accuracies on the test split.</p>",
             "<p id='report-status'>rendering...</p>",
             "<h2 id='summary'>Summary of all models</h2>"]
    scols = [("model", "model"), ("method", "method"), ("lambda_max", "lambda"), ("sam_rho", "rho"),
             ("fp_acc", "FP acc")] + [(f"ptq_acc_{b}", f"{b} acc") for b in bits] + \
        [("trace", "trace"), ("trace_se", "+- SE"), ("top_eigenvalue", "top eig")] + \
        [(f"trace_h_sigma_{b}", f"Tr(H Sigma) {b}") for b in bits]
    parts.append(_table(rows, scols, left={"model", "method"}))
    parts.append("<h2 id='scatter'>Sharpness against PTQ accuracy</h2>")
    for b in bits:
        parts.append(place(_scatter_figure(rows, fits_by_key, b, f"acc_drop_{b}", "accuracy drop")))
    parts.append("<h2 id='correlations'>Correlation of PTQ degradation with flatness</h2>")
    parts.append("<p class='note'>One row per (flatness measure, degradation, bit-width), across all models. rho: "
                 "Spearman, tau: Kendall, r: Pearson, each with its p-value; slope: least squares with its 95% "
                 "t-interval; the rho interval is a percentile bootstrap over models. With few models, read the "
                 "p-values before the point estimates.</p>")
    ccols = [("x", "flatness"), ("y", "degradation"), ("n", "n"), ("spearman_rho", "rho"), ("spearman_p", "p"),
             ("bootstrap_rho_low", "rho low"), ("bootstrap_rho_high", "rho high"), ("kendall_tau", "tau"),
             ("kendall_p", "p"), ("pearson_r", "r"), ("pearson_p", "p"), ("slope", "slope"),
             ("slope_ci_low", "low"), ("slope_ci_high", "high")]
    parts.append(_table(corr, ccols, left={"x", "y"}))
    if skipped:
        parts.append("<p class='note'>Not fitted: " + "; ".join(_esc(f"{s['y']} ~ {s['x']}: {s['reason']}")
                                                                  for s in skipped) + "</p>")
    parts.append("<h2 id='prediction'>Measured against predicted loss increase</h2>")
    f = pfits.get("all")
    parts.append("<p class='note'>Weights only: the model's own quantization error Q(W) - W, its per-channel mean mu "
                 "and variance Sigma; the second-order theory predicts slope 1. "
                 + (f"Pooled over bit-widths: slope {f.slope:.3g} (95% CI {f.slope_ci[0]:.3g} to {f.slope_ci[1]:.3g}), "
                    f"Pearson r {f.pearson_r:.3f}, n = {f.n}." if f is not None else "Not enough models for a fit.")
                 + "</p>")
    parts.append(place(_prediction_figure(rows, bits, pfits)))
    parts.append("<h2 id='models'>Per model</h2>")
    for rec, row in zip(records, rows):
        m = rec.get("measurements", {})
        name = row["model"]
        sec = [f"<details><summary>{_esc(name)}</summary>"]
        acc_rows = [{"setting": "FP", "acc": row.get("fp_acc"), "loss": row.get("fp_loss")}]
        acc_rows += [{"setting": b, "acc": row.get(f"ptq_acc_{b}"),
                      "loss": (m.get(f"ptq:{b}", {}).get("value") or {}).get("test_loss")} for b in bits]
        flat = [{"measure": "Hessian trace", "value": row.get("trace"), "se": row.get("trace_se")}]
        eig = (m.get("eigen", {}).get("value") or {}).get("eigenvalues") or []
        flat += [{"measure": f"eigenvalue {i + 1}", "value": v, "se": None} for i, v in enumerate(eig)]
        for b in bits:
            nv = m.get(f"noise:{b}", {}).get("value") or {}
            flat.append({"measure": f"Tr(H Sigma) {b}", "value": nv.get("trace_h_sigma"),
                         "se": nv.get("trace_h_sigma_std_error")})
            flat.append({"measure": f"predicted / measured dL {b}", "value": nv.get("predicted"),
                         "se": nv.get("measured")})
        sec.append("<div class='grid2'><div>" + _table(acc_rows, [("setting", "setting"), ("acc", "test acc"),
                                                                   ("loss", "test loss")], left={"setting"})
                   + "</div><div>" + _table(flat, [("measure", "flatness"), ("value", "value"), ("se", "SE / measured")],
                                            left={"measure"}) + "</div></div>")
        settings = ", ".join(f"{k}={v}" for k, v in rec.get("settings", {}).items())
        sec.append(f"<p class='note'>settings: {_esc(settings)}; run: {_esc(rec.get('run_dir'))}</p>")
        if "density" in m:
            sec.append(place(_density_figure(m["density"]["value"], name)))
        if "surface" in m:
            f3, fc = _surface_figures(m["surface"]["value"], name)
            sec.append("<div class='grid2'>" + place(f3) + place(fc) + "</div>")
        slices = {k.split(":", 1)[1]: v["value"] for k, v in m.items() if k.startswith("slice:")}
        if slices:
            sec.append(place(_slice_figure(slices, name)))
        sec.append("</details>")
        parts.append("".join(sec))

    written = _static(path / "figures", rows, fits_by_key, bits, pfits, records) if static else []
    if written:
        parts.append("<h2 id='files'>Files</h2><p class='note'>Static figures (PNG, PDF) in figures/: "
                     + ", ".join(_esc(w) for w in written[:12]) + (" ..." if len(written) > 12 else "")
                     + "; tables: summary.csv, summary.json, correlations.csv.</p>")
    from plotly.offline import get_plotlyjs

    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{_esc(cfg.get('name'))}: flatness and PTQ</title><style>{_CSS}</style>"
           f"<script>{_STATUS_JS}</script><script>{get_plotlyjs()}</script></head><body>"
           + "".join(parts)
           + f"<script type='application/json' id='figures-data'>{_script_json(figures)}</script>"
           + f"<script>{_RENDER_JS}</script></body></html>")
    target = Path(out) if out is not None else path / "report.html"
    _atomic_text(target, doc)
    return target


def _atomic_text(path: Path, text: str) -> None:
    from dnq.io import atomic_write_text

    atomic_write_text(path, text)


def _atomic_bytes(path: Path, data: bytes) -> None:
    from dnq.io import atomic_write_bytes

    atomic_write_bytes(path, data)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m landscape.report", description="Write the report of a study.")
    p.add_argument("path", help="the study directory")
    p.add_argument("--out", default=None, help="the HTML file (default PATH/report.html)")
    p.add_argument("--no-static", action="store_true", help="skip the PNG/PDF figures")
    a = p.parse_args(argv)
    try:
        print(build(a.path, a.out, static=not a.no_static))
    except StudyError as e:
        print(f"landscape report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
