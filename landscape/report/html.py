"""The report's HTML and CSV building blocks: escaping, JSON for ``<script>``, CSV cells safe from
formula injection, number formatting, tables, and the page's CSS and scripts.

Example:
    >>> from landscape.report.html import csv_cell, table
    >>> csv_cell("=1+1"), csv_cell(-3.5)
    ("'=1+1", -3.5)
    >>> page = table([{"model": "<a>", "acc": 0.98765}], [("model", "model"), ("acc", "test acc")], left={"model"})
    >>> page.split("<tbody>")[1]
    "<tr><td class='l'>&lt;a&gt;</td><td class=''>0.9877</td></tr></tbody></table>"
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from dnq_landscape_common.html import esc
from dnq_landscape_common.io import atomic_write_text

__all__ = ["CSS", "RENDER_JS", "STATUS_JS", "csv_cell", "csv_rows", "esc", "fmt", "json_default", "script_json",
           "table", "write_csv"]


def script_json(obj) -> str:
    s = json.dumps(obj, default=json_default)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def json_default(o):
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


def csv_rows(rows: list[dict]) -> list[dict]:
    return [{k: csv_cell(v) for k, v in r.items()} for r in rows]


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None, **kwargs) -> None:
    """``rows`` as a CSV file (atomically), every text cell through :func:`csv_cell`; the columns
    are ``fieldnames`` or every key in the order met; no row writes a header only."""
    buf = io.StringIO()
    cols = fieldnames if fieldnames is not None else list(dict.fromkeys(k for r in rows for k in r))
    if cols:
        w = csv.DictWriter(buf, fieldnames=cols, restval="", **kwargs)
        w.writeheader()
        w.writerows(csv_rows(rows))
    atomic_write_text(path, buf.getvalue())


def table(rows: list[dict], cols: list[tuple[str, str]], left: set = frozenset()) -> str:
    head = "".join(f"<th class='{'l' if c in left else ''}'>{esc(t)}</th>" for c, t in cols)
    body = []
    for r in rows:
        cells = "".join(f"<td class='{'l' if c in left else ''}'>{esc(fmt(r.get(c)))}</td>" for c, _ in cols)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


STATUS_JS = """
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message)); });
window.addEventListener('unhandledrejection', function (e) { window.__reportErrors.push(String(e.reason)); });
"""

RENDER_JS = """
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

CSS = """
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
td.anchor, th.anchor { color: #666; font-style: italic; background: #fafafa; }
"""


