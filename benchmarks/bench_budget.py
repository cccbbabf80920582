"""The reconstruction's iteration budget, measured (issue 23): accuracy against steps per block.

For each trained run (e.g. SGD resnet20 on cifar10-subset, one run per seed), each
reconstruction method (AdaRound, BRECQ, QDrop) under the paper convention, each bit setting and
each number of steps per block, at the papers' fixed learning rates (``lr_rule="paper"``) and at
budget-scaled ones (``"scaled"``): validation and test accuracy, the reconstruction's wall time,
and the FP / ``rtn`` / ``rtn+bn`` rows of the same convention for reference. One JSON row per
result, written atomically after each, so that an interrupted run resumes where it stopped.
Budgets are chosen on the validation accuracy, never on test.

Usage (the CPU-feasible part of issue 23's table; a GPU runs the whole grid):

    python benchmarks/bench_budget.py RUN_S0 RUN_S1 --steps 500,2000 --out benchmarks/budget.json
    python benchmarks/bench_budget.py --table benchmarks/budget.json

Example:
    >>> rows = [{"method": "qdrop", "bits": "W4A4", "steps": 500, "lr_rule": "paper", "seed_run": "a",
    ...          "val_acc": 0.6, "test_acc": 0.61, "recon_s": 10.0}]
    >>> print(table(rows).splitlines()[2])
    | qdrop | W4A4 | 500 | paper | 60.00 (1) | 61.00 | 10 |
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dnq.data import BatchLoader
from dnq.io import atomic_write_json
from dnq.ptq import apply_ptq
from dnq.run import run_dataset
from dnq.train import evaluate, load_model

METHODS = ("adaround", "brecq", "qdrop")


def _key(r: dict) -> tuple:
    return (r["seed_run"], r["method"], r["bits"], r.get("steps"), r.get("lr_rule"))


def run(runs: list[str], steps: list[int], bits: list[str], methods: list[str], rules: list[str], out: Path,
        calib_size: int = 1024, device: str = "cpu") -> list[dict]:
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {_key(r) for r in rows}

    def save():
        atomic_write_json(out, {"command": " ".join(sys.argv), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "rows": rows})

    for rd in runs:
        model, meta = load_model(rd, torch.device(device))
        ds = run_dataset(meta).to(torch.device(device))
        val, test = BatchLoader(ds, 1000, False, split="val"), BatchLoader(ds, 1000, False)
        calib = ds.calibration_inputs(calib_size, 0)

        def score(q, val=val, test=test) -> dict:
            return {"val_acc": evaluate(q, val)[1], "test_acc": evaluate(q, test)[1]}

        for b in bits:
            w, a = int(b[1:b.upper().index("A")]), int(b[b.upper().index("A") + 1:])
            for m in ("fp", "rtn", "rtn+bn"):
                row = {"seed_run": rd, "method": m, "bits": "FP" if m == "fp" else b, "steps": None, "lr_rule": None}
                if _key(row) in done:
                    continue
                q = model if m == "fp" else apply_ptq(model, m, w, a, calib[:256], convention="paper",
                                                      range_method="mse")
                rows.append({**row, **score(q), "recon_s": None})
                done.add(_key(row))
                save()
            for n in steps:
                for rule in rules:
                    for m in methods:
                        row = {"seed_run": rd, "method": m, "bits": b, "steps": n, "lr_rule": rule}
                        if _key(row) in done:
                            continue
                        t0 = time.perf_counter()
                        q = apply_ptq(model, m, w, a, calib, convention="paper", iters=n, lr_rule=rule,
                                      range_method="mse")
                        t = time.perf_counter() - t0
                        rows.append({**row, **score(q), "recon_s": t, "weight_lr": q.ptq_recon["weight_lr"],
                                     "act_lr": q.ptq_recon["act_lr"]})
                        done.add(_key(row))
                        save()
                        print(f"{rd} {m} {b} {n} {rule}: val {rows[-1]['val_acc']:.4f} test "
                              f"{rows[-1]['test_acc']:.4f} ({t:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table: mean validation / test accuracy over the runs per (method, bits, steps, rule)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"], r.get("steps"), r.get("lr_rule")), []).append(r)
    lines = ["| method | bits | steps/block | lr rule | val acc % (runs) | test acc % | recon s |",
             "|---|---|---|---|---|---|---|"]
    for (m, b, n, rule), rs in groups.items():
        va = statistics.mean(r["val_acc"] for r in rs)
        ta = statistics.mean(r["test_acc"] for r in rs)
        t = [r["recon_s"] for r in rs if r.get("recon_s") is not None]
        lines.append(f"| {m} | {b} | {n or '-'} | {rule or '-'} | {100 * va:.2f} ({len(rs)}) | {100 * ta:.2f} | "
                     f"{statistics.mean(t):.0f} |" if t else
                     f"| {m} | {b} | {n or '-'} | {rule or '-'} | {100 * va:.2f} ({len(rs)}) | {100 * ta:.2f} | - |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders (dnq train), one per seed")
    p.add_argument("--steps", default="500,2000,5000,20000")
    p.add_argument("--bits", default="W4A4,W2A4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rules", default="paper,scaled")
    p.add_argument("--out", type=Path, default=Path("benchmarks/budget.json"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--table", type=Path, help="print the table of a results file and stop")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())["rows"]))
        return
    rows = run(a.runs, [int(s) for s in a.steps.split(",")], a.bits.split(","), a.methods.split(","),
               a.rules.split(","), a.out, device=a.device)
    print(table(rows))


if __name__ == "__main__":
    main()
