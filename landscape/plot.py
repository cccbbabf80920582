"""Plotly figures for the instruments' results (for notebooks; ``fig.show()``).

Each helper takes a result object and returns a ``plotly.graph_objects.Figure``.
"""

from __future__ import annotations

import numpy as np


def _go():
    import plotly.graph_objects as go

    return go


def plot_trace(result, title: str = "Hutchinson samples"):
    """Histogram of the per-probe quadratic forms with the estimate and its standard error."""
    go = _go()
    fig = go.Figure(go.Histogram(x=list(result.samples), name="probes", nbinsx=30))
    fig.add_vline(x=result.value, line_dash="dash",
                  annotation_text=f"{result.method}: {result.value:.4g} +- {result.std_error:.2g}")
    fig.update_layout(title=title, xaxis_title="z^T H z", yaxis_title="count")
    return fig


def plot_eigenvalues(result, title: str = "Top eigenvalues"):
    """Eigenvalues with their residual norms as error bars."""
    go = _go()
    idx = list(range(1, len(result.eigenvalues) + 1))
    fig = go.Figure(go.Scatter(x=idx, y=result.eigenvalues, mode="markers",
                               error_y=dict(type="data", array=result.residual_norms, visible=True)))
    fig.update_layout(title=f"{title} ({result.method}, {result.num_matvecs} matvecs)", xaxis_title="index",
                      yaxis_title="eigenvalue")
    return fig


def plot_density(result, log: bool = True, title: str = "Hessian spectral density (SLQ)"):
    """The broadened density on its grid (log scale by default, as in Ghorbani et al.)."""
    go = _go()
    y = np.asarray(result.density)
    fig = go.Figure(go.Scatter(x=np.asarray(result.grid), y=np.maximum(y, 1e-12) if log else y, mode="lines"))
    fig.update_layout(title=title, xaxis_title="eigenvalue", yaxis_title="density", yaxis_type="log" if log else "linear")
    return fig


def plot_surface_1d(result, mark: float | None = None, title: str = "Loss along a direction"):
    """Loss (and accuracy, on a second axis) along the line; ``mark`` draws a vertical line
    (e.g. alpha = 1 for the quantized weights)."""
    go = _go()
    fig = go.Figure(go.Scatter(x=result.alphas, y=result.loss, name="loss", mode="lines+markers"))
    if not np.isnan(result.accuracy).all():
        fig.add_trace(go.Scatter(x=result.alphas, y=result.accuracy, name="accuracy", yaxis="y2", mode="lines"))
        fig.update_layout(yaxis2=dict(title="accuracy", overlaying="y", side="right"))
    if mark is not None:
        fig.add_vline(x=mark, line_dash="dot")
    fig.update_layout(title=title, xaxis_title="alpha", yaxis_title="loss")
    return fig


def plot_surface_2d(result, kind: str = "surface", title: str = "Loss surface"):
    """``kind="surface"`` (interactive 3D) or ``"contour"``. Rows of ``result.loss`` are alpha."""
    if kind not in ("surface", "contour"):
        raise ValueError(f"kind must be 'surface' or 'contour', got {kind!r}")
    go = _go()
    z = np.asarray(result.loss).T  # plotly: z[row=y][col=x]
    trace = (go.Surface(x=result.alphas, y=result.betas, z=z) if kind == "surface"
             else go.Contour(x=result.alphas, y=result.betas, z=z, contours_coloring="lines"))
    fig = go.Figure(trace)
    fig.update_layout(title=title, xaxis_title="alpha", yaxis_title="beta")
    return fig
