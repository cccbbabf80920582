"""The report's sampling-error section (issue 13): how much the study's curvature moves with the
training images it is taken on.

A study with ``instruments.replicates`` = N >= 2 records, per model, the ``sampling``
measurement: the Hessian trace and the top eigenvalue on N disjoint subsets of
``hessian_samples`` training images (:func:`landscape.study.measure_sampling.sampling`; subset 0 is the
study's own curvature images). This section shows, per training configuration:

* the mean over its models of the per-model mean over subsets;
* the between-subset standard deviation, pooled over the configuration's models (the root of the
  mean of their sample variances over subsets), and the same over the mean (relative spread);
* the mean of the estimator's own error over every subset (the trace's standard error; for the
  top eigenvalue the Lanczos residual norm, a bound on its distance to an eigenvalue of that
  subset's Hessian), and the ratio std / error: near 1, the subsets differ no more than the
  estimator's noise; well above 1, the images matter more than the probes;
* the standard deviation across the configuration's seeds of the per-model means, to compare the
  sampling error with the differences between models.

The same rows go to ``sampling.csv`` (written atomically, with the report's CSV-injection rule).

Example:
    >>> from landscape.report.sampling import model_rows
    >>> reps = [{"images": 64, "trace": {"value": t, "std_error": 1.0},
    ...          "top_eigenvalue": {"value": e, "residual_norm": 0.1}} for t, e in ((10.0, 3.0), (12.0, 3.2))]
    >>> rec = {"id": "sgd-s0", "settings": {"seed": 0}, "measurements": {"sampling": {"value": {"replicates": reps}}}}
    >>> row = model_rows([rec])[0]
    >>> row["config"], row["trace"], row["eig_errors"]
    ('sgd', [10.0, 12.0], [0.1, 0.1])
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from . import html

#: (column, title) of the table and of sampling.csv
COLUMNS = [("config", "training configuration"), ("models", "models"), ("subsets", "subsets per model"),
           ("images", "images per subset"),
           ("trace_mean", "trace mean"), ("trace_between_std", "between-subset std"),
           ("trace_relative_spread_pct", "relative spread (%)"), ("trace_mean_se", "mean SE"),
           ("trace_std_to_se", "std / SE"), ("trace_seed_std", "std across seeds"),
           ("eig_mean", "top eigenvalue mean"), ("eig_between_std", "between-subset std"),
           ("eig_relative_spread_pct", "relative spread (%)"), ("eig_mean_residual", "mean residual"),
           ("eig_std_to_residual", "std / residual"), ("eig_seed_std", "std across seeds")]


def _config(rec: dict) -> str:
    return rec.get("config") or re.sub(r"-s-?\d+$", "", rec["id"])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def model_rows(records: list[dict]) -> list[dict]:
    """One row per model with a ``sampling`` measurement of at least two subsets: ``model``,
    ``config``, ``seed``, ``images`` (per subset), and per quantity (``trace``, ``eig``) the
    subsets' ``values`` and estimator ``errors`` (trace: standard errors; eig: residual norms)."""
    out = []
    for rec in records:
        v = (rec.get("measurements", {}).get("sampling") or {}).get("value") or {}
        reps = v.get("replicates") or []
        if len(reps) < 2:
            continue
        out.append({"model": rec.get("name", rec["id"]), "config": _config(rec),
                    "seed": rec.get("settings", {}).get("seed"), "images": reps[0].get("images"),
                    "trace": [r["trace"]["value"] for r in reps],
                    "trace_errors": [r["trace"]["std_error"] for r in reps],
                    "eig": [r["top_eigenvalue"]["value"] for r in reps],
                    "eig_errors": [r["top_eigenvalue"]["residual_norm"] for r in reps]})
    return out


def _stats(rows: list[dict], q: str) -> dict:
    """Pooled between-subset statistics of quantity ``q`` over ``rows`` (one configuration)."""
    means = [statistics.fmean(r[q]) for r in rows]
    mean = statistics.fmean(means)
    std = math.sqrt(statistics.fmean(statistics.variance(r[q]) for r in rows))
    errs = [e for r in rows for e in r[f"{q}_errors"] if _finite(e)]
    err = statistics.fmean(errs) if errs else None
    return {"mean": mean, "between_std": std, "relative_spread_pct": 100 * std / abs(mean) if mean else None,
            "err": err, "ratio": std / err if err else None,
            "seed_std": statistics.stdev(means) if len(means) > 1 else None}


def config_rows(records: list[dict]) -> list[dict]:
    """One row per training configuration (in the records' order) with the columns of
    :data:`COLUMNS` (see the module doc); empty when no model has a ``sampling`` measurement."""
    rows = model_rows(records)
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        t, e = _stats(mine, "trace"), _stats(mine, "eig")
        subsets = sorted({len(r["trace"]) for r in mine})
        images = sorted({r["images"] for r in mine if r["images"] is not None})
        out.append({"config": config, "models": len(mine),
                    "subsets": subsets[0] if len(subsets) == 1 else f"{subsets[0]}-{subsets[-1]}",
                    "images": images[0] if len(images) == 1 else ", ".join(map(str, images)) or None,
                    "trace_mean": t["mean"], "trace_between_std": t["between_std"],
                    "trace_relative_spread_pct": t["relative_spread_pct"], "trace_mean_se": t["err"],
                    "trace_std_to_se": t["ratio"], "trace_seed_std": t["seed_std"],
                    "eig_mean": e["mean"], "eig_between_std": e["between_std"],
                    "eig_relative_spread_pct": e["relative_spread_pct"], "eig_mean_residual": e["err"],
                    "eig_std_to_residual": e["ratio"], "eig_seed_std": e["seed_std"]})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (:func:`config_rows`) as a CSV file, written atomically."""
    html.write_csv(Path(path), rows, [c for c, _ in COLUMNS], extrasaction="ignore")


def section(records: list[dict], path) -> list[str]:
    """The HTML of the section, after writing ``path / "sampling.csv"``; ``[]`` (and no file)
    when no model has a ``sampling`` measurement (``instruments.replicates`` is 1)."""
    rows = config_rows(records)
    if not rows:
        return []
    write_csv(Path(path) / "sampling.csv", rows)
    note = ("Per model, the Hessian trace (the study's estimator and products) and the top eigenvalue (Lanczos, the "
            "study's tolerance) again on disjoint subsets of the training images, of the study's curvature size "
            "(subset 0 is the study's own images; subset r uses probe seed seed + r). Per training configuration: the "
            "mean over its models; the between-subset standard deviation pooled over its models (root of the mean "
            "of their variances over subsets) and over the mean (relative spread); the mean of the estimator's own "
            "error (trace: standard error; top eigenvalue: Lanczos residual norm, a bound on its distance to an "
            "eigenvalue of that subset's Hessian); std / error (near 1: the subsets differ no more than the "
            "estimator's noise; well above 1: the images matter); and the standard deviation of the per-model means "
            "across seeds, to compare the sampling error with the differences between models. Also in "
            "sampling.csv.")
    return ["<h2 id='sampling'>Sampling error of the curvature</h2>", f"<p class='note'>{html.esc(note)}</p>",
            html.table(rows, COLUMNS, left={"config"})]
