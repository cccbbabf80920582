"""Cost of a 2-D surface point against one bare eager forward pass and against loss-landscapes.

One command, one run, interleaved rounds (A B C A B C ...) so that every tool sees the same
machine state. Per workload and round:

* ``eager forward``: the user's model as given, ``model.eval()``, ``torch.inference_mode()``, one
  forward pass over the same batches the surface gets (no loss: the bare floor); the median of
  ``--forwards`` passes. Also a pass over the batches merged into one, for reference.
* ``ours, compile=True``: ``landscape.surface_2d`` (folded BatchNorm, channels_last, the compiled
  forward); seconds per point excluding the one-time compile cost, which is reported separately
  (``engine["compile"]["timings"]["compile_s"]``). Everything else (the planner's timing of the
  batching, the origin, loss and accuracy) is included.
* ``ours, auto``: the default arguments (at these grid sizes the rule does not compile).
* ``loss-landscapes``: ``loss_landscapes.random_plane`` with the same steps, on all the images in
  one batch (its ``Loss`` metric), as documented (it evaluates with autograd enabled); its
  filter normalization divides by zero on BatchNorm layers at initialization, where this falls
  back to its model normalization (the cost per point does not depend on it).

Ratios are medians over rounds of the per-round ratios: ours / eager forward (issue 13 target:
<= 0.6) and loss-landscapes / ours (target: >= 2).

    python benchmarks/bench_surface.py [--rounds 3] [--json out.json] [--skip-resnet]
                                       [--resnet-images 128,512] [--steps 7] [--threads 2]

Workloads: cnn-digits (trained ``--epochs`` epochs with SGD, seed 0) on all 1,797 digits images in
batches of 256; resnet20 at initialization on the first 128 (and 512) 32x32 images of
../shared/data/cifar10-subset.npz when present, else random images, in one batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import landscape
from dnq.data import load_dataset
from dnq.models import build_model

warnings.filterwarnings("ignore")
CE = nn.functional.cross_entropy
ROOT = Path(__file__).resolve().parents[1]


def digits_workload(epochs: int):
    from dnq.train import TrainConfig, load_model, train

    if epochs > 0:
        with tempfile.TemporaryDirectory() as d:
            train(TrainConfig(data="digits", model="cnn-digits", method="sgd", epochs=epochs, seed=0, out=d + "/run"),
                  quiet=True)
            model, _ = load_model(d + "/run")
    else:
        torch.manual_seed(0)
        model = build_model("cnn-digits", 10, 1, 8)
    ds = load_dataset("digits")
    x = torch.cat([ds.normalize(ds.x_train), ds.normalize(ds.x_test)])
    y = torch.cat([ds.y_train, ds.y_test])
    return model.eval(), list(zip(x.split(256), y.split(256)))


def resnet_workload(n: int):
    npz = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
    ds = load_dataset(f"npz:{npz}" if npz.is_file() else f"synthetic:10:{max(n, 256)}")
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    return model, [(ds.normalize(ds.x_train[:n]), ds.y_train[:n])], ("cifar10-subset" if npz.is_file() else "random")


def eager_forward(model, batches, repeat: int) -> float:
    """Median seconds of one bare forward pass over ``batches`` (after one warm-up pass)."""
    model.eval()
    ts = []
    with torch.inference_mode():
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            for x, _ in batches:
                model(x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])


def ours(model, batches, dirs, steps: int, **kw) -> dict:
    t0 = time.perf_counter()
    s = landscape.surface_2d(model, CE, batches, dirs, steps=steps, **kw)
    wall = time.perf_counter() - t0
    comp = s.engine.get("compile", {}).get("timings", {}).get("compile_s", 0.0)
    return {"per_point": (wall - comp) / s.num_points, "compile_s": comp, "wall_s": wall,
            "engine": s.engine["surface"]["engine"], "batching": s.engine["batching"]["engine"],
            "center_loss": s.center_loss}


def loss_landscapes_plane(model, batches, steps: int) -> dict:
    import loss_landscapes
    import loss_landscapes.metrics

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    metric = loss_landscapes.metrics.Loss(CE, x, y)
    m = copy.deepcopy(model).eval()
    norm = "filter"
    t0 = time.perf_counter()
    try:
        loss_landscapes.random_plane(m, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True)
    except ZeroDivisionError:  # its filter normalization on a BatchNorm layer at initialization
        norm = "model"
        t0 = time.perf_counter()
        loss_landscapes.random_plane(m, metric, distance=1, steps=steps, normalization="model", deepcopy_model=True)
    return {"per_point": (time.perf_counter() - t0) / steps ** 2, "normalization": norm}


def bench(name, model, batches, steps, rounds, forwards, have_ll, out):
    n = sum(len(b[1]) for b in batches)
    merged = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    dirs = landscape.random_directions(model, 2, seed=0)
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters())} parameters, {n} samples in {len(batches)} "
          f"batch(es), {steps}x{steps} grid, {rounds} interleaved rounds")
    rows = []
    for r in range(rounds):
        row = {"workload": name, "round": r + 1}
        row["eager_s"] = eager_forward(model, batches, forwards)
        row["eager_merged_s"] = eager_forward(model, merged, forwards) if len(batches) > 1 else row["eager_s"]
        row["ours_compiled"] = ours(model, batches, dirs, steps, compile=True)
        row["ours_auto"] = ours(model, batches, dirs, steps)
        if have_ll:
            row["loss_landscapes"] = loss_landscapes_plane(model, batches, steps)
        e = row["eager_s"]
        c, a = row["ours_compiled"], row["ours_auto"]
        line = (f"  round {r + 1}: eager forward {1e3 * e:.2f} ms (merged {1e3 * row['eager_merged_s']:.2f}); "
                f"ours compiled {1e3 * c['per_point']:.2f} ms/pt = {c['per_point'] / e:.2f}x "
                f"(+ compile {c['compile_s']:.1f} s once; {c['batching']} batches); "
                f"ours auto ({a['engine']}) {1e3 * a['per_point']:.2f} ms/pt = {a['per_point'] / e:.2f}x")
        if have_ll:
            ll = row["loss_landscapes"]
            line += (f"; loss-landscapes {1e3 * ll['per_point']:.2f} ms/pt = {ll['per_point'] / e:.2f}x "
                     f"({ll['normalization']} norm.), {ll['per_point'] / c['per_point']:.2f}x ours compiled")
        print(line, flush=True)
        rows.append(row)
    med = statistics.median
    summary = {
        "workload": name, "samples": n, "steps": steps, "rounds": rounds,
        "eager_forward_ms": 1e3 * med(r["eager_s"] for r in rows),
        "eager_forward_merged_ms": 1e3 * med(r["eager_merged_s"] for r in rows),
        "ours_compiled_ms_per_point": 1e3 * med(r["ours_compiled"]["per_point"] for r in rows),
        "compile_s": med(r["ours_compiled"]["compile_s"] for r in rows),
        "ours_auto_ms_per_point": 1e3 * med(r["ours_auto"]["per_point"] for r in rows),
        "ours_auto_engine": rows[-1]["ours_auto"]["engine"],
        "ratio_compiled_vs_eager": med(r["ours_compiled"]["per_point"] / r["eager_s"] for r in rows),
        "ratio_compiled_vs_best_eager": med(r["ours_compiled"]["per_point"] / min(r["eager_s"], r["eager_merged_s"])
                                            for r in rows),
        "ratio_auto_vs_eager": med(r["ours_auto"]["per_point"] / r["eager_s"] for r in rows),
    }
    if have_ll:
        summary["loss_landscapes_ms_per_point"] = 1e3 * med(r["loss_landscapes"]["per_point"] for r in rows)
        summary["ratio_ll_vs_compiled"] = med(r["loss_landscapes"]["per_point"] / r["ours_compiled"]["per_point"]
                                              for r in rows)
        summary["ratio_ll_vs_auto"] = med(r["loss_landscapes"]["per_point"] / r["ours_auto"]["per_point"] for r in rows)
    s = summary
    print(f"  median: ours compiled / eager forward {s['ratio_compiled_vs_eager']:.2f} "
          f"(vs the faster of given/merged: {s['ratio_compiled_vs_best_eager']:.2f}; target <= 0.6: "
          f"{'met' if s['ratio_compiled_vs_eager'] <= 0.6 else 'NOT met'}), ours auto / eager "
          f"{s['ratio_auto_vs_eager']:.2f}, compile {s['compile_s']:.1f} s"
          + (f"; loss-landscapes / ours compiled {s['ratio_ll_vs_compiled']:.2f} (target >= 2: "
             f"{'met' if s['ratio_ll_vs_compiled'] >= 2 else 'NOT met'}), / ours auto {s['ratio_ll_vs_auto']:.2f}"
             if have_ll else ""))
    out.append({"summary": summary, "rounds": rows})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write every round and the summaries here")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=7, help="grid points each way (default 7: 49 points)")
    p.add_argument("--forwards", type=int, default=5, help="eager forward passes per round (median)")
    p.add_argument("--epochs", type=int, default=10, help="SGD epochs of the digits CNN (0: at initialization)")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--resnet-images", default="128", help="comma-separated image counts for resnet20")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a shared machine)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.steps < 2 or a.forwards < 1 or a.threads < 1:
        p.error("--rounds, --forwards and --threads must be >= 1, --steps >= 2")
    torch.set_num_threads(a.threads)
    try:
        import loss_landscapes  # noqa: F401

        have_ll = True
    except ImportError:
        have_ll = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; loss-landscapes "
          f"{'present' if have_ll else 'not installed (pip install loss-landscapes==3.0.6)'}")
    out = []
    if not a.skip_digits:
        model, batches = digits_workload(a.epochs)
        bench("cnn-digits, 1797 digits", model, batches, a.steps, a.rounds, a.forwards, have_ll, out)
    if not a.skip_resnet:
        for n in (int(v) for v in a.resnet_images.split(",")):
            model, batches, src = resnet_workload(n)
            bench(f"resnet20, {n} images ({src})", model, batches, a.steps, a.rounds, a.forwards, have_ll, out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=float))
    return out


if __name__ == "__main__":
    main()
