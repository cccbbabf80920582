"""Static copies (PNG, PDF) of the plotly figures of :mod:`landscape.plot`, drawn with matplotlib.

The report shows the plotly figures in its HTML; papers want files. This module draws the *same*
figure objects (or their ``fig.to_dict()`` form), so that no figure is written twice, and nothing
but the report's static export uses it. It draws what the builders use: scatter traces (lines,
markers, error bars, ``fill="toself"`` bands), histograms, grouped bars on categorical axes,
contours and heatmaps, 3-D surfaces (as a filled contour of the same grid), subplot grids with
their titles, shared axes, a second y axis (``overlaying``), log axes, vertical and horizontal
lines and text annotations. Anything else raises ``ValueError`` instead of being left out.

Why matplotlib and not plotly's own export (kaleido): kaleido drives a Chrome or Chromium that
must be installed (kaleido 1.x no longer ships one and offers to download it), starts a browser
for every export, and its page loads MathJax from a CDN unless told not to; matplotlib is already
a dependency and draws offline everywhere.

Example:
    >>> from landscape.plot import plot_density
    >>> from landscape.plot_static import to_bytes
    >>> to_bytes(plot_density({"grid": [0.0, 1.0, 2.0], "density": [0.2, 1.0, 0.2]}), "png")[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import html
import io
import math
import re
import textwrap
from pathlib import Path

import numpy as np

from dnq_landscape_common.io import atomic_write_bytes

_SYMBOL = {"circle": "o", "diamond": "D", "square": "s", "triangle-up": "^", "triangle-down": "v", "x": "x",
           "cross": "P", "star": "*"}
_DASH = {None: "-", "solid": "-", "dash": "--", "dot": ":", "dashdot": "-.", "longdash": "--"}
_COLORWAY = ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880", "#FF97FF",
             "#FECB52"]  # plotly's default
_RC = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
       "ytick.labelsize": 7, "figure.titlesize": 9}


def _text(s) -> str:
    """A plotly label as plain text: ``<br>`` a new line, other tags dropped, entities decoded,
    ``$`` kept literal (not matplotlib's math)."""
    if s is None:
        return ""
    s = re.sub(r"<br\s*/?>", "\n", str(s), flags=re.I)
    return html.unescape(re.sub(r"<[^>]*>", "", s)).replace("$", r"\$")


def _title(obj) -> str:
    return _text(obj.get("text") if isinstance(obj, dict) else obj)


def _wrap(s: str, width_in: float) -> str:
    chars = max(int(width_in * 14), 20)
    return "\n".join(textwrap.fill(line, chars) for line in s.split("\n"))


def _color(c):
    """A plotly colour (name, ``#rrggbb``, ``rgb(...)`` or ``rgba(...)``) for matplotlib."""
    if c is None:
        return None
    if not isinstance(c, str):
        raise ValueError(f"per-point colours are not supported by the static export, got {type(c).__name__}")
    m = re.fullmatch(r"\s*rgba?\(([^)]*)\)\s*", c)
    if m:
        v = [float(t) for t in m[1].split(",")]
        return (v[0] / 255, v[1] / 255, v[2] / 255, v[3] if len(v) > 3 else 1.0)
    return c


def _cmap(scale):
    import matplotlib

    if scale is None:
        return matplotlib.colormaps["plasma"]
    if isinstance(scale, str):
        name = scale.lower().removesuffix("_r")
        cmap = matplotlib.colormaps[name if name in matplotlib.colormaps else "viridis"]
        return cmap.reversed() if scale.endswith("_r") else cmap
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("plotly", [(float(p), _color(c)) for p, c in scale])


def _axis_key(ref: str) -> str:
    """``"x2"`` -> ``"xaxis2"``."""
    return ref[0] + "axis" + ref[1:]


def _dom(d, default=(0.0, 1.0)) -> tuple:
    return tuple(round(float(v), 4) for v in (d or default))


def _as_dict(fig) -> dict:
    return fig if isinstance(fig, dict) else fig.to_dict()


class _Panel:
    def __init__(self, x: str, y: str, xdom: tuple, ydom: tuple, scene: str | None = None):
        self.x, self.y, self.xdom, self.ydom, self.scene = x, y, xdom, ydom, scene
        self.ax = None
        self.twins: dict = {}  # y id -> matplotlib axes (overlaying y axes)


def _panels(fig: dict) -> tuple[list[_Panel], dict]:
    """The figure's subplots from its axes' domains: ``(panels, {y id: base y id})``."""
    layout, data = fig.get("layout", {}), fig.get("data", [])
    cartesian = [t for t in data if t.get("type", "scatter") not in ("surface",)]
    scenes = list(dict.fromkeys(t.get("scene", "scene") for t in data if t.get("type") == "surface"))
    ys = [k for k in layout if re.fullmatch(r"yaxis\d*", k)] if cartesian or not scenes else []
    ys = list(dict.fromkeys(["yaxis" + t.get("yaxis", "y")[1:] for t in cartesian] + ys))
    base, panels = {}, []
    for yk in ys:
        yid, ya = "y" + yk[5:], layout.get(yk, {})
        if ya.get("overlaying"):
            base[yid] = ya["overlaying"]
            continue
        base[yid] = yid
        xid = ya.get("anchor") if str(ya.get("anchor", "")).startswith("x") else "x" + yid[1:]
        panels.append(_Panel(xid, yid, _dom(layout.get(_axis_key(xid), {}).get("domain")), _dom(ya.get("domain"))))
    for s in scenes:
        d = layout.get(s, {}).get("domain", {})
        panels.append(_Panel("", "", _dom(d.get("x")), _dom(d.get("y")), scene=s))
    if not panels:  # an empty figure: one empty panel
        panels, base = [_Panel("x", "y", (0.0, 1.0), (0.0, 1.0))], {"y": "y"}
    return panels, base


def _categories(fig: dict) -> dict:
    """Categorical x axes: ``{x id: [category, ...]}`` (axes tied by ``matches`` share one list)."""
    layout, data = fig.get("layout", {}), fig.get("data", [])

    def root(xid):
        seen = set()
        while (m := layout.get(_axis_key(xid), {}).get("matches")) and xid not in seen:
            seen.add(xid)
            xid = m
        return xid

    cats: dict = {}
    for t in data:
        xs = t.get("x")
        if xs is not None and any(isinstance(v, str) for v in xs):
            cats.setdefault(root(t.get("xaxis", "x")), []).extend(xs)
    cats = {k: list(dict.fromkeys(v)) for k, v in cats.items()}
    xids = {t.get("xaxis", "x") for t in data} | {"x" + k[5:] for k in layout if re.fullmatch(r"xaxis\d*", k)}
    return {xid: cats[root(xid)] for xid in xids if root(xid) in cats}


def _xy(t: dict, cats: dict):
    y = np.asarray([np.nan if v is None else v for v in t.get("y", [])], dtype=float)
    x = t.get("x")
    if x is None:
        return np.arange(len(y), dtype=float), y
    cat = cats.get(t.get("xaxis", "x"))
    if cat is not None:
        return np.array([cat.index(v) for v in x], dtype=float), y
    return np.asarray([np.nan if v is None else v for v in x], dtype=float), y


def _label(t: dict) -> str:
    name = t.get("name")
    return _text(name) if name and t.get("showlegend") is not False else "_nolegend_"


def _scatter(ax, t: dict, cats: dict, default: str) -> None:
    x, y = _xy(t, cats)
    line, marker = t.get("line") or {}, t.get("marker") or {}
    alpha = t.get("opacity")
    if t.get("fill") not in (None, "none"):
        if t["fill"] != "toself":
            raise ValueError(f"scatter fill={t['fill']!r} is not supported by the static export")
        width = line.get("width", 2)
        ax.fill(x, y, facecolor=_color(t.get("fillcolor") or line.get("color")), alpha=alpha,
                edgecolor=_color(line.get("color")) if width else "none", linewidth=0.75 * width, label=_label(t))
        return
    mode = t.get("mode") or ("lines+markers" if len(y) < 20 else "lines")
    lines = "lines" in mode and line.get("width", 2) != 0
    markers = "markers" in mode
    color = _color((line.get("color") if lines and line.get("color") else marker.get("color") or line.get("color"))
                   or default)
    kw = dict(color=color, alpha=alpha, label=_label(t), linewidth=0.75 * line.get("width", 2),
              linestyle=_DASH.get(line.get("dash"), "-") if lines else "none",
              marker=_SYMBOL.get(marker.get("symbol"), "o") if markers else None,
              markersize=0.65 * marker.get("size", 6))
    err = t.get("error_y") or {}
    if err.get("array") is not None and err.get("visible", True) is not False:
        yerr = np.asarray([np.nan if v is None else v for v in err["array"]], dtype=float)
        ax.errorbar(x, y, yerr=yerr, capsize=2, elinewidth=0.8, **kw)
    elif lines or markers:
        ax.plot(x, y, **kw)


def _bars(ax, bars: list[tuple[dict, str]], cats: dict, barmode: str) -> None:
    if barmode not in (None, "group"):
        raise ValueError(f"barmode={barmode!r} is not supported by the static export")
    n = len(bars)
    for j, (t, default) in enumerate(bars):
        x, y = _xy(t, cats)
        step = np.min(np.diff(np.unique(x))) if len(np.unique(x)) > 1 else 1.0
        w = 0.8 * step / n
        ax.bar(x + (j - (n - 1) / 2) * w, y, w, label=_label(t), alpha=t.get("opacity"),
               color=_color((t.get("marker") or {}).get("color") or default))


def kind_of(t: dict) -> str:
    return t.get("type", "scatter")


def _grid_trace(fig, ax, t: dict, scene: dict | None) -> None:
    """Contour, heatmap or (as a filled contour) surface on ``ax``."""
    colors = t.get("surfacecolor") if kind_of(t) == "surface" and t.get("surfacecolor") is not None else t["z"]
    z = np.ma.masked_invalid(np.asarray([[np.nan if v is None else v for v in row] for row in colors], dtype=float))
    x = np.arange(z.shape[1]) if t.get("x") is None else np.asarray(t["x"], dtype=float)
    y = np.arange(z.shape[0]) if t.get("y") is None else np.asarray(t["y"], dtype=float)
    cmap, kind = _cmap(t.get("colorscale")), t.get("type")
    if z.mask.all() or min(z.shape) < 2:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        return
    contours = t.get("contours") or {}
    if kind == "heatmap" or contours.get("coloring") == "heatmap":
        mappable = ax.pcolormesh(x, y, z, shading="auto", cmap=cmap)
    elif contours.get("coloring") == "lines":
        mappable = ax.contour(x, y, z, levels=t.get("ncontours") or 15, cmap=cmap)
    else:
        mappable = ax.contourf(x, y, z, levels=t.get("ncontours") or 20, cmap=cmap)
    if kind == "contour" and contours.get("showlabels"):
        ax.clabel(ax.contour(x, y, z, levels=10, colors="k", linewidths=0.4), fontsize=6)
    if t.get("showscale", True) is not False:
        cb = t.get("colorbar") or {}
        label = _title(cb.get("title")) or (_title(((scene or {}).get("zaxis") or {}).get("title"))
                                            if kind == "surface" else "")
        bar = fig.colorbar(mappable, ax=ax, label=label)
        if cb.get("tickvals") is not None:  # e.g. log10 colours labelled with the values themselves
            bar.set_ticks(list(cb["tickvals"]), labels=[_text(v) for v in cb.get("ticktext") or cb["tickvals"]])
    if kind == "surface":
        ax.set_xlabel(_title(((scene or {}).get("xaxis") or {}).get("title")))
        ax.set_ylabel(_title(((scene or {}).get("yaxis") or {}).get("title")))


def _shape(ax, s: dict) -> None:
    if s.get("type") != "line":
        raise ValueError(f"shape type {s.get('type')!r} is not supported by the static export")
    line = s.get("line") or {}
    kw = dict(color=_color(line.get("color")) or "0.3", linestyle=_DASH.get(line.get("dash"), "-"),
              linewidth=0.75 * line.get("width", 2))
    xref, yref = str(s.get("xref", "x")), str(s.get("yref", "y"))
    frac_y, frac_x = yref.endswith("domain") or yref == "paper", xref.endswith("domain") or xref == "paper"
    if frac_y and not frac_x and s.get("x0") == s.get("x1"):
        ax.axvline(s["x0"], ymin=s.get("y0", 0), ymax=s.get("y1", 1), **kw)
    elif frac_x and not frac_y and s.get("y0") == s.get("y1"):
        ax.axhline(s["y0"], xmin=s.get("x0", 0), xmax=s.get("x1", 1), **kw)
    elif not frac_x and not frac_y:
        ax.plot([s["x0"], s["x1"]], [s["y0"], s["y1"]], **kw)
    else:
        raise ValueError(f"a line shape with xref={xref!r}, yref={yref!r} is not supported by the static export")


def _draw(fig: dict, target, width_in: float) -> None:
    """Draw one plotly figure (dict form) into a matplotlib Figure or SubFigure."""
    layout, data = fig.get("layout", {}), fig.get("data", [])
    known = {"scatter", "scattergl", "histogram", "bar", "contour", "heatmap", "surface"}
    for t in data:
        if t.get("type", "scatter") not in known:
            raise ValueError(f"trace type {t.get('type')!r} is not supported by the static export")
    panels, base = _panels(fig)
    cols = sorted({p.xdom for p in panels})
    rows = sorted({p.ydom for p in panels}, key=lambda d: -d[0])
    gs = target.add_gridspec(max(len(rows), 1), max(len(cols), 1))
    by_y, by_x = {}, {}
    for p in panels:
        p.ax = target.add_subplot(gs[rows.index(p.ydom), cols.index(p.xdom)])
        if p.scene is None:
            by_y[p.y] = p
            by_x.setdefault(p.x, p)
    for p in panels:  # shared axes (make_subplots' shared_xaxes / shared_yaxes)
        for ref, get, share in ((p.x, by_x, "sharex"), (p.y, by_y, "sharey")):
            m = layout.get(_axis_key(ref), {}).get("matches") if ref else None
            if m and m in get and get[m] is not p:
                getattr(p.ax, share)(get[m].ax)
    cats = _categories(fig)
    _draw_traces(target, layout, data, panels, base, by_y, cats)
    for p in panels:
        if p.scene is None:
            _format_axes(p, layout, cats)
    for s in layout.get("shapes") or []:
        xid = str(s.get("xref", "x")).split()[0]
        yid = str(s.get("yref", "y")).split()[0]
        p = by_x.get(xid) or by_y.get(base.get(yid, yid)) or panels[0]
        _shape(p.ax, s)
    panel_w = width_in / max(len(cols), 1)
    for a in layout.get("annotations") or []:
        _annotate(target, a, panels, by_x, by_y, panel_w)
    _legends(layout, data, panels)
    title = _title(layout.get("title"))
    if title:
        target.suptitle(_wrap(title, width_in))


def _draw_traces(target, layout: dict, data: list, panels: list, base: dict, by_y: dict, cats: dict) -> None:
    """Every trace on its panel's axes (or a twin y axis)."""

    def axes_of(t):
        if t.get("type") == "surface":
            return next(p for p in panels if p.scene == t.get("scene", "scene")).ax
        yid = t.get("yaxis", "y")
        p = by_y[base.get(yid, yid)]
        if base.get(yid, yid) == yid:
            return p.ax
        if yid not in p.twins:
            p.twins[yid] = p.ax.twinx()
        return p.twins[yid]

    colorway = ((layout.get("template") or {}).get("layout") or {}).get("colorway") or _COLORWAY
    bars: dict = {}
    for i, t in enumerate(data):  # plotly colours a trace without a colour by its index
        kind, default = t.get("type", "scatter"), colorway[i % len(colorway)]
        ax = axes_of(t)
        if kind in ("scatter", "scattergl"):
            _scatter(ax, t, cats, default)
        elif kind == "histogram":
            ax.hist(np.asarray(t.get("x"), dtype=float), bins=t.get("nbinsx") or "auto", label=_label(t),
                    color=_color((t.get("marker") or {}).get("color") or default), alpha=t.get("opacity"))
        elif kind == "bar":
            bars.setdefault(ax, []).append((t, default))
        else:
            _grid_trace(target, ax, t, layout.get(t.get("scene", "scene")) if kind == "surface" else None)
    for ax, ts in bars.items():
        _bars(ax, ts, cats, layout.get("barmode"))


def _format_axes(p, layout: dict, cats: dict) -> None:
    """A 2-D panel's titles, categories, scales, ticks, and its twin axes."""
    xa, ya = layout.get(_axis_key(p.x), {}), layout.get(_axis_key(p.y), {})
    p.ax.set_xlabel(_title(xa.get("title")))
    p.ax.set_ylabel(_title(ya.get("title")))
    if p.x in cats:
        cat = cats[p.x]
        p.ax.set_xticks(range(len(cat)))
        long = len(cat) > 4 or any(len(str(c)) > 6 for c in cat)
        p.ax.set_xticklabels([_text(c) for c in cat], rotation=90 if long else 0)
    for axis, name, setter in ((xa, "x", p.ax.set_xscale), (ya, "y", p.ax.set_yscale)):
        if axis.get("type") == "log":
            setter("log", nonpositive="mask")
        elif axis.get("tickmode") == "linear" and axis.get("dtick"):  # e.g. integer ticks on an index axis
            from matplotlib.ticker import MultipleLocator

            loc = MultipleLocator(float(axis["dtick"]), offset=float(axis.get("tick0", 0)))
            (p.ax.xaxis if name == "x" else p.ax.yaxis).set_major_locator(loc)
        if axis.get("showticklabels") is False:
            p.ax.tick_params(axis=name, **{"labelbottom" if name == "x" else "labelleft": False})
    for yid, tax in p.twins.items():
        ta = layout.get(_axis_key(yid), {})
        tax.set_ylabel(_title(ta.get("title")))
        if ta.get("type") == "log":
            tax.set_yscale("log", nonpositive="mask")


def _annotate(target, a: dict, panels: list, by_x: dict, by_y: dict, panel_w: float) -> None:
    """One annotation: a subplot title on its panel's top, or a text anchored in data or domain units."""
    from matplotlib import transforms

    text = _text(a.get("text"))
    xref, yref = str(a.get("xref", "paper")), str(a.get("yref", "paper"))
    if xref == "paper" and yref == "paper":  # make_subplots' subplot titles sit on their panel's top
        p = next((p for p in panels if abs((p.xdom[0] + p.xdom[1]) / 2 - a.get("x", -1)) < 0.01
                  and abs(p.ydom[1] - a.get("y", -1)) < 0.02), None)
        if p is not None:
            p.ax.set_title(_wrap(text, panel_w))
        else:
            target.text(a.get("x", 0.5), a.get("y", 0.5), text, ha="center", va="center")
        return
    p = by_x.get(xref.split()[0]) or by_y.get(yref.split()[0]) or panels[0]
    tr = transforms.blended_transform_factory(p.ax.transAxes if "domain" in xref else p.ax.transData,
                                              p.ax.transAxes if "domain" in yref or yref == "paper"
                                              else p.ax.transData)
    ha = {"left": "left", "right": "right", "center": "center"}.get(a.get("xanchor"), "left")
    va = {"top": "top", "bottom": "bottom", "middle": "center"}.get(a.get("yanchor"), "top")
    p.ax.annotate(text, (a.get("x", 0), a.get("y", 1)), xycoords=tr, fontsize=7, ha=ha, va=va,
                  xytext=(0.75 * a.get("xshift", 0), 0.75 * a.get("yshift", 0)), textcoords="offset points",
                  bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7)
                  if a.get("bgcolor") else None)


def _legends(layout: dict, data: list, panels: list) -> None:
    """A legend per panel (on its top-most axes) when the figure shows one."""
    entries = [t for t in data if _label(t) != "_nolegend_"]
    if layout.get("showlegend") is not False and (len(entries) > 1 or layout.get("showlegend")):
        for p in panels:
            handles, labels = [], []
            for ax in (p.ax, *p.twins.values()):
                h, lab = ax.get_legend_handles_labels()
                handles += h
                labels += lab
            if handles:  # on the top-most axes, so that no line is drawn over it
                top = list(p.twins.values())[-1] if p.twins else p.ax
                if len(handles) <= 12:
                    top.legend(handles, labels, fontsize=6 if len(handles) > 6 else 7)
                else:  # a long legend goes right of the axes (the layout makes room for it)
                    top.legend(handles, labels, fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                               ncols=math.ceil(len(handles) / 24))


def _size(fig: dict) -> tuple[float, float]:
    panels, _ = _panels(fig)
    ncols = max(len({p.xdom for p in panels}), 1)
    nrows = max(len({p.ydom for p in panels}), 1)
    layout = fig.get("layout", {})
    width = layout.get("width", 100 * max(6.0, 4.3 * ncols)) / 100
    height = max(layout.get("height", 420) / 100, 2.8 * nrows + 0.6)
    return width, height


def render(figs, *, ncols: int = 3):
    """A matplotlib figure of one plotly figure, or of several side by side (``ncols`` per row).

    Args:
        figs: a plotly figure, its ``to_dict()``, or a list of either.
        ncols: figures per row when there are several.

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot: nothing to close).

    Raises:
        ValueError: a trace type, fill, bar mode or shape the export does not draw.
    """
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    figs = [_as_dict(f) for f in (figs if isinstance(figs, (list, tuple)) else [figs])]
    if not figs:
        raise ValueError("render: no figure given")
    ncols = min(ncols, len(figs))
    nrows = math.ceil(len(figs) / ncols)
    sizes = [_size(f) for f in figs]
    w = max(s[0] for s in sizes) if len(figs) == 1 else max(min(s[0], 6.0) for s in sizes)
    h = max(s[1] for s in sizes)
    with rc_context(_RC):
        out = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
        if len(figs) == 1:
            _draw(figs[0], out, w)
        else:
            subs = out.subfigures(nrows, ncols, squeeze=False)
            for i, f in enumerate(figs):
                _draw(f, subs[i // ncols][i % ncols], w)
    return out


def _bytes(fig, fmt: str, dpi: int) -> bytes:
    from matplotlib import rc_context

    buf = io.BytesIO()
    with rc_context(_RC):  # tick labels are made when drawn
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def to_bytes(figs, fmt: str = "png", *, dpi: int = 130) -> bytes:
    """The PNG or PDF (any format matplotlib writes) of :func:`render`'s figure."""
    return _bytes(render(figs), fmt, dpi)


def save(figs, stem, formats=("png", "pdf"), *, dpi: int = 130) -> list[Path]:
    """Render once and write ``<stem>.<format>`` for each format, each atomically.

    Args:
        figs: as for :func:`render`.
        stem: the path without its extension (``figures/model_a`` writes ``figures/model_a.png``).
        formats: the file formats.
        dpi: resolution of the raster formats.

    Returns:
        The files written.
    """
    fig, out = render(figs), []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        atomic_write_bytes(path, _bytes(fig, fmt, dpi))
        out.append(path)
    return out
