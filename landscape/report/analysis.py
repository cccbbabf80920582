"""The report's numbers: the training × PTQ grid, the methods chosen on validation, the correlation
families with their multiplicity control, the prediction fits and their out-of-sample check, and
the sentences that say which settings and splits every number comes from.

Example:
    >>> from landscape.report.analysis import training_by_ptq
    >>> rows = [{"config": "sgd", "method": "sgd", "fp_acc": 0.98, "ptq_acc_W4A4": a} for a in (0.90, 0.94)]
    >>> cell = training_by_ptq(rows, ["W4A4"], [("rtn", "", "round to nearest")])["W4A4"][0]["rtn"]
    >>> round(cell["mean"], 4), round(cell["std"], 4), cell["n"], cell["best"]
    (0.92, 0.0283, 2, True)
"""

from __future__ import annotations

import math
import re
import statistics
import warnings

import numpy as np

from dnq.convention import CONVENTIONS, DEFAULT_CONVENTION, describe
from dnq.recon import DESCRIPTIONS
from dnq_landscape_common.html import esc
from dnq_landscape_common.stats import seed_stats

from ..plot import MEASURES, measure_column
from ..regress import correlation_table, fit, holm, prediction_holdout
from ..study import METHOD_SUFFIX
from .anchors import column_label

#: PTQ variants: (name, column suffix, what it is)
_VARIANT_TEXT = {"rtn": "round to nearest, BatchNorm folded with its saved statistics",
                 "rtn+bn": "the same, with the BatchNorm statistics re-estimated on the calibration images through "
                           "the quantized model before folding",
                 **DESCRIPTIONS}
VARIANTS = [(v, METHOD_SUFFIX[v], _VARIANT_TEXT[v]) for v in METHOD_SUFFIX]


def variants(rows: list[dict], bits: list[str]) -> list[tuple[str, str, str]]:
    """The PTQ variants whose columns the rows have (``(name, suffix, description)``)."""
    have = {k for r in rows for k in r}
    return [v for v in VARIANTS if any(f"acc_drop_{b}{v[1]}" in have or f"ptq_acc_{b}{v[1]}" in have for b in bits)]


def training_by_ptq(rows: list[dict], bits: list[str], vars_: list) -> dict[str, list[dict]]:
    """The grid readers look for first: per bit-width, one row per training configuration, one
    column per PTQ method, cells the *test* accuracy mean, standard deviation and number of seeds.

    Returns:
        ``{bits: [row, ...]}``; a row has ``config``, ``method``, ``n`` (seeds), ``FP`` and one key
        per PTQ method, each ``{"mean", "std", "n", "best"}`` (``std`` None with one seed) or
        ``None``; ``best`` marks the highest mean of its column (every tied one).
    """
    def cell(vals):
        s = seed_stats(vals)
        return None if s is None else {**s, "best": False}

    configs = list(dict.fromkeys(r.get("config") or r.get("model") for r in rows))
    out = {}
    for b in bits:
        table = []
        for c in configs:
            mine = [r for r in rows if (r.get("config") or r.get("model")) == c]
            row = {"config": c, "method": mine[0].get("method"), "n": len(mine),
                   "FP": cell([r.get("fp_acc") for r in mine])}
            for name, sfx, _ in vars_:
                row[name] = cell([r.get(f"ptq_acc_{b}{sfx}") for r in mine])
            table.append(row)
        for col in ["FP", *(v[0] for v in vars_)]:
            means = [r[col]["mean"] for r in table if r[col] is not None]
            for r in table:
                if r[col] is not None and means and r[col]["mean"] == max(means):
                    r[col]["best"] = True
        out[b] = table
    return out


def grid_cell(c) -> str:
    if c is None:
        return "n/a"
    sd = "" if c["std"] is None else f" ± {100 * c['std']:.2f}"
    return f"{100 * c['mean']:.2f}{sd}" + (" *" if c["best"] else "")


def anchor_columns(anchors: dict | None, bits: str) -> list[tuple[str, float]]:
    """The published columns of the grid at ``bits`` (``anchors``: :func:`landscape.report.anchors.anchors_for`):
    ``[(header, percent), ...]``, FP first; empty when no published table holds ``bits``."""
    if not anchors or bits not in anchors["bits"]:
        return []
    row = anchors["bits"][bits]
    return [(column_label("fp", anchors["short"]), anchors["fp"])] + [
        (column_label(m, anchors["short"]), row[m]) for m in anchors["methods"] if m in row]


def grid_html(table: list[dict], vars_: list, anchors: list[tuple[str, float]] | None = None) -> str:
    """One bit-width's grid; ``anchors`` (:func:`anchor_columns`) adds the published figures in
    columns of their own (one cell spanning every row: one published number, not one per training)."""
    anchors = anchors or []
    head = "<th class='l'>training</th><th>seeds</th><th>FP</th>" + "".join(f"<th>{esc(v[0])}</th>" for v in vars_)
    head += "".join(f"<th class='anchor'>{esc(h)}</th>" for h, _ in anchors)
    body = []
    for i, r in enumerate(table):
        cells = [f"<td class='l'>{esc(r['config'])}</td>", f"<td>{r['n']}</td>"]
        for col in ["FP", *(v[0] for v in vars_)]:
            c = r[col]
            text = esc(grid_cell(c))
            cells.append(f"<td class='best'><b>{text}</b></td>" if c and c["best"] else f"<td>{text}</td>")
        if i == 0:
            cells += [f"<td class='anchor' rowspan='{len(table)}'>{v:.2f}</td>" for _, v in anchors]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def grid_csv_rows(grid: dict[str, list[dict]], vars_: list) -> list[dict]:
    """``grid.csv``: one line per (bit-width, training configuration, PTQ method or FP)."""
    out = []
    for b, table in grid.items():
        for r in table:
            for col in ["FP", *(v[0] for v in vars_)]:
                c = r[col]
                out.append({"bits": b, "training": r["config"], "method": r["method"], "ptq": col,
                            "test_acc_mean": None if c is None else c["mean"],
                            "test_acc_std": None if c is None else c["std"], "n_seeds": None if c is None else c["n"],
                            "best_in_column": None if c is None else c["best"]})
    return out


def method_comparison(rows: list[dict], bits: list[str], vars_: list) -> list[dict]:
    """Per method: the configuration chosen on validation and its test accuracy, per column.

    For each method and each column (FP, and every bit-width under every PTQ variant), the
    method's configurations (its ``config`` values: a strength or radius) are ranked by their
    mean *validation* accuracy over seeds; the chosen one's *test* accuracy is reported as mean,
    standard deviation and number of seeds. Test accuracy never takes part in the choice.
    Without validation numbers (an older study) the column is left out, never chosen on test.
    """
    cols = [("FP", "fp_val_acc", "fp_acc")] + [
        (f"{b} {name}", f"ptq_val_acc_{b}{sfx}", f"ptq_acc_{b}{sfx}") for b in bits for name, sfx, _ in vars_]
    out = []
    for method in dict.fromkeys(r.get("method") for r in rows):
        mine = [r for r in rows if r.get("method") == method]
        configs = list(dict.fromkeys(r.get("config") or r.get("model") for r in mine))
        row = {"method": method, "configs": len(configs)}
        for label, vcol, tcol in cols:
            best, best_val = None, -math.inf
            for c in configs:
                vals = [r[vcol] for r in mine if (r.get("config") or r.get("model")) == c and r.get(vcol) is not None]
                if vals and statistics.mean(vals) > best_val:
                    best, best_val = c, statistics.mean(vals)
            if best is None:
                continue
            tests = [r[tcol] for r in mine if (r.get("config") or r.get("model")) == best and r.get(tcol) is not None]
            if not tests:
                continue
            s = seed_stats(tests)
            sd = math.nan if s["std"] is None else s["std"]
            row[label] = f"{100 * s['mean']:.2f} ± {100 * sd:.2f} (n={s['n']})" + (
                f" [{best}]" if len(configs) > 1 else "")
        out.append(row)
    return out


def cluster_labels(rows: list[dict]) -> list | None:
    """The ``config`` label of every row (the bootstrap's cluster), or ``None`` when any is missing."""
    labels = [r.get("config") for r in rows]
    return labels if rows and all(v is not None for v in labels) else None


def _values(rows, col) -> np.ndarray:
    return np.array([np.nan if r.get(col) is None else r[col] for r in rows], dtype=float)


def correlation_families(rows: list[dict], bits: list[str], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """The correlation tables: one family of tests per (bit-width, PTQ variant).

    A family holds the fits of accuracy drop and PTQ test-loss increase (of that bit-width and
    variant) on each flatness measure (trace, top eigenvalue, and the bit-width's Tr(H Sigma) and
    predicted loss increase): up to 8 tests per statistic, adjusted together (Holm and BH, see
    :func:`landscape.regress.correlation_table`). The bootstrap is clustered on ``config`` when
    every row has one, else over rows.

    Returns:
        One dict per family: ``bits``, ``variant``, ``fits``, ``table`` (rows of
        ``correlation_table(fits, adjust=True)`` with ``bits``, ``variant``, ``family``), ``m_tests``
        and ``skipped`` (pairs with fewer than 3 usable models, with the reason).
    """
    groups = cluster_labels(rows)
    out = []
    for b in bits:
        for name, sfx, _ in variants(rows, bits):
            fits, skipped = [], []
            for y in (f"acc_drop_{b}{sfx}", f"ptq_loss_increase_{b}{sfx}"):
                for m, _ in MEASURES:
                    x = measure_column(m, b)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            fits.append(fit(_values(rows, x), _values(rows, y), x_name=x, y_name=y, n_boot=n_boot,
                                            seed=seed, groups=groups))
                    except ValueError as e:
                        skipped.append({"bits": b, "variant": name, "x": x, "y": y, "reason": str(e)})
            family = f"{b} {name}"
            table = [{"bits": b, "variant": name, "family": family, **r} for r in correlation_table(fits, adjust=True)]
            out.append({"bits": b, "variant": name, "family": family, "fits": fits, "table": table,
                        "m_tests": table[0]["m_tests"] if table else 0, "skipped": skipped})
    everything = [r for f in out for r in f["table"]]  # the whole report as one family, for the sceptical reader
    for r, h in zip(everything, holm([r["spearman_p"] for r in everything])):
        r["spearman_p_holm_report"] = float(h)
    return out


def prediction_fits(rows: list[dict], bits: list[str], seed: int = 0, n_boot: int = 2000) -> dict:
    """Measured against predicted loss increase (weights only), one fit per bit-width (never pooled:
    the bit-widths are the same models again). The bootstrap is clustered on ``config`` when
    every row has one."""
    groups = cluster_labels(rows)
    out = {}
    for b in bits:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[b] = fit(_values(rows, f"predicted_{b}"), _values(rows, f"measured_{b}"), x_name=f"predicted_{b}",
                             y_name=f"measured_{b}", seed=seed, n_boot=n_boot, groups=groups)
        except ValueError:
            pass
    return out


def prediction_holdouts(rows: list[dict], bits: list[str]) -> dict:
    """Per bit-width, :func:`landscape.regress.prediction_holdout` of measured against predicted loss
    increase split by ``seed``; a string (the reason) where it cannot be done."""
    out = {}
    for b in bits:
        try:
            out[b] = prediction_holdout(_values(rows, f"measured_{b}"), _values(rows, f"predicted_{b}"),
                                        [r.get("seed") for r in rows])
        except ValueError as e:
            out[b] = str(e).removeprefix("prediction_holdout: ")
    return out


# -- what was measured, on which split -------------------------------------------------------------
def _wa(bits: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*[Ww](\d+)[Aa](\d+)\s*", str(bits))
    return (m[1], m[2]) if m else ("?", "?")


def convention_text(ptq: dict) -> str:
    """The sentence of the report's header that names the quantization convention of the study's
    PTQ (``ptq``: its ``ptq`` settings; a study from before conventions had names is ``dnq``)."""
    conv = ptq.get("convention") or DEFAULT_CONVENTION
    if conv not in CONVENTIONS:
        return f"Quantization convention: {conv} (not known to this version of the toolkit)."
    d = describe(conv)
    return (f"Quantization convention: {conv} ({d['source']}): weights {d['weights']}; activations "
            f"{d['activations']}; first and last layers: {d['first_last']}.")


def _recon_text(ptq: dict, recon: list[str]) -> str:
    """The reconstruction's settings, its learning rates by the study's rule."""
    g = ptq.get

    def rec(v):
        return "not recorded" if v is None else v

    iters = g("recon_iters")
    iters = "20,000 on a GPU and 500 on a CPU (the device default)" if iters is None else iters
    conv = g("convention") or DEFAULT_CONVENTION
    rule = g("recon_lr_rule") or ("paper" if conv == "paper" else "scaled")
    lrs = ("the papers' fixed learning rates, whatever the steps" + (
        f" ({describe(conv)['learning_rates']})" if conv == "paper" and conv in CONVENTIONS else "")
           if rule == "paper" else
           "learning rates scaled so that learning rate x steps is the papers' (dnq.recon.budget_lrs)")
    return (f" Reconstruction ({', '.join(recon)}): BatchNorm folded first, initial ranges "
            f"{rec(g('recon_range'))}, {iters} steps per block, batch {rec(g('recon_batch_size'))}, "
            f"{rec(g('recon_calib_size'))} calibration images from the same split, {lrs}"
            f"{'' if g('recon_lr_rule') is None else ' (ptq.recon_lr_rule ' + str(rule) + ')'}.")


def ptq_settings_text(cfg: dict, bits: list[str]) -> str:
    """The exact PTQ settings of the study (``config["ptq"]``), its quantization convention
    first, or "not recorded"."""
    ptq = cfg.get("ptq")
    wb = "; ".join(f"{b}: weights {_wa(b)[0]} bits, activations {_wa(b)[1]} bits" for b in bits)
    if not isinstance(ptq, dict):
        return (f"PTQ settings: not recorded in study.json (a study from before they were stored); bit-widths {wb}. "
                "Only the round-to-nearest variant was measured.")
    g = ptq.get

    def rec(v):
        return "not recorded" if v is None else v

    fold = g("fold_bn")
    named = {n: d for n, _, d in VARIANTS}
    var = "; ".join(f"{v}: {named.get(v, 'as named')}" for v in (g("variants") or [])) or "not recorded"
    recon = [v for v in (g("variants") or []) if v in ("adaround", "brecq", "qdrop")]
    own = (g("convention") or DEFAULT_CONVENTION) == DEFAULT_CONVENTION  # the fixed fields describe dnq's quantizer
    quantizer = (f" Weights: {rec(g('weight_mode'))}, {rec(g('weight_granularity'))}. Activations: {rec(g('act'))}."
                 if own else "")
    return (f"{convention_text(ptq)} PTQ settings: {wb}.{quantizer} Range: {rec(g('range'))}. First and last layers "
            f"at {rec(g('first_last_bits'))} bits. Calibration: {rec(g('calib_size'))} images from "
            f"{rec(g('calib_split'))}. BatchNorm folded into the convolutions: "
            f"{'yes' if fold is True else 'no' if fold is False else 'not recorded'}. Variants: {var}."
            + (_recon_text(ptq, recon) if recon else ""))


def splits_text(meta: dict, cfg: dict) -> str:
    """The split sizes and which split every number in the report comes from."""
    sp = meta.get("splits")
    sizes = (", ".join(f"{k} {v}" for k, v in sp.items()) if isinstance(sp, dict) and sp
             else "not recorded in study.json")
    hs = (cfg.get("instruments") or {}).get("hessian_samples", "not recorded")
    return (f"Splits: {sizes}. FP val / FP test: accuracy of the full-precision model on the validation / test split. "
            f"PTQ accuracy, accuracy drop (FP test minus PTQ test) and PTQ loss increase: test split "
            f"(PTQ validation accuracy is in summary.csv). Curvature (Hessian trace, eigenvalues, density, "
            f"Tr(H Sigma)), the predicted and measured weight-quantization loss increase, the surface and the "
            f"slices: {hs} non-augmented training images.")


