"""Same-process A/B of the instruments: a commit's ``landscape`` (imported as ``landscape_old``)
against this tree's, interleaved, on resnet20 at initialization (two batches of 32 random 32x32
images, 2 threads). Issue 22 used it to check that the CUDA-graph, device-checksum and planner
changes made nothing slower on the CPU and changed no number (BENCHMARKS.md, "Instruments on CUDA").

    mkdir -p /tmp/oldpkg && git archive 8414777 landscape | tar -x -C /tmp/oldpkg \\
        && mv /tmp/oldpkg/landscape /tmp/oldpkg/landscape_old
    PYTHONPATH=/tmp/oldpkg:. python benchmarks/ab_landscape.py --rounds 5            # old operators made first
    PYTHONPATH=/tmp/oldpkg:. python benchmarks/ab_landscape.py --rounds 7 --new-first
    PYTHONPATH=/tmp/oldpkg:. python benchmarks/ab_landscape.py --cold 6              # cold operators, whole tasks

Prints JSON: per engine and block, the median seconds per vector of each and the median of the
per-round ratios new / old with their range; then the estimates of both with a fixed seed and
whether they are identical (or, with ``--cold``, the wall time of whole tasks on cold operators).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

import landscape
from dnq.models import build_model

ENGINES = ("fwd-rev", "rev-rev", "cached", "taylor")


def _setup():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    return model, data


def products(libs: dict, rounds: int) -> dict:
    """ms per vector of every engine at blocks 1 and 4 (Taylor quadratic forms at 4), interleaved."""
    model, data = _setup()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, generator=torch.Generator().manual_seed(2))
    ops = {}
    for name, lib in libs.items():
        for eng in ENGINES[:3]:
            ops[(eng, name)] = lib.HessianOperator(model, F.cross_entropy, data, method=eng)
            for k in (1, 4):
                ops[(eng, name)].matmat(V[:, :k])  # warm-up (and the cached graphs)
        ops[("taylor", name)] = lib.HessianOperator(model, F.cross_entropy, data, quadratic="taylor")
        ops[("taylor", name)].quadratic_forms(V)
    blocks = {e: (4,) if e == "taylor" else (1, 4) for e in ENGINES}
    t = {(e, k, n): [] for e in ENGINES for k in blocks[e] for n in libs}
    for r in range(rounds):
        order = list(libs) if r % 2 == 0 else list(libs)[::-1]
        for e in ENGINES:
            for k in blocks[e]:
                for n in order:
                    op = ops[(e, n)]
                    t0 = time.perf_counter()
                    op.matmat(V[:, :k]) if e != "taylor" else op.quadratic_forms(V)
                    t[(e, k, n)].append((time.perf_counter() - t0) / k)
    out = {}
    for e in ENGINES:
        for k in blocks[e]:
            a, b = t[(e, k, "old")], t[(e, k, "new")]
            ratios = [y / x for x, y in zip(a, b)]
            out[f"{e}@{k}"] = {"old_s": statistics.median(a), "new_s": statistics.median(b),
                               "ratio_new_old_median": statistics.median(ratios),
                               "ratio_min_max": [min(ratios), max(ratios)]}
    return out


def estimates(libs: dict) -> dict:
    """Each version's estimates with a fixed seed on a cold operator, and whether they are identical."""
    model, data = _setup()
    vals = {}
    for n, lib in libs.items():
        op = lib.HessianOperator(model, F.cross_entropy, data)
        t0 = time.perf_counter()
        vals[n] = {"trace": lib.hessian_trace(op, 8, method="hutchinson", seed=0).value,
                   "eig": lib.top_eigenvalues(op, k=2, tol=1e-3, seed=0).eigenvalues,
                   "slq_m2": lib.spectral_density(op, num_runs=1, lanczos_steps=8, seed=0).moment(2),
                   "hutchpp": lib.hessian_trace(op, 12, method="hutch++", seed=0).value,
                   "s": time.perf_counter() - t0,
                   "plan": {k: (c["engine"], c["how"], c.get("block")) for k, c in op.planner.to_dict().items()}}
    return {"values": vals, "identical": {k: vals["old"][k] == vals["new"][k] for k in ("trace", "eig", "slq_m2",
                                                                                         "hutchpp")}}


def cold(libs: dict, rounds: int) -> dict:
    """Wall seconds of Hutchinson (8), top-2 eigenvalues and SLQ (8 steps) on a cold operator, alternately."""
    model, data = _setup()
    t = {"old": [], "new": []}
    for r in range(rounds):
        for n in (("old", "new") if r % 2 == 0 else ("new", "old")):
            lib = libs[n]
            op = lib.HessianOperator(model, F.cross_entropy, data)
            t0 = time.perf_counter()
            lib.hessian_trace(op, 8, method="hutchinson", seed=0)
            lib.top_eigenvalues(op, k=2, tol=1e-3, seed=0)
            lib.spectral_density(op, num_runs=1, lanczos_steps=8, seed=0)
            t[n].append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(t["old"], t["new"])]
    return {"old": t["old"], "new": t["new"], "ratio_median": statistics.median(ratios), "ratios": ratios}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-first", action="store_true", help="make the new operators first")
    p.add_argument("--cold", type=int, default=0, metavar="ROUNDS", help="time whole tasks on cold operators")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    old = importlib.import_module("landscape_old")
    libs = {"new": landscape, "old": old} if a.new_first else {"old": old, "new": landscape}
    if a.cold:
        print(json.dumps(cold(libs, a.cold)))
        return
    print(json.dumps({"products": products(libs, a.rounds), **estimates(libs)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
