"""The report's mixed-precision section: per training configuration, test accuracy against
average weight bits (uniform bit-widths as a line, each objective's allocations as points), the
accuracy at each budget, and per model the bits chosen per layer next to the layer sensitivities.

The question it answers: does curvature (``predicted``, ``hawq``) guide the allocation better than
a plain measurement (``measured``), and does a training method (DNQ) move the whole front?
Every training configuration gets the same PTQ, calibration images, candidate bits, budgets and
sensitivity images; allocations use training images only (never validation or test).

Example:
    >>> from landscape.records import mixed_measurement
    >>> from landscape.report.mixed import mixed_rows
    >>> cfg = {"bits": ["W4A4"], "ptq": {"variants": ["rtn"]}, "mixed": {
    ...     "methods": ["rtn"], "uniform_bits": [], "budgets": [3.0], "objectives": ["hawq"], "kind": "avg-bits",
    ...     "abits": 4}}
    >>> value = {"allocation": {"avg_bits": 2.9, "avg_bits_all": 3.4, "bits": {"1": 2, "2": 4}},
    ...          "test_acc": 0.9, "val_acc": 0.91}
    >>> rec = {"id": "sgd-s0", "settings": {"method": "sgd", "seed": 0},
    ...        "measurements": {mixed_measurement("rtn", 3.0, "hawq", "avg-bits"): {"value": value}}}
    >>> [(r["config"], r["point"], r["budget"], r["avg_bits"], r["test_acc"]) for r in mixed_rows([rec], cfg)]
    [('sgd-s0', 'hawq', 3.0, 2.9, 0.9)]
"""

from __future__ import annotations

from dnq_landscape_common.html import esc
from dnq_landscape_common.stats import seed_stats

from ..plot import plot_pareto
from ..records import mixed_measurement, uniform_measurement


def mixed_rows(records: list[dict], cfg: dict) -> list[dict]:
    """One row per (model, PTQ method, point): the uniform bit-widths (``point="uniform"``) and every
    (budget, objective) allocation, with test and validation accuracy and the average weight bits
    of the allocated layers (first/last excluded; ``avg_bits_all`` includes them). Empty when the
    study has no ``mixed``."""
    m = cfg.get("mixed")
    if not m:
        return []
    ptq_methods = cfg.get("ptq", {}).get("variants", [])  # the PTQ methods (on disk: "variants")
    out = []
    for rec in records:
        meas = rec.get("measurements", {})
        base = {"model": rec.get("name", rec["id"]), "config": rec.get("config") or rec["id"],
                "method": rec.get("settings", {}).get("method"), "seed": rec.get("settings", {}).get("seed")}
        for ptq in m["methods"]:
            for b in m["uniform_bits"]:
                v = (meas.get(uniform_measurement(cfg.get("bits", []), ptq_methods, ptq, f"W{b}A{m['abits']}"), {})
                     .get("value"))
                if v is not None:
                    out.append({**base, "ptq": ptq, "point": "uniform", "budget": float(b), "avg_bits": float(b),
                                "avg_bits_all": None, "test_acc": v.get("test_acc"), "val_acc": v.get("val_acc"),
                                "bits": None})
            for budget in m["budgets"]:
                for obj in m["objectives"]:
                    v = meas.get(mixed_measurement(ptq, budget, obj, m["kind"]), {}).get("value")
                    if v is None:
                        continue
                    a = v["allocation"]
                    out.append({**base, "ptq": ptq, "point": obj, "budget": float(budget), "avg_bits": a["avg_bits"],
                                "avg_bits_all": a["avg_bits_all"], "test_acc": v.get("test_acc"),
                                "val_acc": v.get("val_acc"), "bits": a["bits"]})
    return out


def budget_table(mrows: list[dict], cfg: dict) -> list[dict]:
    """Accuracy at each budget: one row per (training configuration, PTQ method, budget), columns
    uniform at the largest candidate bit-width not above the budget (``uniform``), and each objective;
    cells are test accuracy mean / std / n over seeds, plus each objective's per-seed difference to
    ``measured`` (paired by seed) and the mean average bits actually used."""
    m = cfg.get("mixed") or {}
    out = []
    configs = list(dict.fromkeys(r["config"] for r in mrows))
    for c in configs:
        for ptq in m.get("methods", []):
            mine = [r for r in mrows if r["config"] == c and r["ptq"] == ptq]
            if not mine:
                continue
            for budget in m.get("budgets", []):
                below = [b for b in m.get("uniform_bits", []) if b <= budget]
                row = {"config": c, "method": mine[0]["method"], "ptq": ptq, "budget": budget,
                       "uniform_bits": max(below) if below else None}
                row["uniform"] = (seed_stats([r["test_acc"] for r in mine if r["point"] == "uniform"
                                          and r["budget"] == row["uniform_bits"]]) if below else None)
                by_seed_measured = {r["seed"]: r["test_acc"] for r in mine
                                    if r["point"] == "measured" and r["budget"] == budget}
                for obj in m.get("objectives", []):
                    pts = [r for r in mine if r["point"] == obj and r["budget"] == budget]
                    row[obj] = seed_stats([r["test_acc"] for r in pts])
                    row[f"{obj}_avg_bits"] = seed_stats([r["avg_bits"] for r in pts])
                    if obj != "measured" and by_seed_measured:
                        row[f"{obj}_minus_measured"] = [r["test_acc"] - by_seed_measured[r["seed"]] for r in pts
                                                        if r["seed"] in by_seed_measured and r["test_acc"] is not None]
                cols = ["uniform", *m.get("objectives", [])]
                means = [row[k]["mean"] for k in cols if row.get(k)]
                row["best"] = [k for k in cols if row.get(k) and means and row[k]["mean"] == max(means)]
                out.append(row)
    return out


def _cell(s) -> str:
    if s is None:
        return "n/a"
    return f"{100 * s['mean']:.2f}" + ("" if s["std"] is None else f" ± {100 * s['std']:.2f}")


def table_html(table: list[dict], cfg: dict) -> str:
    objs = (cfg.get("mixed") or {}).get("objectives", [])
    head = ("<th class='l'>training</th><th>PTQ</th><th>budget</th><th>uniform</th>"
            + "".join(f"<th>{esc(o)}</th>" for o in objs)
            + "".join(f"<th>{esc(o)} − measured (per seed)</th>" for o in objs if o != "measured"
                      and "measured" in objs))
    body = []
    for r in table:
        cells = [f"<td class='l'>{esc(r['config'])}</td>", f"<td>{esc(r['ptq'])}</td>", f"<td>{r['budget']:g}</td>"]
        for k in ["uniform", *objs]:
            text = _cell(r.get(k))
            if k == "uniform" and r.get("uniform_bits") is not None:
                text += f" (W{r['uniform_bits']})"
            elif k != "uniform" and r.get(f"{k}_avg_bits"):
                text += f" ({r[f'{k}_avg_bits']['mean']:.2f} b)"
            cells.append(f"<td class='best'><b>{esc(text)} *</b></td>" if k in r["best"] else f"<td>{esc(text)}</td>")
        for o in objs:
            if o != "measured" and "measured" in objs:
                d = r.get(f"{o}_minus_measured") or []
                cells.append(f"<td>{esc(', '.join(f'{100 * v:+.2f}' for v in d) or 'n/a')}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(mrows: list[dict], cfg: dict, place) -> list[str]:
    """The HTML of the section; the figures (:func:`landscape.plot.plot_pareto`: per PTQ method, each
    training configuration's and then all of them overlaid) go through ``place(fig, stem=...)``,
    their static copy being ``mixed_pareto_<PTQ method>`` (all of that method's figures side by side)."""
    m = cfg.get("mixed")
    if not m or not mrows:
        return []
    parts = ["<h2 id='mixed'>Mixed precision: curvature-guided bit allocation</h2>",
             "<p class='note'>" + esc(
                 f"Per model, every layer's sensitivity at weight bits {m['bits']} on the curvature images (training "
                 "split): predicted = g.mu + (mu^T H_ll mu + Tr(H_ll Sigma))/2 from the layer's own quantization error "
                 "(block-diagonal: cross-layer terms dropped, as HAWQ does), hawq = Tr(H_ll)/n_l * ||Q(W_l) - W_l||^2 "
                 "(HAWQ-V2), measured = the loss increase with only that layer's weights quantized. An integer program "
                 f"(scipy.optimize.milp) picks one bit-width per layer minimising the summed sensitivity with the "
                 "average weight bits of the allocated layers at most the budget "
                 f"({', '.join(f'{b:g}' for b in m['budgets'])}"
                 f"); first and last layer at {cfg.get('ptq', {}).get('first_last_bits')} bits, activations at "
                 f"A{m['abits']}; then the PTQ method quantizes with those bits. Uniform: every allocated layer at one "
                 "bit-width. Test accuracy (%), mean ± std over seeds; (x b): the average bits actually used. * and "
                 "bold: the best mean of the row. The per-seed differences pair each objective with measured on the "
                 "same model; with few seeds read them, not a test.") + "</p>"]
    table = budget_table(mrows, cfg)
    parts.append(table_html(table, cfg))
    configs = list(dict.fromkeys(r["config"] for r in mrows))
    for ptq in m.get("methods", []):
        stem = "mixed_pareto_" + "".join(ch if ch.isalnum() else "_" for ch in ptq)
        for config in [*configs, None]:
            fig = plot_pareto(mrows, cfg, ptq, config)
            if fig is not None:
                parts.append(place(fig, stem=stem))
    return parts
