"""FP and PTQ accuracy of every training method on digits, over several seeds, compared fairly.

The rules (issue 9):

* every model gets the same BatchNorm rule (recomputed on the clean final weights over the
  training loader, the trainer's default), the same PTQ (symmetric per-channel weights, asymmetric
  per-tensor activations, min-max ranges, first/last layer at 8 bits, BatchNorm folded, 256
  calibration images from the training split) in two variants, ``rtn`` and ``rtn+bn`` (BatchNorm
  statistics re-estimated on the calibration images through the quantized model), the same data
  splits (a fixed 20% validation split held out of training) and the same budget (epochs);
* noise methods (``dnq``, ``dnq-w``, ``dnq-a``, ``gaussian``, ``gaussian-iso``) are trained once
  per column's bit-width (their noise models that target's error); ``sgd`` and ``sam`` once;
* strengths are chosen on validation, never on test: for each method, column and PTQ variant the
  value of ``--dnq-lambdas`` / ``--gaussian-lambdas`` / ``--sam-rhos`` with the best mean
  validation accuracy over seeds after that PTQ; the ablations run at lambda 1;
* comparisons of ``dnq`` with ``sgd``, ``gaussian`` and ``sam`` are paired by seed (same data
  order and initialization): mean difference of test accuracy, a 95% t-interval, a paired t-test,
  and Holm-adjusted p-values over every comparison printed.

    python benchmarks/digits_methods.py --seeds 0,1,2,3,4 --epochs 20 --out runs/digits_methods

Rerunning reuses finished runs (``model.pt``) and their PTQ numbers (``ptq.json`` of this script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from dnq.data import BatchLoader, load_dataset
from dnq.io import atomic_write_json
from dnq.quant import parse_bits, quantize
from dnq.train import TrainConfig, evaluate, load_model, train
from dnq_landscape_common.precision import full_precision
from dnq_landscape_common.stats import seed_stats
from landscape.regress import holm

NOISE = ("dnq", "dnq-w", "dnq-a", "gaussian", "gaussian-iso")
VARIANTS = ("rtn", "rtn+bn")


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def grid(method: str, a) -> list[tuple[str, float]]:
    """The (setting name, value) pairs a method is trained with."""
    if method == "dnq":
        return [("lambda_max", v) for v in _floats(a.dnq_lambdas)]
    if method == "gaussian":
        return [("lambda_max", v) for v in _floats(a.gaussian_lambdas)]
    if method == "sam":
        return [("sam_rho", v) for v in _floats(a.sam_rhos)]
    return [("lambda_max", 1.0)] if method in NOISE else [("none", 0.0)]


def measure(run: Path, settings, calib_size: int = 256) -> dict:
    """FP and PTQ (both variants) accuracy of a finished run, on validation and test; cached."""
    cache = run / "bench_ptq.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model, meta = load_model(run)
    ds = load_dataset(meta["data"], val_size=meta["val_size"], val_seed=meta["val_seed"])
    calib = ds.calibration_inputs(calib_size, 0)
    loaders = {s: BatchLoader(ds, 1024, False, split=s) for s in ("val", "test")}

    def acc(m):
        return {s: evaluate(m, ld)[1] for s, ld in loaders.items()}

    with full_precision():
        out = {"fp": acc(model)}
        for w, b in settings:
            for v in VARIANTS:
                q = quantize(model, w, b, calib, first_last_bits=8, bn_reestimate=v == "rtn+bn")
                out[f"W{w}A{b}:{v}"] = acc(q)
    atomic_write_json(cache, out)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--bits", default="W4A4,W3A3,W2A4")
    p.add_argument("--methods", default="sgd,dnq,dnq-w,dnq-a,gaussian,gaussian-iso,sam")
    p.add_argument("--dnq-lambdas", default="0.5,1,2")
    p.add_argument("--gaussian-lambdas", default="0.5,1,2")
    p.add_argument("--sam-rhos", default="0.02,0.05,0.1,0.3")
    p.add_argument("--extra", default="", help="extra TrainConfig settings as JSON, e.g. '{\"lambda_warmup\": 0}'")
    p.add_argument("--out", default="runs/digits_methods")
    return p


def _train_and_measure(a, methods, names, settings, seeds, out_root) -> dict:
    """Every (method, setting, value, target, seed) trained (unless its model.pt exists) and measured."""
    extra = json.loads(a.extra) if a.extra else {}
    res: dict = {}  # (method, key, value, target, seed) -> measurements
    t0 = time.perf_counter()
    for method in methods:
        targets = names if method in NOISE else [names[0]]
        for key, value in grid(method, a):
            for target in targets:
                (tw, ta), = parse_bits(target)
                for seed in seeds:
                    tag = "" if key == "none" else f"-{key.split('_')[0]}{value:g}"
                    run = out_root / f"{method}{tag}-{target}-s{seed}"
                    if not (run / "model.pt").is_file():
                        kw = {} if key == "none" else {key: value}
                        train(TrainConfig(data="digits", model="cnn-digits", method=method, wbits=tw, abits=ta,
                                          epochs=a.epochs, seed=seed, out=str(run), **kw, **extra),
                              quiet=True, overwrite=True)
                    res[(method, key, value, target, seed)] = measure(run, settings)
            print(f"{method} {key}={value:g} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return res


def _ms(vals) -> str:
    """``mean ± std`` in percent over seeds (:func:`dnq_landscape_common.stats.seed_stats`; one seed: ± n/a)."""
    s = seed_stats(vals)
    return f"{100 * s['mean']:.2f} ± " + ("n/a" if s["std"] is None else f"{100 * s['std']:.2f}")


def _accuracy_tables(a, methods, names, chosen, cells) -> list[str]:
    lines = [f"digits, cnn-digits, {a.epochs} epochs, seeds {a.seeds}; test accuracy (%) mean ± std over seeds; "
             "strength chosen on validation per cell (in brackets)", ""]
    for v in VARIANTS:
        lines.append(f"PTQ variant {v}")
        lines.append("| method | FP val | FP test | " + " | ".join(names) + " |")
        lines.append("|---|---|---|" + "---|" * len(names))
        for method in methods:
            kv0 = chosen[(method, names[0], v)]
            fp = cells(method, *kv0, names[0])
            row = [method, _ms([r["fp"]["val"] for r in fp]), _ms([r["fp"]["test"] for r in fp])]
            for column in names:
                kv = chosen[(method, column, v)]
                c = _ms([r[f"{column}:{v}"]["test"] for r in cells(method, *kv, column)])
                row.append(c + (f" [{kv[0].split('_')[0][:3]} {kv[1]:g}]"
                                if kv[0] != "none" and len(grid(method, a)) > 1 else ""))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _paired(d_cells, b_cells, key: str) -> dict:
    """dnq minus a baseline on one column, paired by seed: mean, 95% t-interval, paired t-test."""
    diff = np.array([x[key]["test"] - y[key]["test"] for x, y in zip(d_cells, b_cells)])
    n = len(diff)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    t = stats.t.ppf(0.975, n - 1) if n > 1 else float("nan")
    p_val = float(stats.ttest_rel([x[key]["test"] for x in d_cells],
                                  [y[key]["test"] for y in b_cells]).pvalue) if se > 0 else (1.0 if mean == 0 else 0.0)
    return {"mean_diff": mean, "ci": (mean - t * se, mean + t * se), "p": p_val, "n": n}


def _comparisons(methods, names, chosen, cells) -> tuple[list[dict], list[str]]:
    """dnq against each baseline per (PTQ variant, column), Holm-adjusted over all of them."""
    comps = []
    for v in VARIANTS:
        for column in names:
            d_cells = cells("dnq", *chosen[("dnq", column, v)], column)
            for base in ("sgd", "gaussian", "sam"):
                if base not in methods or "dnq" not in methods:
                    continue
                b_cells = cells(base, *chosen[(base, column, v)], column)
                comps.append({"variant": v, "bits": column, "baseline": base,
                              **_paired(d_cells, b_cells, f"{column}:{v}")})
    if not comps:
        return comps, []
    for c, q in zip(comps, holm([c["p"] for c in comps])):
        c["p_holm"] = float(q)
    lines = [f"dnq minus baseline, test accuracy (points), paired by seed; 95% t-interval; paired t-test; "
             f"Holm over the {len(comps)} comparisons",
             "| variant | bits | baseline | mean diff | 95% CI | p | p (Holm) |", "|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['variant']} | {c['bits']} | {c['baseline']} | {100 * c['mean_diff']:+.2f} | "
                     f"[{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}] | {c['p']:.3g} | {c['p_holm']:.3g} |")
    return comps, lines


def main(argv=None):
    a = _parser().parse_args(argv)
    torch.set_num_threads(2)
    seeds = [int(s) for s in a.seeds.split(",")]
    settings = parse_bits(a.bits)
    names = [f"W{w}A{b}" for w, b in settings]
    methods = a.methods.split(",")
    out_root = Path(a.out)
    res = _train_and_measure(a, methods, names, settings, seeds, out_root)

    def cells(method, key, value, column):
        """Per-seed measurements of the model a column uses (noise methods: trained for the column)."""
        target = column if method in NOISE else names[0]
        return [res[(method, key, value, target, s)] for s in seeds]

    # selection on validation: per method, column and variant
    chosen = {}
    for method in methods:
        for column in names:
            for v in VARIANTS:
                chosen[(method, column, v)] = max(grid(method, a), key=lambda kv: statistics.mean(
                    r[f"{column}:{v}"]["val"] for r in cells(method, *kv, column)))
    comps, comp_lines = _comparisons(methods, names, chosen, cells)
    text = "\n".join(_accuracy_tables(a, methods, names, chosen, cells) + comp_lines)
    print(text)
    atomic_write_json(out_root / "results.json", {
        "args": vars(a), "runs": [{"method": k[0], "setting": k[1], "value": k[2], "target": k[3], "seed": k[4], **r}
                                  for k, r in res.items()],
        "chosen": [{"method": k[0], "bits": k[1], "variant": k[2], "setting": kv[0], "value": kv[1]}
                   for k, kv in chosen.items()],
        "comparisons": comps, "table": text})


if __name__ == "__main__":
    main()
