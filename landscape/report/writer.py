"""Write a study's report: :func:`build` reads the records, computes the report's numbers
(:mod:`landscape.report.analysis`), writes the tables (CSV, JSON), the page
(:mod:`landscape.report.sections`) and the static figures, each file atomically.

Example:
    >>> from landscape.report.writer import unit_note
    >>> unit_note(None)[:30]
    'resampling models one by one: '
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from dnq_landscape_common.cli import OneLineParser, debug_requested, guarded
from dnq_landscape_common.io import atomic_write_text

from .. import plot_static
from ..records import read_study_json
from ..study import StudyError, load_records, summary_rows
from . import mixed as report_mixed
from . import sampling as report_sampling
from .analysis import (
    cluster_labels,
    correlation_families,
    grid_csv_rows,
    method_comparison,
    prediction_fits,
    prediction_holdouts,
    training_by_ptq,
    variants,
)
from .anchors import anchors_for
from .html import CSS, RENDER_JS, STATUS_JS, esc, json_default, script_json, write_csv
from .sections import (
    correlation_section,
    grid_section,
    header,
    methods_section,
    model_section,
    prediction_section,
    scatter_section,
    summary_section,
)

__all__ = ["build", "inputs_digest", "main", "unit_note"]

_HERE = Path(__file__).resolve().parent
# the code a report is made from: a toolkit update that changes any of it rebuilds the report
_CODE = [*sorted(_HERE.glob("*.py")), *sorted((_HERE.parent / "study").glob("*.py"))] + [
    _HERE.parent / n for n in ("records.py", "plot.py", "plot_static.py", "regress.py")]
GRID_COLUMNS = ["bits", "training", "method", "ptq", "test_acc_mean", "test_acc_std", "n_seeds", "best_in_column"]
MIXED_COLUMNS = ["model", "config", "method", "seed", "ptq", "point", "budget", "avg_bits", "avg_bits_all", "test_acc",
                 "val_acc"]


def inputs_digest(path, static: bool, n_boot: int) -> str:
    """SHA-256 of everything a report is made from: the study's ``study.json`` and model records,
    the settings, and the source of the modules that write it (a toolkit update rebuilds it)."""
    path = Path(path)
    h = hashlib.sha256(f"static={static};n_boot={n_boot}".encode())
    meta = read_study_json(path / "study.json")
    meta.pop("updated", None)  # rewritten by every run of the study
    h.update(json.dumps(meta, sort_keys=True).encode())
    for f in [*sorted((path / "models").glob("*.json")), *_CODE]:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()


def unit_note(n_configs: int | None) -> str:
    """What the bootstrap resamples: training configurations (``n_configs`` of them), or models."""
    if n_configs is not None:
        return (f"resampling whole training configurations (the {n_configs} values of the config column; the "
                f"seeds of one configuration share everything but the seed and are resampled together)")
    return ("resampling models one by one: this study records no training configuration (config column) "
            "for every model, so seeds of one configuration are treated as independent and the intervals "
            "are too narrow if there are several seeds")


def _up_to_date(target: Path, digest: str) -> bool:
    """Whether ``target`` is a report of these inputs (the digest sits in the head of a report
    written whole, atomically, last)."""
    if not target.is_file():
        return False
    with open(target, "rb") as f:
        return f"<meta name='inputs-sha256' content='{digest}'>".encode() in f.read(4096)


class _Report:
    """Everything :func:`build` computes from the records, once."""

    def __init__(self, path: Path, records: list[dict], n_boot: int):
        self.records, self.n_boot = records, n_boot
        self.meta = read_study_json(path / "study.json")
        self.cfg = self.meta["config"]
        self.bits = list(self.cfg.get("bits", []))
        self.rows = summary_rows(records, self.bits)
        self.vars_ = variants(self.rows, self.bits)
        self.families = correlation_families(self.rows, self.bits, n_boot=n_boot)
        self.fits = [f for fam in self.families for f in fam["fits"]]
        self.skipped = [s for fam in self.families for s in fam["skipped"]]
        self.adjusted = {(r["x"], r["y"]): r["spearman_p_holm"] for fam in self.families for r in fam["table"]}
        self.pfits = prediction_fits(self.rows, self.bits, n_boot=n_boot)
        self.holdouts = prediction_holdouts(self.rows, self.bits)
        self.grid = training_by_ptq(self.rows, self.bits, self.vars_)
        self.corr = [r for fam in self.families for r in fam["table"]]
        self.clustered = cluster_labels(self.rows) is not None
        self.n_configs = len({r["config"] for r in self.rows}) if self.clustered else None
        self.mrows = report_mixed.mixed_rows(records, self.cfg)
        self.mtable = report_mixed.budget_table(self.mrows, self.cfg) if self.mrows else []
        self.comparison = method_comparison(self.rows, self.bits, self.vars_)  # the page and summary.json
        self.anchors = anchors_for(self.cfg)  # published figures beside ours (never in a statistic)

    def write_tables(self, dest: Path, digest: str) -> None:
        """``summary.csv``, ``correlations.csv``, ``grid.csv``, ``mixed.csv`` (with mixed
        precision) and ``summary.json``."""
        write_csv(dest / "summary.csv", self.rows)
        write_csv(dest / "correlations.csv", self.corr)
        write_csv(dest / "grid.csv", grid_csv_rows(self.grid, self.vars_), GRID_COLUMNS)
        if self.mrows:
            write_csv(dest / "mixed.csv", self.mrows, MIXED_COLUMNS, extrasaction="ignore")
        text = json.dumps(self.summary(digest), indent=2, default=json_default) + "\n"
        atomic_write_text(dest / "summary.json", text)

    def summary(self, digest: str) -> dict:
        """The content of ``summary.json``."""
        cfg, meta, families = self.cfg, self.meta, self.families
        return {"study": cfg.get("name"), "config_hash": meta.get("hash"), "ptq": cfg.get("ptq"),
                "splits": meta.get("splits"), "variants": [v[0] for v in self.vars_],
                "bootstrap": {"unit": "cluster" if self.clustered else "row",
                              "cluster_column": "config" if self.clustered else None,
                              "n_groups": self.n_configs, "n_boot": self.n_boot},
                "multiplicity": {"family": "one (bit-width, PTQ variant): every (flatness measure, degradation) "
                                           "pair fitted in it, one test per pair and statistic",
                                 "holm": "<statistic>_p_holm", "bh": "<statistic>_q_bh",
                                 "report_wide_holm": "spearman_p_holm_report"},
                "families": [{"family": f["family"], "bits": f["bits"], "variant": f["variant"],
                              "m_tests": f["m_tests"]} for f in families],
                "training_by_ptq": self.grid,
                "mixed": ({"settings": cfg.get("mixed"), "accuracy_at_budget": self.mtable, "points": self.mrows}
                          if self.mrows else None),
                "models": self.rows, "correlations": self.corr, "skipped_fits": self.skipped,
                "methods_chosen_on_validation": self.comparison,
                "published_anchors": self.anchors,
                "prediction": {k: {"slope": f.slope, "slope_ci": f.slope_ci, "intercept": f.intercept, "n": f.n,
                                   "pearson_r": f.pearson_r, "spearman_rho": f.spearman_rho,
                                   "bootstrap_slope_ci": f.bootstrap_slope_ci, "bootstrap_unit": f.bootstrap_unit,
                                   "n_groups": f.n_groups}
                               for k, f in self.pfits.items()},
                "prediction_holdout": {k: {"skipped": h} if isinstance(h, str) else h.to_dict()
                                       for k, h in self.holdouts.items()},
                "inputs_sha256": digest}

    def parts(self, dest: Path, place) -> list[str]:
        """The page's HTML sections, in order (figures through ``place``)."""
        bits, rows, vars_, note = self.bits, self.rows, self.vars_, unit_note(self.n_configs)
        conv = (self.cfg.get("ptq") or {}).get("convention") if isinstance(self.cfg.get("ptq"), dict) else None
        parts = header(self.cfg, self.meta, bits, len(self.records))
        parts += grid_section(self.grid, bits, vars_, self.anchors, conv)
        parts += report_mixed.section(self.mrows, self.cfg, place)
        parts += report_sampling.section(self.records, dest)  # sampling.csv; [] without instruments.replicates
        parts += summary_section(rows, bits, vars_) + methods_section(self.comparison, bits, vars_)
        parts += scatter_section(rows, self.fits, bits, vars_, self.adjusted, place)
        parts += correlation_section(self.families, self.n_boot, note, self.clustered)
        parts += prediction_section(rows, bits, self.pfits, self.holdouts, note, place)
        parts.append("<h2 id='models'>Per model</h2>")
        parts += [model_section(rec, row, bits, vars_, self.cfg, bool(self.mrows), place)
                  for rec, row in zip(self.records, rows)]
        return parts


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
    if only_if_changed and _up_to_date(target, digest):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    rep = _Report(path, records, n_boot)
    rep.write_tables(dest, digest)
    figures: dict[str, dict] = {}
    static_figs: dict[str, list[tuple]] = {}  # figures/<stem>.png and .pdf: the figures placed with that stem

    def place(fig, stem: str | None = None) -> str:
        fid = f"fig{len(figures)}"
        text = fig.to_json()
        figures[fid] = json.loads(text)
        if stem is not None:
            static_figs.setdefault(stem, []).append((fig, text))
        return f"<div id='{fid}' class='plot'></div>"

    parts = rep.parts(dest, place)
    written = _static_figures(static_figs, dest / "figures") if static else []
    if written:
        parts.append("<h2 id='files'>Files</h2><p class='note'>Static figures (PNG, PDF) in figures/: "
                     + ", ".join(esc(w) for w in written[:12]) + (" ..." if len(written) > 12 else "")
                     + "; tables: summary.csv, summary.json, correlations.csv"
                     + (", mixed.csv" if rep.mrows else "") + ".</p>")
    atomic_write_text(target, _page(rep.cfg, digest, parts, figures))
    return target


def _page(cfg: dict, digest: str, parts: list[str], figures: dict) -> str:
    """The whole HTML document: plotly.js embedded (works offline), the figures as JSON."""
    from plotly.offline import get_plotlyjs

    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='inputs-sha256' content='{digest}'>"
            f"<title>{esc(cfg.get('name'))}: flatness and PTQ</title><style>{CSS}</style>"
            f"<script>{STATUS_JS}</script><script>{get_plotlyjs()}</script></head><body>"
            + "".join(parts)
            + f"<script type='application/json' id='figures-data'>{script_json(figures)}</script>"
            + f"<script>{RENDER_JS}</script></body></html>")


def _static_figures(static_figs: dict, folder: Path) -> list[str]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` for every stem (``[(figure, its JSON), ...]``),
    skipping a stem whose files exist and whose figures (and drawing code) are the ones they were
    drawn from last time: the digests are kept in ``folder/.digests.json``, written last. Drawing
    is most of a report's time (28 of 31 s for the digits study), and a rebuilt report of an
    unchanged study draws nothing."""
    import matplotlib

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
    atomic_write_text(index, json.dumps(new, indent=0) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m landscape.report PATH [--out FILE] [--no-static] [--debug]``: as ``landscape
    report`` (errors are one line on stderr and exit code 2)."""
    p = OneLineParser(prog="python -m landscape.report", description="Write the report of a study.")
    p.add_argument("path", help="the study directory")
    p.add_argument("--out", default=None, help="the HTML file (default PATH/report.html)")
    p.add_argument("--no-static", action="store_true", help="skip the PNG/PDF figures")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also LANDSCAPE_DEBUG=1)")
    return guarded("landscape report", lambda: _main(p, argv), debug_requested(argv, "LANDSCAPE_DEBUG"))


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


if __name__ == "__main__":  # pragma: no cover - python -m landscape.report runs __main__.py
    sys.exit(main())
