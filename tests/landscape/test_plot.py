"""Figures a user saves and reads: reachable from ``import landscape``, saved without Kaleido,
colour scales that show a basin spanning decades, integer ticks on index axes, nothing clipped."""

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def test_plot_is_reachable_after_import_landscape():
    code = "import landscape; print(landscape.plot.plot_density.__name__, landscape.regress.__name__)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ["plot_density", "landscape.regress"], p.stderr


def test_save_writes_png_pdf_svg_and_offline_html_without_kaleido(tmp_path, monkeypatch):
    import landscape

    monkeypatch.setitem(sys.modules, "kaleido", None)  # as on a machine without it: an import raises
    fig = landscape.plot.plot_density({"grid": [0.0, 1.0, 2.0], "density": [0.2, 1.0, 0.2]})
    heads = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for fmt, head in heads.items():
        path = landscape.plot.save(fig, tmp_path / f"d.{fmt}")
        assert path.read_bytes().startswith(head), fmt
    html = landscape.plot.save(fig, tmp_path / "d.html").read_text()
    assert "<html>" in html and "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js embedded
    assert 'src="http' not in html  # nothing fetched from the network
    with pytest.raises(ValueError, match="use .html, .png, .pdf or .svg"):
        landscape.plot.save(fig, tmp_path / "d.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.html", "d.pdf", "d.png", "d.svg"]  # no temp files


def _basin(low=2.3, high=270.0):
    g = np.linspace(-1, 1, 11)
    a, b = np.meshgrid(g, g, indexing="ij")
    return {"alphas": g, "betas": g, "loss": low + (high - low) * (a ** 2 + b ** 2) / 2}


@pytest.mark.parametrize("kind", ["contour", "surface"])
def test_surfaces_get_a_colorbar_and_a_log_scale_when_the_loss_spans_decades(kind):
    from landscape.plot import plot_surface_2d
    from landscape.plot_static import render

    wide = plot_surface_2d(_basin(), kind=kind)
    t = wide.data[0]
    assert t.showscale is not False and "log" in t.colorbar.title.text
    colors = np.array(t.z if kind == "contour" else t.surfacecolor, dtype=float)
    assert np.nanmax(colors) == pytest.approx(np.log10(270.0)) and np.nanmin(colors) == pytest.approx(np.log10(2.3))
    labels = [float(v) for v in t.colorbar.ticktext]
    assert np.allclose(np.log10(labels), t.colorbar.tickvals)  # ticks read as losses
    narrow = plot_surface_2d(_basin(1.0, 3.0), kind=kind).data[0]  # within a decade: linear
    assert narrow.colorbar.title.text == "loss" and narrow.colorbar.tickvals is None
    # the static copy draws the colorbar with the same tick labels
    mfig = render(wide)
    bars = [ax for ax in mfig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    shown = [tick.get_text() for tick in bars[0].get_yticklabels()]
    assert "10" in shown and "100" in shown


def test_eigenvalue_index_ticks_are_integers_and_the_trace_label_is_not_clipped():
    from landscape.plot import plot_eigenvalues, plot_trace
    from landscape.plot_static import render

    fig = render(plot_eigenvalues({"eigenvalues": [9.0, 5.0, 4.0], "residual_norms": [0.1, 0.2, 0.3],
                                   "method": "lanczos", "num_matvecs": 20}))
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks == [1.0, 2.0, 3.0]
    rng = np.random.default_rng(0)
    fig = render(plot_trace({"samples": rng.normal(100, 30, 64).tolist(), "value": 100.0, "std_error": 3.7,
                             "method": "hutch++"}))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    label = next(t for t in ax.texts if "hutch++" in t.get_text())
    box, frame = label.get_window_extent(canvas.get_renderer()), ax.get_window_extent(canvas.get_renderer())
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
