"""The summary of a study's records: one flat row per model (:func:`summary_rows`), with a column
per PTQ quantity, bit-width and PTQ method (:data:`METHOD_SUFFIX`); the regression
(:mod:`landscape.regress`) and the report read these rows.

Example:
    >>> rec = {"id": "sgd-s0", "settings": {"method": "sgd", "seed": 0}, "measurements": {
    ...     "fp": {"value": {"val_acc": 0.9, "val_loss": 0.3, "test_acc": 0.9, "test_loss": 0.3}},
    ...     "ptq:W4A4": {"value": {"val_acc": 0.8, "val_loss": 0.5, "test_acc": 0.8, "test_loss": 0.5}}}}
    >>> row, = summary_rows([rec])
    >>> row["config"], round(row["acc_drop_W4A4"], 6), row["trace"]
    ('sgd', 0.1, None)
    >>> METHOD_SUFFIX["rtn+bn"], METHOD_SUFFIX["qdrop"]
    ('_bn', '_qdrop')
"""

from __future__ import annotations

import math
import re

from dnq.recon import PTQ_METHODS

from ..records import method_suffix, ptq_column, ptq_measurement

__all__ = ["METHOD_SUFFIX", "VARIANT_SUFFIX", "summary_rows"]

#: every PTQ method a study knows, in order, with its summary-column suffix (:func:`landscape.records.method_suffix`)
METHOD_SUFFIX = {m: method_suffix(m) for m in PTQ_METHODS}
VARIANT_SUFFIX = METHOD_SUFFIX  # its name before "variant" was called "method" in the code


def summary_rows(records: list[dict], bits: list[str] | None = None) -> list[dict]:
    """One flat row per model: the columns the regression and the report use.

    Columns: ``model``, ``config`` (the training configuration, shared by its seeds: the cluster
    of the report's bootstrap), ``method``, ``lambda_max``, ``sam_rho``, ``seed``, ``fp_val_acc``,
    ``fp_val_loss`` (validation split), ``fp_acc``, ``fp_loss`` (test split), the flatness
    measures, and per bit-width ``b`` and PTQ method (:func:`ptq_column`: no suffix for ``rtn``,
    ``_bn`` for ``rtn+bn``, ``_qdrop`` for ``qdrop``, ...) ``ptq_acc``, ``ptq_val_acc``, ``acc_drop`` (test), and
    ``ptq_loss_increase`` (test); ``trace_h_sigma_b``, ``predicted_b``, ``measured_b``.
    Missing measurements are ``None`` (a study still running).
    """
    rows = []
    for rec in records:
        m = rec.get("measurements", {})

        def val(name, *path):
            v = m.get(name, {}).get("value")  # noqa: B023 - val is only called within this iteration
            for p in path:
                if v is None:
                    return None
                v = v[p] if isinstance(v, dict) else (v[p] if isinstance(v, list) and len(v) > p else None)
            return v

        fp_acc = val("fp", "test_acc")
        config = rec.get("config") or re.sub(r"-s-?\d+$", "", rec["id"])
        row = {"model": rec.get("name", rec["id"]), "config": config, "method": rec["settings"].get("method"),
               "lambda_max": rec["settings"].get("lambda_max"), "sam_rho": rec["settings"].get("sam_rho"),
               "seed": rec["settings"].get("seed"), "fp_val_acc": val("fp", "val_acc"),
               "fp_val_loss": val("fp", "val_loss"), "fp_acc": fp_acc, "fp_loss": val("fp", "test_loss"),
               "trace": val("trace", "value"), "trace_se": val("trace", "std_error"),
               "top_eigenvalue": val("eigen", "eigenvalues", 0)}
        for b in bits or sorted({k.split(":", 1)[1] for k in m if k.startswith("ptq:")}):
            for method in PTQ_METHODS:
                key = ptq_measurement(b, method)
                if method != "rtn" and key not in m:
                    continue  # a study without the method (or an older one)
                acc = val(key, "test_acc")
                row[ptq_column("ptq_acc", b, method)] = acc
                row[ptq_column("ptq_val_acc", b, method)] = val(key, "val_acc")
                row[ptq_column("acc_drop", b, method)] = None if acc is None or fp_acc is None else fp_acc - acc
                loss = val(key, "test_loss")
                row[ptq_column("ptq_loss_increase", b, method)] = (None if loss is None or row["fp_loss"] is None
                                                                   else loss - row["fp_loss"])
            row[f"trace_h_sigma_{b}"] = val(f"noise:{b}", "trace_h_sigma")
            row[f"predicted_{b}"] = val(f"noise:{b}", "predicted")
            row[f"measured_{b}"] = val(f"noise:{b}", "measured")
        rows.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return rows
