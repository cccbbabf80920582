"""The report's mixed-precision section: per training configuration, test accuracy against
average weight bits (uniform bit-widths as a line, each objective's allocations as points), the
accuracy at each budget, and per model the bits chosen per layer next to the layer sensitivities.

The question it answers: does curvature (``predicted``, ``hawq``) guide the allocation better than
a plain measurement (``measured``), and does a training method (DNQ) move the whole front?
Every training configuration gets the same PTQ, calibration images, candidate bits, budgets and
sensitivity images; allocations use training images only (never validation or test).
"""

from __future__ import annotations

import html
import statistics

from .study import mixed_measurement, uniform_measurement

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
_SYMBOLS = {"predicted": "diamond", "hawq": "square", "measured": "triangle-up"}
_MARKERS = {"predicted": "D", "hawq": "s", "measured": "^"}


def _esc(v) -> str:
    return html.escape(str(v))


def mixed_rows(records: list[dict], cfg: dict) -> list[dict]:
    """One row per (model, PTQ method, point): the uniform bit-widths (``point="uniform"``) and every
    (budget, objective) allocation, with test and validation accuracy and the average weight bits
    of the allocated layers (first/last excluded; ``avg_bits_all`` includes them). Empty when the
    study has no ``mixed``."""
    m = cfg.get("mixed")
    if not m:
        return []
    variants = cfg.get("ptq", {}).get("variants", [])
    out = []
    for rec in records:
        meas = rec.get("measurements", {})
        base = {"model": rec.get("name", rec["id"]), "config": rec.get("config") or rec["id"],
                "method": rec.get("settings", {}).get("method"), "seed": rec.get("settings", {}).get("seed")}
        for ptq in m["methods"]:
            for b in m["uniform_bits"]:
                v = (meas.get(uniform_measurement(cfg.get("bits", []), variants, ptq, f"W{b}A{m['abits']}"), {})
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


def _stats(vals: list) -> dict | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


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
                row["uniform"] = (_stats([r["test_acc"] for r in mine if r["point"] == "uniform"
                                          and r["budget"] == row["uniform_bits"]]) if below else None)
                by_seed_measured = {r["seed"]: r["test_acc"] for r in mine
                                    if r["point"] == "measured" and r["budget"] == budget}
                for obj in m.get("objectives", []):
                    pts = [r for r in mine if r["point"] == obj and r["budget"] == budget]
                    row[obj] = _stats([r["test_acc"] for r in pts])
                    row[f"{obj}_avg_bits"] = _stats([r["avg_bits"] for r in pts])
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
            + "".join(f"<th>{_esc(o)}</th>" for o in objs)
            + "".join(f"<th>{_esc(o)} − measured (per seed)</th>" for o in objs if o != "measured"
                      and "measured" in objs))
    body = []
    for r in table:
        cells = [f"<td class='l'>{_esc(r['config'])}</td>", f"<td>{_esc(r['ptq'])}</td>", f"<td>{r['budget']:g}</td>"]
        for k in ["uniform", *objs]:
            text = _cell(r.get(k))
            if k == "uniform" and r.get("uniform_bits") is not None:
                text += f" (W{r['uniform_bits']})"
            elif k != "uniform" and r.get(f"{k}_avg_bits"):
                text += f" ({r[f'{k}_avg_bits']['mean']:.2f} b)"
            cells.append(f"<td class='best'><b>{_esc(text)} *</b></td>" if k in r["best"] else f"<td>{_esc(text)}</td>")
        for o in objs:
            if o != "measured" and "measured" in objs:
                d = r.get(f"{o}_minus_measured") or []
                cells.append(f"<td>{_esc(', '.join(f'{100 * v:+.2f}' for v in d) or 'n/a')}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _points(mrows, config, ptq):
    """Uniform line and objective points of one (configuration, PTQ method): means over seeds."""
    mine = [r for r in mrows if r["config"] == config and r["ptq"] == ptq]
    line = []
    for b in sorted({r["budget"] for r in mine if r["point"] == "uniform"}):
        s = _stats([r["test_acc"] for r in mine if r["point"] == "uniform" and r["budget"] == b])
        line.append((b, s))
    pts = {}
    for obj in dict.fromkeys(r["point"] for r in mine if r["point"] != "uniform"):
        for budget in sorted({r["budget"] for r in mine if r["point"] == obj}):
            sel = [r for r in mine if r["point"] == obj and r["budget"] == budget]
            pts.setdefault(obj, []).append((statistics.mean(r["avg_bits"] for r in sel),
                                            _stats([r["test_acc"] for r in sel]), budget))
    return line, pts


def pareto_figures(mrows: list[dict], cfg: dict) -> list:
    """Plotly figures: per training configuration and PTQ method, test accuracy against average
    weight bits; and per PTQ method, every configuration's front in one figure."""
    from plotly import graph_objects as go

    m = cfg.get("mixed") or {}
    figs = []
    configs = list(dict.fromkeys(r["config"] for r in mrows))
    for ptq in m.get("methods", []):
        overlay = go.Figure()
        for ci, c in enumerate(configs):
            line, pts = _points(mrows, c, ptq)
            if not line and not pts:
                continue
            fig = go.Figure()
            color = _COLORS[ci % len(_COLORS)]
            for target, show in ((fig, True), (overlay, True)):
                if line:
                    target.add_trace(go.Scatter(
                        x=[b for b, _ in line], y=[100 * s["mean"] for _, s in line], mode="lines+markers",
                        name=f"{c}: uniform" if target is overlay else "uniform", line=dict(color=color),
                        error_y=dict(type="data", array=[100 * (s["std"] or 0) for _, s in line], visible=True)))
                for obj, ps in pts.items():
                    target.add_trace(go.Scatter(
                        x=[p[0] for p in ps], y=[100 * p[1]["mean"] for p in ps], mode="markers",
                        name=f"{c}: {obj}" if target is overlay else obj,
                        marker=dict(symbol=_SYMBOLS.get(obj, "circle"), size=10,
                                    color=color if target is overlay else None),
                        error_y=dict(type="data", array=[100 * (p[1]["std"] or 0) for p in ps], visible=True),
                        text=[f"budget {p[2]:g}" for p in ps]))
            fig.update_layout(height=340, title=f"{c}, {ptq}: test accuracy vs average weight bits "
                              f"(A{m.get('abits')})", xaxis_title="average weight bits (allocated layers)",
                              yaxis_title="test accuracy (%)", margin=dict(l=60, r=20, t=50, b=40))
            figs.append(fig)
        overlay.update_layout(height=380, title=f"All training configurations, {ptq}: does a training method move "
                              "the front?", xaxis_title="average weight bits (allocated layers)",
                              yaxis_title="test accuracy (%)", margin=dict(l=60, r=20, t=50, b=40))
        if overlay.data:
            figs.append(overlay)
    return figs


def bits_figure(rec: dict, cfg: dict):
    """Per model: bits chosen per layer for every (PTQ method, budget, objective), above the layer
    sensitivities at the lowest candidate bit-width. ``None`` without mixed results."""
    from plotly import graph_objects as go
    from plotly.subplots import make_subplots

    m = cfg.get("mixed") or {}
    meas = rec.get("measurements", {})
    sens = next((v["value"] for k, v in meas.items() if k.startswith("sensitivity:")), None)
    allocs = [(ptq, budget, obj, meas[name]["value"]["allocation"])
              for ptq in m.get("methods", []) for budget in m.get("budgets", []) for obj in m.get("objectives", [])
              if (name := mixed_measurement(ptq, budget, obj, m.get("kind", "avg-bits"))) in meas]
    if sens is None or not allocs:
        return None
    layers = [d["name"] for d in sorted(sens["layers"], key=lambda d: d["order"])]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("weight bits chosen (first/last fixed)",
                                        f"sensitivity at W{min(sens['bits'])} (loss increase; measured can be negative)"))
    for ptq, budget, obj, a in allocs:
        bits = {**a["fixed"], **a["bits"]}
        fig.add_trace(go.Bar(x=layers, y=[bits.get(n) for n in layers], name=f"{ptq} {budget:g} {obj}"), row=1, col=1)
    b0 = min(sens["bits"])
    for obj in ("predicted", "hawq", "measured"):
        if obj in sens:
            vals = [sens[obj][n].get(b0, sens[obj][n].get(str(b0))) for n in layers]
            fig.add_trace(go.Scatter(x=layers, y=vals, mode="lines+markers",
                                     name=f"{obj} at W{b0}", marker=dict(symbol=_SYMBOLS.get(obj, "circle"))),
                          row=2, col=1)
    fig.update_layout(height=560, barmode="group", title=f"Mixed precision: {rec.get('name', rec['id'])}",
                      margin=dict(l=60, r=20, t=60, b=80))
    return fig


def static_figures(save, mrows: list[dict], cfg: dict, records: list[dict]) -> None:
    """Matplotlib versions: ``mixed_pareto_<ptq>`` (one panel per configuration and the overlay) and
    ``mixed_bits_<model>``; ``save(fig, stem)`` writes them."""
    import matplotlib.pyplot as plt

    m = cfg.get("mixed") or {}
    configs = list(dict.fromkeys(r["config"] for r in mrows))
    for ptq in m.get("methods", []):
        if not any(r["ptq"] == ptq for r in mrows):
            continue
        fig, axes = plt.subplots(1, len(configs) + 1, figsize=(3.6 * (len(configs) + 1), 3.4), squeeze=False)
        for ci, c in enumerate(configs):
            line, pts = _points(mrows, c, ptq)
            for ax, label in ((axes[0][ci], False), (axes[0][-1], True)):
                color = f"C{ci}"
                if line:
                    ax.errorbar([b for b, _ in line], [100 * s["mean"] for _, s in line],
                                yerr=[100 * (s["std"] or 0) for _, s in line], color=color, marker="o", ms=3,
                                label=f"{c} uniform" if label else "uniform")
                for obj, ps in pts.items():
                    ax.errorbar([p[0] for p in ps], [100 * p[1]["mean"] for p in ps],
                                yerr=[100 * (p[1]["std"] or 0) for p in ps], fmt=_MARKERS.get(obj, "o"),
                                color=color if label else None, label=None if label else obj)
            axes[0][ci].set_title(f"{c}, {ptq}", fontsize=9)
            axes[0][ci].set_xlabel("average weight bits")
            axes[0][ci].legend(fontsize=7)
        axes[0][0].set_ylabel("test accuracy (%)")
        axes[0][-1].set_title(f"all configurations, {ptq} (colour: configuration)", fontsize=9)
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        save(fig, "mixed_pareto_" + "".join(ch if ch.isalnum() else "_" for ch in ptq))
    for rec in records:
        meas = rec.get("measurements", {})
        allocs = [(k.split(":", 1)[1], v["value"]["allocation"]) for k, v in meas.items()
                  if k.startswith("mixed+") and isinstance(v.get("value"), dict) and "allocation" in v["value"]]
        sens = next((v["value"] for k, v in meas.items() if k.startswith("sensitivity:")), None)
        if not allocs or sens is None:
            continue
        layers = [d["name"] for d in sorted(sens["layers"], key=lambda d: d["order"])]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(layers) + 3), 5.5), sharex=True)
        width = 0.8 / len(allocs)
        for j, (label, a) in enumerate(allocs):
            bits = {**a["fixed"], **a["bits"]}
            a1.bar([i - 0.4 + (j + 0.5) * width for i in range(len(layers))], [bits.get(n, 0) for n in layers], width,
                   label=label)
        a1.set_ylabel("weight bits")
        a1.legend(fontsize=6, ncol=2)
        b0 = min(sens["bits"])
        for obj in ("predicted", "hawq", "measured"):
            if obj in sens:
                vals = [sens[obj][n].get(b0, sens[obj][n].get(str(b0))) for n in layers]
                a2.plot(range(len(layers)), vals, marker=_MARKERS[obj], label=obj)
        shown = [v for obj in ("predicted", "hawq", "measured") if obj in sens
                 for v in (sens[obj][n].get(b0, sens[obj][n].get(str(b0))) for n in layers)]
        if shown and min(shown) > 0:
            a2.set_yscale("log")
        else:  # a measured (or predicted) increase can be negative
            a2.set_yscale("symlog", linthresh=max(max(map(abs, shown), default=1.0) * 1e-3, 1e-12))
            a2.axhline(0, color="gray", lw=0.5)
        a2.set_ylabel(f"sensitivity at W{b0}")
        a2.set_xticks(range(len(layers)))
        a2.set_xticklabels(layers, rotation=90, fontsize=7)
        a2.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "mixed_bits_" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in rec["id"]))


def section(mrows: list[dict], cfg: dict, place) -> list[str]:
    """The HTML of the section (figures through ``place(fig)``)."""
    m = cfg.get("mixed")
    if not m or not mrows:
        return []
    parts = ["<h2 id='mixed'>Mixed precision: curvature-guided bit allocation</h2>",
             "<p class='note'>" + _esc(
                 f"Per model, every layer's sensitivity at weight bits {m['bits']} on the curvature images (training "
                 "split): predicted = g.mu + (mu^T H_ll mu + Tr(H_ll Sigma))/2 from the layer's own quantization error "
                 "(block-diagonal: cross-layer terms dropped, as HAWQ does), hawq = Tr(H_ll)/n_l * ||Q(W_l) - W_l||^2 "
                 "(HAWQ-V2), measured = the loss increase with only that layer's weights quantized. An integer program "
                 f"(scipy.optimize.milp) picks one bit-width per layer minimising the summed sensitivity with the "
                 f"average weight bits of the allocated layers at most the budget ({', '.join(f'{b:g}' for b in m['budgets'])}"
                 f"); first and last layer at {cfg.get('ptq', {}).get('first_last_bits')} bits, activations at "
                 f"A{m['abits']}; then the PTQ method quantizes with those bits. Uniform: every allocated layer at one "
                 "bit-width. Test accuracy (%), mean ± std over seeds; (x b): the average bits actually used. * and "
                 "bold: the best mean of the row. The per-seed differences pair each objective with measured on the "
                 "same model; with few seeds read them, not a test.") + "</p>"]
    table = budget_table(mrows, cfg)
    parts.append(table_html(table, cfg))
    for fig in pareto_figures(mrows, cfg):
        parts.append(place(fig))
    return parts
