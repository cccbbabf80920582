"""Sampling error of the study's curvature: how much the Hessian trace and the top eigenvalue move
with the training images they are taken on (issue 13).

    python benchmarks/sampling_error.py MODEL_DIR... [--samples 256,512,1024,2048] [--replicates 4]
        [--matvecs 48] [--method hutch++] [--tol 1e-3] [--seed 0] [--batch 256] [--json out.json]

``MODEL_DIR`` is a trained run folder (``dnq train --out``, or ``<study>/runs/<run>/`` of a study):
its ``model.pt`` and the dataset and validation split recorded in it. For each number of images
per subset, the training split (validation images excluded) is cut into disjoint subsets with
:func:`dnq.data.training_subsets` (a seeded permutation: subset 0 holds the images a
study with ``hessian_samples`` = that number and this seed measures), and on each subset ``r``
the Hutch++ trace (``--matvecs`` products, probe seed ``seed + r``) and the top eigenvalue
(Lanczos, k = 1, ``--tol``, start seed ``seed + r``) are computed in float32, in eval mode, as the
study does. A size takes ``min(--replicates, training images // size)`` subsets and is skipped
below 2.

Per model and size it prints the mean over subsets, the between-subset standard deviation and
its ratio to the mean (relative spread), the mean of the estimator's own error (the trace's
standard error; the Lanczos residual norm of the top pair, a bound on its distance to an
eigenvalue of that subset's Hessian) and std / error: near 1, the subsets differ no more than
the estimator's own noise; well above 1, the images matter. With several models, a ``pooled``
row per size pools the between-subset variances (their mean) over the models, over their mean.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from dnq.data import training_subsets  # noqa: E402
from dnq_landscape_common.precision import full_precision  # noqa: E402
from landscape import HessianOperator, hessian_trace, top_eigenvalues  # noqa: E402
from landscape.study import spread  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 256,512, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def load(run_dir: Path):
    """The model of ``run_dir`` (eval mode, CPU) and its dataset with the run's validation split."""
    from dnq.data import load_dataset
    from dnq.train import load_model

    model, meta = load_model(run_dir, "cpu")
    return model, load_dataset(meta["data"], val_size=meta.get("val_size", 0), val_seed=meta.get("val_seed", 0))


def measure(name: str, model, ds, size: int, replicates: int, matvecs: int, method: str, tol: float, seed: int,
            batch: int, log=print) -> dict | None:
    """The row of one model and size (see the module doc); None when fewer than 2 subsets fit."""
    n_train = len(ds.x_train)
    reps = min(replicates, n_train // size)
    if reps < 2:
        log(f"{name}: {size} images per subset: only {n_train // size} disjoint subset(s) of the {n_train} training "
            "images; skipped")
        return None
    t0 = time.perf_counter()
    traces, eigs = [], []
    for r, (_idx, batches) in enumerate(training_subsets(ds, size, reps, seed, batch)):
        with full_precision():
            op = HessianOperator(model, nn.functional.cross_entropy, batches)
            t = hessian_trace(op, matvecs, method, seed=seed + r)
            e = top_eigenvalues(op, k=1, tol=tol, seed=seed + r)
        traces.append({"value": t.value, "std_error": t.std_error, "engines": getattr(t, "engines", {})})
        eigs.append({"value": e.eigenvalues[0], "residual_norm": e.residual_norms[0], "converged": e.converged,
                     "num_matvecs": e.num_matvecs, "engines": getattr(e, "engines", {})})
        log(f"{name}: {size} images, subset {r + 1}/{reps}: trace {t.value:.5g} ± {t.std_error:.2g}, top eigenvalue "
            f"{e.eigenvalues[0]:.5g} (residual {e.residual_norms[0]:.2g}, {e.num_matvecs} products), "
            f"{time.perf_counter() - t0:.0f} s so far")
    return {"model": name, "samples": size, "subsets": reps, "train_images": n_train,
            "trace": spread([t["value"] for t in traces], [t["std_error"] for t in traces]),
            "top_eigenvalue": spread([e["value"] for e in eigs], [e["residual_norm"] for e in eigs]),
            "replicates": {"trace": traces, "top_eigenvalue": eigs}, "wall_s": time.perf_counter() - t0}


def pooled(rows: list[dict]) -> list[dict]:
    """Per size over the models: the mean of their means, the root of the mean of their
    between-subset variances (the pooled std), the mean estimator error."""
    out = []
    for size in sorted({r["samples"] for r in rows}):
        mine = [r for r in rows if r["samples"] == size]
        if len(mine) < 2:
            continue
        row = {"model": f"pooled ({len(mine)} models)", "samples": size, "subsets": sum(r["subsets"] for r in mine),
               "wall_s": sum(r["wall_s"] for r in mine)}
        for q in ("trace", "top_eigenvalue"):
            mean = statistics.fmean(r[q]["mean"] for r in mine)
            std = math.sqrt(statistics.fmean(r[q]["std"] ** 2 for r in mine))
            err = statistics.fmean(r[q]["mean_estimator_error"] for r in mine)
            row[q] = {"mean": mean, "std": std, "relative_spread": std / abs(mean) if mean else None,
                      "min_max_ratio": None, "mean_estimator_error": err, "spread_to_error": std / err if err else None}
        out.append(row)
    return out


def _g(v, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows``."""
    head = ("| model | images per subset | subsets | trace mean | between-subset std | relative spread | mean SE | "
            "std / SE | λmax mean | between-subset std | relative spread | mean residual | std / residual | wall |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        t, e = r["trace"], r["top_eigenvalue"]
        lines.append(f"| {r['model']} | {r['samples']} | {r['subsets']} | {_g(t['mean'])} | {_g(t['std'])} | "
                     f"{_g(100 * t['relative_spread'], '.1f')}% | {_g(t['mean_estimator_error'])} | "
                     f"{_g(t['spread_to_error'], '.2f')} | {_g(e['mean'])} | {_g(e['std'])} | "
                     f"{_g(100 * e['relative_spread'], '.1f')}% | {_g(e['mean_estimator_error'], '.2g')} | "
                     f"{_g(e['spread_to_error'], '.3g')} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL_DIR", help="trained run folders (with model.pt)")
    p.add_argument("--samples", type=_ints, default=[256, 512, 1024, 2048], help="images per subset (comma list)")
    p.add_argument("--replicates", type=int, default=4, help="disjoint subsets per size (at most)")
    p.add_argument("--matvecs", type=int, default=48, help="Hutch++ products per trace")
    p.add_argument("--method", default="hutch++", choices=["hutch++", "hutchinson"])
    p.add_argument("--tol", type=float, default=1e-3, help="Lanczos tolerance of the top eigenvalue")
    p.add_argument("--seed", type=int, default=0, help="seed of the image permutation (and of subset 0's probes)")
    p.add_argument("--batch", type=int, default=256, help="images per batch of a product")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write every row, with each subset's numbers")
    a = p.parse_args(argv)
    if a.replicates < 2:
        p.error("--replicates must be at least 2 (a spread needs two subsets)")
    if a.threads:
        torch.set_num_threads(a.threads)
    missing = [str(d) for d in a.models if not (d / "model.pt").is_file()]
    if missing:
        p.error(f"no model.pt in {', '.join(missing)}; give trained run folders (e.g. runs/cifar10-subset/runs/...)")
    from dnq.io import atomic_write_json

    settings = ({k: v for k, v in vars(a).items() if k not in ("models", "json")}
                | {"models": [str(m) for m in a.models]})
    models = {d: load(d) for d in a.models}
    rows = []
    for size in a.samples:  # every model at a size before the next size: an interrupted run keeps whole sizes
        for d, (model, ds) in models.items():
            row = measure(d.name, model, ds, size, a.replicates, a.matvecs, a.method, a.tol, a.seed, a.batch,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
            if row is None:
                continue
            rows.append(row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
            if a.json is not None:  # rewritten after every row
                atomic_write_json(a.json, {"settings": settings, "rows": rows, "pooled": pooled(rows)})
    print(table(rows + pooled(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
