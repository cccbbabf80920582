"""The report of a study: ``report.html`` (one self-contained file, plotly.js embedded, works
offline), the same figures as PNG and PDF for papers, and ``summary.csv`` / ``summary.json``.
Every figure comes from a builder of :mod:`landscape.plot`; its PNG and PDF are drawn from that
same figure object by :mod:`landscape.plot_static`.

    python -m landscape.report reports/digits          # or: landscape report reports/digits

The package: :mod:`~landscape.report.writer` (:func:`build`, what is written where),
:mod:`~landscape.report.analysis` (the numbers), :mod:`~landscape.report.sections` (the HTML
sections), :mod:`~landscape.report.html` (escaping, tables, CSV), the mixed-precision and
sampling-error sections (:mod:`~landscape.report.mixed`, :mod:`~landscape.report.sampling`), and
the published figures shown beside the grid (:mod:`~landscape.report.anchors`).

Sections: the quantization convention and the PTQ settings, the split sizes and which split every
number comes from; the grid of training method × PTQ method (per bit-width, test accuracy mean ±
std over seeds, the best of each column marked; :func:`training_by_ptq`, also ``grid.csv``; for a
study a published table applies to, the published figures in columns of their own, labelled with
their source and kept out of every statistic: :func:`anchors_for`); a summary table of all models (FP
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

Example:
    >>> from landscape.report import build, csv_cell
    >>> csv_cell("=cmd()")  # a cell a spreadsheet would run is defused
    "'=cmd()"
    >>> build.__module__
    'landscape.report.writer'
"""
from __future__ import annotations

from .analysis import (
    VARIANTS,
    cluster_labels,
    correlation_families,
    grid_csv_rows,
    method_comparison,
    prediction_fits,
    prediction_holdouts,
    ptq_settings_text,
    splits_text,
    training_by_ptq,
    variants,
)
from .anchors import anchors_for
from .html import csv_cell
from .writer import build, inputs_digest, main

__all__ = ["VARIANTS", "anchors_for", "build", "cluster_labels", "correlation_families", "csv_cell", "grid_csv_rows",
           "inputs_digest", "main", "method_comparison", "prediction_fits", "prediction_holdouts",
           "ptq_settings_text", "splits_text", "training_by_ptq", "variants"]
