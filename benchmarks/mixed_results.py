"""Markdown tables of a study's mixed-precision results (issue 12), for BENCHMARKS.md.

    python benchmarks/mixed_results.py runs/digits-mixed [--configs sgd,dnq-lam1]

Prints, per PTQ method, the test accuracy (%) at each budget for the uniform bit-width within it
and each objective (mean ± std over seeds, the average bits used), each objective's per-seed
difference to ``measured``, and the sensitivity's cost per model in gradient-equivalents (seconds
of the sensitivity over the seconds of one gradient on the same images, measured in the same call).
Reads the study's records only (run ``landscape report`` for the figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from landscape.report.mixed import budget_table, mixed_rows  # noqa: E402
from landscape.study import load_records, read_study_json  # noqa: E402


def _cell(s) -> str:
    if s is None:
        return "n/a"
    return f"{100 * s['mean']:.2f}" + ("" if s["std"] is None else f" ± {100 * s['std']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--configs", default=None, help="comma list of training configurations to show (default: all)")
    a = p.parse_args(argv)
    cfg = read_study_json(Path(a.study) / "study.json")["config"]
    records = load_records(a.study)
    keep = None if a.configs is None else set(a.configs.split(","))
    records = [r for r in records if keep is None or r.get("config") in keep]
    rows = mixed_rows(records, cfg)
    table = budget_table(rows, cfg)
    objs = cfg["mixed"]["objectives"]
    for ptq in cfg["mixed"]["methods"]:
        mine = [t for t in table if t["ptq"] == ptq]
        if not mine:
            continue
        print(f"\n### {ptq}, A{cfg['mixed']['abits']}\n")
        print("| training | seeds | budget | uniform | " + " | ".join(objs) + " | "
              + " | ".join(f"{o} − measured (per seed)" for o in objs if o != "measured") + " |")
        print("|" + "---|" * (4 + len(objs) + len([o for o in objs if o != "measured"])))
        for t in mine:
            n = (t.get(objs[0]) or {}).get("n")
            cells = [f"{_cell(t['uniform'])} (W{t['uniform_bits']})"]
            for o in objs:
                bits = t.get(f"{o}_avg_bits")
                cells.append(_cell(t.get(o)) + ("" if not bits else f" ({bits['mean']:.2f} b)"))
            diffs = [", ".join(f"{100 * d:+.2f}" for d in t.get(f"{o}_minus_measured") or []) for o in objs
                     if o != "measured"]
            print(f"| {t['config']} | {n} | {t['budget']:g} | " + " | ".join(cells + diffs) + " |")
    print("\n### sensitivity cost per model\n")
    print("| model | range | curvature (s) | gradient-equivalents | measured (s) | gradient-equivalents | "
          "products + forms |")
    print("|---|---|---|---|---|---|---|")
    ge = []
    for rec in records:
        for k, v in rec["measurements"].items():
            if k.startswith("sensitivity:"):
                c = v["value"]["cost"]
                ge.append(c["curvature_gradient_equivalents"])
                print(f"| {rec['id']} | {k.split(':')[1]} | {c['curvature_s']:.1f} | "
                      f"{c['curvature_gradient_equivalents']:.0f} | {c.get('measured_s', float('nan')):.1f} | "
                      f"{c.get('measured_gradient_equivalents', float('nan')):.0f} | "
                      f"{c['matvecs']} + {c['quadratic_forms']} |")
    if ge:
        print(f"\ncurvature gradient-equivalents: median {statistics.median(ge):.0f}, "
              f"range {min(ge):.0f}-{max(ge):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
