"""Plotly figures of the instruments' results and of a study's report: one builder per figure.

Every builder returns a ``plotly.graph_objects.Figure`` (``fig.show()`` in a notebook). The report
(:mod:`landscape.report`) embeds these same figures in its HTML and writes their PNG and PDF
copies with :mod:`landscape.plot_static`; no other module builds them.

Builders take a result object or its dict form (``result.to_dict()``, as a study's records store
it), so that a figure can be drawn from a live result or from JSON:

    >>> from landscape.plot import plot_density
    >>> fig = plot_density({"grid": [0.0, 1.0, 2.0], "density": [0.25, 1.0, 0.25]}, log=False)
    >>> list(fig.data[0].y)
    [0.25, 1.0, 0.25]

Plotly reads labels as HTML, so every user string (a model, method, configuration or PTQ method
name) is HTML-escaped in the labels; ``title`` arguments are used as given.
"""

from __future__ import annotations

import base64
import json
import statistics
from pathlib import Path

import numpy as np

from dnq_landscape_common.html import esc as _esc
from dnq_landscape_common.io import atomic_write_bytes, atomic_write_text
from dnq_landscape_common.stats import seed_stats

from .plot_static import to_bytes
from .records import mixed_measurement
from .regress import FitResult

#: the flatness measures of a study's summary rows: ``(measure, label)``
MEASURES = [("trace", "Hessian trace"), ("top_eigenvalue", "top eigenvalue"), ("trace_h_sigma", "Tr(H Sigma)"),
            ("predicted", "predicted loss increase")]

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
_SYMBOLS = {"predicted": "diamond", "hawq": "square", "measured": "triangle-up"}


def _go():
    import plotly.graph_objects as go

    return go


def _field(result, name: str, default=None):
    """A field of a result object or of its dict form."""
    if isinstance(result, dict):
        return result.get(name, default)
    return getattr(result, name, default)


def _floats(v) -> list:
    """A result's array (list, NumPy array or tensor) as a list of floats, NaN for missing values."""
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=float).tolist()


def _named(title: str, name) -> str:
    return title if name is None else f"{title}: {_esc(name)}"


def measure_column(measure: str, bits: str) -> str:
    """The summary-row column of a flatness measure at a bit-width (``trace_h_sigma`` and
    ``predicted`` depend on the bit-width, the Hessian trace and top eigenvalue do not).

    Example:
        >>> measure_column("trace", "W4A4"), measure_column("trace_h_sigma", "W4A4")
        ('trace', 'trace_h_sigma_W4A4')
    """
    return f"{measure}_{bits}" if measure in ("trace_h_sigma", "predicted") else measure


def _fit(f):
    """A :class:`landscape.regress.FitResult` from the object or its dict form."""
    if isinstance(f, dict):
        return FitResult(**f)
    return f


# -- the instruments ---------------------------------------------------------------------------------
def plot_trace(result, title: str = "Hutchinson samples"):
    """Histogram of the per-probe quadratic forms with the estimate and its standard error.

    Args:
        result: a :class:`landscape.TraceResult` or its dict form (``samples``, ``value``,
            ``std_error``, ``method``).
        title: the figure's title.

    Returns:
        A plotly figure: one histogram of ``samples`` and a dashed line at ``value``.

    Example:
        >>> fig = plot_trace({"samples": [1.0, 2.0, 3.0], "value": 2.0, "std_error": 0.6,
        ...                   "method": "hutchinson"})
        >>> list(fig.data[0].x)
        [1.0, 2.0, 3.0]
    """
    go = _go()
    value, se = _field(result, "value"), _field(result, "std_error")
    fig = go.Figure(go.Histogram(x=_floats(_field(result, "samples")), name="probes", nbinsx=30))
    fig.add_vline(x=value, line_dash="dash")
    fig.add_annotation(x=value, y=0.98, xref="x", yref="y domain", showarrow=False, xanchor="left", yanchor="top",
                       xshift=4, bgcolor="rgba(255,255,255,0.7)",
                       text=f"{_esc(_field(result, 'method'))}: {value:.4g} +- {se:.2g}")  # inside: never clipped
    fig.update_layout(title=title, xaxis_title="z^T H z", yaxis_title="count")
    return fig


def plot_eigenvalues(result, title: str = "Top eigenvalues"):
    """Eigenvalues with their residual norms as error bars.

    Args:
        result: a :class:`landscape.EigenResult` or its dict form (``eigenvalues``,
            ``residual_norms``, ``method``, ``num_matvecs``).
        title: the figure's title (the method and the products spent are appended).

    Returns:
        A plotly figure: the eigenvalues against their index 1, 2, ...

    Example:
        >>> fig = plot_eigenvalues({"eigenvalues": [5.0, 2.0], "residual_norms": [0.1, 0.2],
        ...                         "method": "lanczos", "num_matvecs": 20})
        >>> list(fig.data[0].y), list(fig.data[0].error_y.array)
        ([5.0, 2.0], [0.1, 0.2])
    """
    go = _go()
    eig = _floats(_field(result, "eigenvalues"))
    fig = go.Figure(go.Scatter(x=list(range(1, len(eig) + 1)), y=eig, mode="markers",
                               error_y=dict(type="data", array=_floats(_field(result, "residual_norms")),
                                            visible=True)))
    fig.update_layout(title=f"{title} ({_esc(_field(result, 'method'))}, {_field(result, 'num_matvecs')} matvecs)",
                      xaxis=dict(title="index", tickmode="linear", tick0=1, dtick=1), yaxis_title="eigenvalue")
    return fig


def plot_density(result, log: bool = True, title: str = "Hessian spectral density (SLQ)", name=None):
    """The broadened spectral density on its grid (log scale by default, as in Ghorbani et al.).

    Args:
        result: a :class:`landscape.DensityResult` or its dict form (``grid``, ``density``).
        log: a log density axis; values below a millionth of the peak are drawn at that floor
            (a log axis cannot show zero).
        title: the figure's title.
        name: a model name appended to the title (escaped).

    Returns:
        A plotly figure with one line: x the grid, y the density (floored when ``log``).

    Example:
        >>> fig = plot_density({"grid": [0.0, 1.0], "density": [0.0, 2.0]})
        >>> list(fig.data[0].y)
        [2e-06, 2.0]
    """
    go = _go()
    y = np.asarray(_floats(_field(result, "density")))
    if log:
        peak = np.nanmax(y) if y.size and np.isfinite(y).any() else 0.0
        y = np.maximum(y, max(peak, 1e-300) * 1e-6)  # six decades below the peak
    fig = go.Figure(go.Scatter(x=_floats(_field(result, "grid")), y=y.tolist(), mode="lines"))
    fig.update_layout(height=320, title=_named(title, name), xaxis_title="eigenvalue", yaxis_title="density",
                      yaxis_type="log" if log else "linear", margin=dict(l=60, r=20, t=50, b=40))
    return fig


def plot_surface_1d(result, mark: float | None = None, title: str = "Loss along a direction", name=None):
    """Loss (and accuracy, on a second axis, where measured) along one direction.

    Args:
        result: a 1-D :class:`landscape.SurfaceResult` or its dict form (``alphas``, ``loss``,
            optional ``accuracy``).
        mark: draw a dotted vertical line there (e.g. alpha = 1 for the quantized weights).
        title: the figure's title.
        name: a model name appended to the title (escaped).

    Returns:
        A plotly figure: the loss against alpha, and the accuracy unless it is all NaN.

    Example:
        >>> fig = plot_surface_1d({"alphas": [-1.0, 0.0, 1.0], "loss": [2.0, 1.0, 2.5]}, mark=1.0)
        >>> list(fig.data[0].y)
        [2.0, 1.0, 2.5]
    """
    go = _go()
    alphas = _floats(_field(result, "alphas"))
    fig = go.Figure(go.Scatter(x=alphas, y=_floats(_field(result, "loss")), name="loss", mode="lines+markers"))
    acc = _field(result, "accuracy")
    acc = None if acc is None else np.asarray(_floats(acc))
    if acc is not None and not np.isnan(acc).all():
        fig.add_trace(go.Scatter(x=alphas, y=acc.tolist(), name="accuracy", yaxis="y2", mode="lines"))
        fig.update_layout(yaxis2=dict(title="accuracy", overlaying="y", side="right"))
    if mark is not None:
        fig.add_vline(x=mark, line_dash="dot")
    fig.update_layout(title=_named(title, name), xaxis_title="alpha", yaxis_title="loss")
    return fig


def plot_quantization_slices(slices: dict, name=None):
    """The loss along each bit-width's quantization direction ``Q(W) - W``, with the quantized
    weights (``ptq_alpha``, default alpha = 1) marked.

    Args:
        slices: ``{bit-width: slice}``, a slice being a 1-D :class:`landscape.SurfaceResult` or its
            dict form (``alphas``, ``loss``, optional ``ptq_alpha``), as a study's ``slice:<bits>``
            measurements store it.
        name: a model name appended to the title (escaped).

    Returns:
        A plotly figure: per bit-width a line (the loss) and one marker at the quantized weights.

    Example:
        >>> fig = plot_quantization_slices({"W4A4": {"alphas": [0.0, 0.5, 1.0], "loss": [0.1, 0.2, 0.4]}})
        >>> list(fig.data[0].y), list(fig.data[1].y)
        ([0.1, 0.2, 0.4], [0.4])
    """
    go = _go()
    fig = go.Figure()
    for k, (b, s) in enumerate(slices.items()):
        color = _COLORS[k % len(_COLORS)]
        alphas, loss = _floats(_field(s, "alphas")), _floats(_field(s, "loss"))
        fig.add_trace(go.Scatter(x=alphas, y=loss, mode="lines", name=f"{_esc(b)}: Q(W) - W", line=dict(color=color)))
        at = int(np.argmin(np.abs(np.array(alphas) - _field(s, "ptq_alpha", 1.0))))
        fig.add_trace(go.Scatter(x=[alphas[at]], y=[loss[at]], mode="markers",
                                 marker=dict(size=11, symbol="x", color=color),
                                 name=f"{_esc(b)}: quantized weights (alpha=1)"))
    fig.update_layout(height=340, title=_named("Loss along the quantization direction", name),
                      xaxis_title="alpha (0 = FP weights, 1 = quantized weights)", yaxis_title="training loss",
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig


def _log_colors(z: np.ndarray) -> bool:
    """Whether a loss grid spans two decades or more (then colours follow log10 of the loss)."""
    finite = z[np.isfinite(z)]
    return bool(finite.size and finite.min() > 0 and finite.max() / finite.min() >= 100)


def _log_colorbar(z: np.ndarray, title: str) -> dict:
    """A colorbar for colours given as log10 values, its ticks labelled with the values themselves."""
    finite = z[np.isfinite(z)]
    lo, hi = np.floor(np.log10(finite.min())), np.ceil(np.log10(finite.max()))
    ticks = [m * 10.0 ** e for e in np.arange(lo, hi + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if finite.min() / 1.5 <= t <= finite.max() * 1.5]
    return dict(title=title, tickvals=np.log10(ticks).tolist(), ticktext=[f"{t:g}" for t in ticks])


def plot_surface_2d(result, kind: str = "surface", title: str = "Loss surface", name=None, log: bool | None = None):
    """A 2-D loss surface as an interactive 3-D surface or as a filled contour, with a colorbar.

    Args:
        result: a 2-D :class:`landscape.SurfaceResult` or its dict form (``alphas``, ``betas`` and
            ``loss`` indexed ``[alpha, beta]``); non-finite losses are left out (NaN).
        kind: ``"surface"`` or ``"contour"``.
        title: the figure's title.
        name: a model name appended to the title (escaped).
        log: colour (and, for ``"surface"``, height) on a log scale; default: when the finite
            losses span two decades or more (a basin from 2.3 to 270 is then not one colour).
            The colorbar's ticks are labelled with the loss itself.

    Returns:
        A plotly figure with one trace whose ``z[j][i]`` is the loss at ``(alphas[i], betas[j])``
        (plotly's rows are y, so ``z`` is ``loss`` transposed); on a log scale a contour's ``z``
        holds log10 of the loss and a surface's ``surfacecolor`` does.

    Raises:
        ValueError: ``kind`` is neither.

    Example:
        >>> fig = plot_surface_2d({"alphas": [0.0, 1.0], "betas": [0.0, 1.0, 2.0],
        ...                        "loss": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}, kind="contour")
        >>> fig.data[0].z
        ([1.0, 4.0], [2.0, 5.0], [3.0, 6.0])
    """
    if kind not in ("surface", "contour"):
        raise ValueError(f"kind must be 'surface' or 'contour', got {kind!r}")
    go = _go()
    z = np.array(_floats(_field(result, "loss")), dtype=float)
    z = np.where(np.isfinite(z), z, np.nan).T  # plotly: z[row = beta][column = alpha]
    if log is None:
        log = _log_colors(z)
    elif log and not (np.isfinite(z).any() and np.nanmin(z) > 0):
        raise ValueError("log=True needs positive losses")
    x, y = _floats(_field(result, "alphas")), _floats(_field(result, "betas"))
    cbar = _log_colorbar(z, "loss (log scale)") if log else dict(title="loss")
    shown = np.log10(z) if log else z
    if kind == "surface":
        fig = go.Figure(go.Surface(x=x, y=y, z=z.tolist(), surfacecolor=shown.tolist() if log else None,
                                   colorscale="Viridis", colorbar=cbar))
        fig.update_layout(height=420, title=_named(title, name), margin=dict(l=0, r=0, t=50, b=0),
                          scene=dict(xaxis_title="alpha", yaxis_title="beta", zaxis_title="loss",
                                     zaxis_type="log" if log else "linear"))
    else:
        fig = go.Figure(go.Contour(x=x, y=y, z=shown.tolist(), colorscale="Viridis", colorbar=cbar,
                                   contours=dict(showlabels=not log)))
        fig.update_layout(height=420, title=_named(title, name), xaxis_title="alpha", yaxis_title="beta",
                          margin=dict(l=60, r=20, t=50, b=40))
    return fig


def save(fig, path, *, dpi: int = 130):
    """Write a figure of this module to ``path``, atomically, by its extension: ``.html`` (an
    interactive page with plotly.js embedded: opens offline), or ``.png``, ``.pdf``, ``.svg``
    (drawn by :mod:`landscape.plot_static` with matplotlib: no Kaleido or browser needed).

    Args:
        fig: a plotly figure from a builder here (or its ``to_dict()``).
        path: the file to write; its folder must exist.
        dpi: resolution of PNG files.

    Returns:
        The path written (a ``pathlib.Path``).

    Raises:
        ValueError: an extension other than those.

    Example:
        >>> import tempfile, pathlib
        >>> from landscape.plot import plot_density, save
        >>> fig = plot_density({"grid": [0.0, 1.0, 2.0], "density": [0.2, 1.0, 0.2]})
        >>> save(fig, pathlib.Path(tempfile.mkdtemp()) / "density.png").suffix
        '.png'
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "html":
        if isinstance(fig, dict):
            fig = _go().Figure(fig)
        atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    elif fmt in ("png", "pdf", "svg"):
        atomic_write_bytes(path, to_bytes(fig, fmt, dpi=dpi))
    else:
        raise ValueError(f"cannot save a figure as {path.suffix or 'a file without extension'!r}: use .html, .png, "
                         ".pdf or .svg")
    return path


def show(fig, *, dpi: int = 110):
    """Display a figure in a notebook as the interactive plotly figure *and* a static PNG of it
    (drawn with matplotlib), so that it shows where plotly's JavaScript does not run: GitHub's
    notebook viewer, nbconvert's HTML, a notebook opened without trust. Returns nothing."""
    from IPython.display import display  # IPython: only in a notebook
    from plotly.utils import PlotlyJSONEncoder

    bundle = json.loads(json.dumps(fig if isinstance(fig, dict) else fig.to_plotly_json(), cls=PlotlyJSONEncoder))
    display({"application/vnd.plotly.v1+json": {"data": bundle.get("data", []), "layout": bundle.get("layout", {})},
             "image/png": base64.b64encode(to_bytes(fig, "png", dpi=dpi)).decode("ascii"),
             "text/plain": f"<plotly figure: {_title_of(bundle)}>"}, raw=True)


def _title_of(fig: dict) -> str:
    t = (fig.get("layout") or {}).get("title")
    return str((t or {}).get("text", "") if isinstance(t, dict) else (t or ""))


# -- a study: flatness against PTQ degradation -------------------------------------------------------
def _fits_by_key(fits) -> dict:
    """``{(x_name, y_name): FitResult}`` from a mapping or a list of fits (objects or dicts)."""
    out = {}
    for f in (fits.values() if isinstance(fits, dict) else fits or []):
        f = _fit(f)
        out[(f.x_name, f.y_name)] = f
    return out


def plot_sharpness(rows: list[dict], fits, bits: str, variants=None, adjusted: dict | None = None):
    """Accuracy drop at one bit-width against the Hessian trace, the top eigenvalue and Tr(H Sigma):
    one row of panels per PTQ variant, one colour per training method, each panel with its
    least-squares line and 95% confidence band and Spearman's rho (and Kendall's tau) in its title.

    Args:
        rows: a study's summary rows (:func:`landscape.study.summary_rows`): ``model``, ``method``,
            the flatness columns (:func:`measure_column`) and ``acc_drop_<bits><suffix>``.
        fits: :func:`landscape.regress.fit` results (or their dicts), a list or a mapping; a panel
            shows the fit whose ``x_name`` and ``y_name`` are its columns.
        bits: the bit-width, e.g. ``"W4A4"``.
        variants: ``(name, column suffix, ...)`` per PTQ variant (default ``[("rtn", "")]``).
        adjusted: ``{(x, y): Holm-adjusted p-value of Spearman's rho}``, shown next to the raw one.

    Returns:
        A plotly figure; the points' y are the accuracy drops in percent.

    Example:
        >>> rows = [{"model": f"m{i}", "method": "sgd", "trace": t, "top_eigenvalue": 1.0,
        ...          "acc_drop_W4A4": d} for i, (t, d) in enumerate([(1.0, 0.01), (2.0, 0.03)])]
        >>> fig = plot_sharpness(rows, [], "W4A4")
        >>> list(fig.data[0].y)
        [1.0, 3.0]
    """
    from plotly.subplots import make_subplots

    go = _go()
    fits = _fits_by_key(fits)
    adjusted = adjusted or {}
    variants = [tuple(v[:2]) for v in variants] if variants else [("rtn", "")]
    titles = []
    for name, sfx in variants:
        for m, label in MEASURES[:3]:
            key = (measure_column(m, bits), f"acc_drop_{bits}{sfx}")
            f, h = fits.get(key), adjusted.get(key)
            holm_txt = "" if h is None else f", Holm {h:.2g}"
            titles.append(f"{_esc(name)}: {label}" if f is None else
                          f"{_esc(name)}: {label}: rho={f.spearman_rho:.2f} (p={f.spearman_p:.2g}{holm_txt}), "
                          f"tau={f.kendall_tau:.2f}")
    fig = make_subplots(rows=len(variants), cols=3, subplot_titles=titles, horizontal_spacing=0.07,
                        vertical_spacing=0.3 / len(variants))
    methods = sorted({str(r.get("method")) for r in rows})
    for i, (name, sfx) in enumerate(variants, start=1):
        y = f"acc_drop_{bits}{sfx}"
        for j, (m, label) in enumerate(MEASURES[:3], start=1):
            x = measure_column(m, bits)
            legend = i == 1 and j == 1
            f = fits.get((x, y))
            if f is not None:
                grid = np.linspace(min(f.x), max(f.x), 50)
                lo, hi = f.band(grid)
                fig.add_trace(go.Scatter(x=np.r_[grid, grid[::-1]].tolist(), y=(100 * np.r_[hi, lo[::-1]]).tolist(),
                                         fill="toself", fillcolor="rgba(60,60,60,0.12)", line=dict(width=0),
                                         hoverinfo="skip", showlegend=False), row=i, col=j)
                fig.add_trace(go.Scatter(x=grid.tolist(), y=(100 * f.predict(grid)).tolist(), mode="lines",
                                         line=dict(color="#444"), name="least squares, 95% band",
                                         showlegend=legend), row=i, col=j)
            for k, meth in enumerate(methods):  # one colour per method, the same in every panel
                pts = [(r[x], r[y], r["model"]) for r in rows
                       if str(r.get("method")) == meth and r.get(x) is not None and r.get(y) is not None]
                if pts:
                    fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[100 * p[1] for p in pts], mode="markers",
                                             text=[_esc(p[2]) for p in pts], name=_esc(meth), legendgroup=_esc(meth),
                                             hovertemplate="%{text}<br>x=%{x:.4g}<br>y=%{y:.3g}",
                                             marker=dict(size=9, color=_COLORS[k % len(_COLORS)]),
                                             showlegend=legend), row=i, col=j)
            fig.update_xaxes(title_text=label, row=i, col=j)
        fig.update_yaxes(title_text=f"accuracy drop, {_esc(name)} (points)", row=i, col=1)
    fig.update_layout(height=80 + 330 * len(variants), margin=dict(l=60, r=20, t=60, b=50),
                      title=f"accuracy drop at {_esc(bits)} against flatness (test split), per PTQ variant")
    fig.update_annotations(font_size=11)
    return fig


def plot_prediction(rows: list[dict], bits: list[str], fits: dict | None = None):
    """Measured against predicted weight-quantization loss increase, one panel per bit-width (their
    scales differ by orders of magnitude), with the identity line (the theory) and the fit.

    Args:
        rows: summary rows with ``model``, ``predicted_<bits>`` and ``measured_<bits>``.
        bits: the bit-widths, one panel each.
        fits: ``{bits: FitResult or its dict}`` of measured on predicted (optional).

    Returns:
        A plotly figure; per panel the points, the identity line and, with a fit, its line.

    Example:
        >>> rows = [{"model": "a", "predicted_W4A4": 0.1, "measured_W4A4": 0.12},
        ...         {"model": "b", "predicted_W4A4": 0.2, "measured_W4A4": 0.25}]
        >>> list(plot_prediction(rows, ["W4A4"]).data[0].y)
        [0.12, 0.25]
    """
    from plotly.subplots import make_subplots

    go = _go()
    fits = {b: _fit(f) for b, f in (fits or {}).items()}
    titles = []
    for b in bits:
        f = fits.get(b)
        titles.append(_esc(b) if f is None else f"{_esc(b)}: slope {f.slope:.3g} [{f.slope_ci[0]:.3g}, "
                                                f"{f.slope_ci[1]:.3g}], r={f.pearson_r:.2f}")
    fig = make_subplots(rows=1, cols=max(len(bits), 1), subplot_titles=titles, horizontal_spacing=0.07)
    for j, b in enumerate(bits, start=1):
        pts = [(r.get(f"predicted_{b}"), r.get(f"measured_{b}"), r["model"]) for r in rows]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        fig.update_xaxes(title_text="predicted", row=1, col=j)
        if not pts:
            continue
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", showlegend=False,
                                 marker=dict(size=9, color=_COLORS[0]), text=[_esc(p[2]) for p in pts],
                                 hovertemplate="%{text}<br>predicted %{x:.4g}<br>measured %{y:.4g}"), row=1, col=j)
        vals = [v for p in pts for v in p[:2]]
        lo, hi = min(vals), max(vals)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="identity (theory)", showlegend=j == 1,
                                 line=dict(dash="dash", color="black")), row=1, col=j)
        f = fits.get(b)
        if f is not None:
            grid = np.linspace(min(f.x), max(f.x), 20)
            fig.add_trace(go.Scatter(x=grid.tolist(), y=f.predict(grid).tolist(), mode="lines", name="least squares",
                                     showlegend=j == 1, line=dict(color="#d62728")), row=1, col=j)
    fig.update_yaxes(title_text="measured  L(Q(W)) - L(W)", row=1, col=1)
    fig.update_layout(height=400, margin=dict(l=60, r=20, t=70, b=50), title="Second-order prediction of the "
                      "weight-quantization loss increase: g.mu + (mu^T H mu + Tr(H Sigma))/2")
    fig.update_annotations(font_size=11)
    return fig


# -- a study: mixed precision -----------------------------------------------------------------------
def _mean_std(vals) -> tuple[float, float] | None:
    """``(mean, std)`` over seeds (:func:`dnq_landscape_common.stats.seed_stats`); one seed has no
    spread to show, so its error bar is drawn with length 0."""
    s = seed_stats(vals)
    return None if s is None else (s["mean"], 0.0 if s["std"] is None else s["std"])


def _pareto_front(mrows, config, ptq):
    """Uniform line and objective points of one (configuration, PTQ method), means over seeds:
    ``([(bits, (mean, std))], {objective: [(avg bits, (mean, std), budget)]})``."""
    mine = [r for r in mrows if r["config"] == config and r["ptq"] == ptq]
    line = []
    for b in sorted({r["budget"] for r in mine if r["point"] == "uniform"}):
        s = _mean_std([r["test_acc"] for r in mine if r["point"] == "uniform" and r["budget"] == b])
        if s is not None:
            line.append((b, s))
    pts = {}
    for obj in dict.fromkeys(r["point"] for r in mine if r["point"] != "uniform"):
        for budget in sorted({r["budget"] for r in mine if r["point"] == obj}):
            sel = [r for r in mine if r["point"] == obj and r["budget"] == budget]
            s = _mean_std([r["test_acc"] for r in sel])
            if s is not None:
                pts.setdefault(obj, []).append((statistics.mean(r["avg_bits"] for r in sel), s, budget))
    return line, pts


def plot_pareto(mrows: list[dict], cfg: dict, ptq: str, config=None):
    """Test accuracy against average weight bits for one PTQ method: the uniform bit-widths as a
    line, each objective's allocations as points (mean ± std over seeds, in percent).

    Args:
        mrows: :func:`landscape.report_mixed.mixed_rows` (``config``, ``ptq``, ``point``,
            ``budget``, ``avg_bits``, ``test_acc``, ...).
        cfg: the study's configuration (``mixed.abits`` is named in the title).
        ptq: the PTQ method.
        config: one training configuration; ``None`` overlays every configuration's front (one
            colour each).

    Returns:
        A plotly figure, or ``None`` when there is nothing to draw.

    Example:
        >>> rows = [{"config": "sgd", "ptq": "rtn", "point": p, "budget": b, "avg_bits": b, "test_acc": a}
        ...         for p, b, a in [("uniform", 2.0, 0.5), ("uniform", 4.0, 0.9), ("hawq", 3.0, 0.8)]]
        >>> fig = plot_pareto(rows, {"mixed": {"abits": 4}}, "rtn", config="sgd")
        >>> list(fig.data[0].y), list(fig.data[1].y)
        ([50.0, 90.0], [80.0])
    """
    go = _go()
    overlay = config is None
    fig = go.Figure()
    for ci, c in enumerate(dict.fromkeys(r["config"] for r in mrows)):
        if not overlay and c != config:
            continue
        line, pts = _pareto_front(mrows, c, ptq)
        color = _COLORS[ci % len(_COLORS)]
        if line:
            fig.add_trace(go.Scatter(
                x=[b for b, _ in line], y=[100 * s[0] for _, s in line], mode="lines+markers",
                name=f"{_esc(c)}: uniform" if overlay else "uniform", line=dict(color=color),
                error_y=dict(type="data", array=[100 * s[1] for _, s in line], visible=True)))
        for obj, ps in pts.items():
            fig.add_trace(go.Scatter(
                x=[p[0] for p in ps], y=[100 * p[1][0] for p in ps], mode="markers",
                name=f"{_esc(c)}: {_esc(obj)}" if overlay else _esc(obj),
                marker=dict(symbol=_SYMBOLS.get(obj, "circle"), size=10, color=color if overlay else None),
                error_y=dict(type="data", array=[100 * p[1][1] for p in ps], visible=True),
                text=[f"budget {p[2]:g}" for p in ps]))
    if not fig.data:
        return None
    title = (f"All training configurations, {_esc(ptq)}: does a training method move the front?" if overlay else
             f"{_esc(config)}, {_esc(ptq)}: test accuracy vs average weight bits "
             f"(A{_esc((cfg.get('mixed') or {}).get('abits'))})")
    fig.update_layout(height=380 if overlay else 340, title=title,
                      xaxis_title="average weight bits (allocated layers)", yaxis_title="test accuracy (%)",
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig


def plot_mixed_bits(record: dict, cfg: dict):
    """Per model: the weight bits chosen per layer for every (PTQ method, budget, objective), above
    the layer sensitivities at the lowest candidate bit-width (a log axis when all are positive).

    Args:
        record: a study's model record (its ``sensitivity:*`` and ``mixed+*`` measurements).
        cfg: the study's configuration (``mixed.methods``, ``budgets``, ``objectives``, ``kind``).

    Returns:
        A plotly figure (bars on top, sensitivity lines below), or ``None`` without mixed results.

    Example:
        >>> sens = {"layers": [{"name": "3", "order": 0}, {"name": "7", "order": 1}], "bits": [2, 4],
        ...         "hawq": {"3": {"2": 0.5, "4": 0.1}, "7": {"2": 0.2, "4": 0.05}}}
        >>> alloc = {"bits": {"3": 4, "7": 2}, "fixed": {}}
        >>> rec = {"id": "m0", "measurements": {"sensitivity:minmax": {"value": sens},
        ...        "mixed+rtn:avg-bits=3:hawq": {"value": {"allocation": alloc}}}}
        >>> cfg = {"mixed": {"methods": ["rtn"], "budgets": [3.0], "objectives": ["hawq"], "kind": "avg-bits"}}
        >>> fig = plot_mixed_bits(rec, cfg)
        >>> list(fig.data[0].y), list(fig.data[1].y)
        ([4, 2], [0.5, 0.2])
    """
    from plotly.subplots import make_subplots

    go = _go()
    m = cfg.get("mixed") or {}
    meas = record.get("measurements", {})
    sens = next((v["value"] for k, v in meas.items() if k.startswith("sensitivity:")), None)
    allocs = [(ptq, budget, obj, meas[name]["value"]["allocation"])
              for ptq in m.get("methods", []) for budget in m.get("budgets", []) for obj in m.get("objectives", [])
              if (name := mixed_measurement(ptq, budget, obj, m.get("kind", "avg-bits"))) in meas]
    if sens is None or not allocs:
        return None
    layers = [d["name"] for d in sorted(sens["layers"], key=lambda d: d["order"])]
    b0 = min(sens["bits"])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("weight bits chosen (first/last fixed)",
                                        f"sensitivity at W{b0} (loss increase; measured can be negative)"))
    for ptq, budget, obj, a in allocs:
        bits = {**a["fixed"], **a["bits"]}
        fig.add_trace(go.Bar(x=[_esc(n) for n in layers], y=[bits.get(n) for n in layers],
                             name=f"{_esc(ptq)} {budget:g} {_esc(obj)}"), row=1, col=1)
    shown = []
    for obj in ("predicted", "hawq", "measured"):
        if obj in sens:
            vals = [sens[obj][n].get(b0, sens[obj][n].get(str(b0))) for n in layers]
            shown += [v for v in vals if v is not None]
            fig.add_trace(go.Scatter(x=[_esc(n) for n in layers], y=vals, mode="lines+markers",
                                     name=f"{obj} at W{b0}", marker=dict(symbol=_SYMBOLS.get(obj, "circle"))),
                          row=2, col=1)
    if shown and min(shown) > 0:
        fig.update_yaxes(type="log", row=2, col=1)
    fig.update_yaxes(title_text="weight bits", row=1, col=1)
    fig.update_layout(height=560, barmode="group", margin=dict(l=60, r=20, t=60, b=80),
                      title=f"Mixed precision: {_esc(record.get('name', record['id']))}")
    return fig
