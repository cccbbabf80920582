"""Curvature and surface instruments side by side with PyHessian, curvlinops and loss-landscapes.

One command, one run. Every time is also given in gradient-equivalents: the median time of one
full-data gradient (forward + backward over all batches) measured in the same run, so the
figures survive a noisy machine. Accuracy is against a reference computed here in float64
with our Lanczos at a tight tolerance, cross-checked with SciPy's ARPACK (to 1e-7).

    python benchmarks/bench_instruments.py [--json out.json] [--skip-resnet]

Workloads: the digits CNN (cnn-digits, 14,458 parameters, trained 30 epochs with SGD, seed 0)
on all 1,797 digits images in batches of 256; resnet20 at initialization on a batch of 128
32x32 images (the CIFAR-10 subset in ../shared when present, else random images).
hessian-eigenthings is not on PyPI and cannot be installed here; it is left out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import landscape
from dnq.data import load_dataset
from dnq.models import build_model
from dnq.train import TrainConfig, load_model, train

warnings.filterwarnings("ignore")
CE = nn.functional.cross_entropy
ROOT = Path(__file__).resolve().parents[1]
# glibc returns large freed blocks to the OS, so every big tensor costs fresh page faults; PyTorch's CPU
# tuning guide suggests jemalloc/tcmalloc for the same reason
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "8589934592"}


DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def grad_time(model, batches, repeat=7):
    n = sum(len(b[1]) for b in batches)
    ts = []
    for _ in range(repeat + 1):
        model.zero_grad()
        sync()
        t0 = time.perf_counter()
        for x, y in batches:
            (CE(model(x), y) * (len(y) / n)).backward()
        sync()
        ts.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(ts[1:])


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def digits_workload():
    with tempfile.TemporaryDirectory() as d:
        train(TrainConfig(data="digits", model="cnn-digits", method="sgd", epochs=30, seed=0, out=d + "/run"),
              quiet=True)
        model, _ = load_model(d + "/run")
    ds = load_dataset("digits")
    x = torch.cat([ds.normalize(ds.x_train), ds.normalize(ds.x_test)])
    y = torch.cat([ds.y_train, ds.y_test])
    return model.eval().to(DEVICE), [(a.to(DEVICE), b.to(DEVICE)) for a, b in zip(x.split(256), y.split(256))]


def resnet_workload():
    npz = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
    ds = load_dataset(f"npz:{npz}" if npz.is_file() else "synthetic:10:256")
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval().to(DEVICE)
    batch = (ds.normalize(ds.x_train[:128]).to(DEVICE), ds.y_train[:128].to(DEVICE))
    return model, [batch], ("cifar10-subset" if npz.is_file() else "random")


def run(name, model, batches, rows, surface_steps, do_eigs=True):
    import pyhessian
    try:  # the bench extra; the GPU machine may have only the dev extra (PyHessian)
        from curvlinops import HessianLinearOperator, hutchinson_trace
    except ImportError:
        HessianLinearOperator = hutchinson_trace = None
        print("  curvlinops is not installed: its rows are left out")
    from scipy.sparse.linalg import eigsh

    g = grad_time(model, batches)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    g_cl = grad_time(cl, [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches])
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{sum(len(b[1]) for b in batches)} samples; one gradient = {1e3 * g:.1f} ms "
          f"(the unit; with a channels-last copy of the model: {1e3 * g_cl:.1f} ms)")

    def add(task, tool, seconds, value=None, err=None, note="", per=1, engines=None):
        eng = "" if engines is None else ", ".join(f"{k} x{v}" for k, v in engines.items())
        rows.append({"workload": name, "task": task, "tool": tool, "seconds": seconds, "grad_eq": seconds / g / per,
                     "value": value, "rel_error": err, "note": note, "engines": eng})
        e = "" if err is None else f"  rel. error {err:.1e}"
        v = "" if value is None else f"  value {value:.6g}"
        print(f"  {task:<28}{tool:<22}{seconds / g / per:>8.2f} grad-eq{v}{e}  {note}  {eng}")

    params = [p for p in model.parameters() if p.requires_grad]
    # reference in float64 (float32 products carry ~1e-5 relative noise), cross-checked with ARPACK
    m64, b64 = copy.deepcopy(model).double(), [(x.double(), y) for x, y in batches]
    ref = landscape.top_eigenvalues(landscape.HessianOperator(m64, CE, b64), k=3, tol=1e-9, seed=1).eigenvalues
    ref_scipy = np.sort(eigsh(landscape.HessianOperator(m64, CE, b64).to_scipy(), k=3, which="LA", tol=1e-12)[0])[::-1]
    assert np.allclose(ref, ref_scipy, rtol=1e-7), (ref, ref_scipy)
    print(f"  reference top-3 eigenvalues {ref}  (gap top-1/top-2 {(ref[0] - ref[1]) / ref[0]:.1%})")

    def cold():  # a new operator: every timed call of ours pays for its own engine choice
        return landscape.HessianOperator(model, CE, batches)

    # -- Hutchinson, 16 probes
    op = cold()
    ours, t = timed(lambda: landscape.hessian_trace(op, 16, method="hutchinson", seed=0))
    add("Hutchinson, per probe (16)", "ours", t, ours.value, per=16, engines=ours.engines)
    op = landscape.HessianOperator(model, CE, batches, quadratic="hvp")
    ours, t = timed(lambda: landscape.hessian_trace(op, 16, method="hutchinson", seed=0))
    add("Hutchinson, per probe (16)", "ours, products", t, ours.value, per=16, engines=ours.engines)
    torch.manual_seed(0)
    ph = pyhessian.hessian(copy.deepcopy(model), CE, dataloader=batches, cuda=DEVICE.type == "cuda")
    vals, t = timed(lambda: ph.trace(maxIter=16, tol=float("-inf")))
    add("Hutchinson, per probe (16)", "PyHessian", t, float(np.mean(vals)), per=16)
    if HessianLinearOperator is not None:
        cl = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False)
        torch.manual_seed(0)
        val, t = timed(lambda: hutchinson_trace(cl, 16))
        add("Hutchinson, per probe (16)", "curvlinops", t, float(val), per=16)
    op = cold()
    hpp, t = timed(lambda: landscape.hessian_trace(op, 48, method="hutch++", seed=0))
    add("Hutch++, 48 matvecs", "ours", t, hpp.value, note=f"+- {hpp.std_error:.3g}", engines=hpp.engines)

    # -- SLQ spectral density: one run of 32 Lanczos steps
    op = cold()
    dens, t = timed(lambda: landscape.spectral_density(op, num_runs=1, lanczos_steps=32, seed=0))
    add("SLQ density (1 x 32 steps)", "ours", t, engines=dens.engines)
    torch.manual_seed(0)
    ph = pyhessian.hessian(copy.deepcopy(model), CE, dataloader=batches, cuda=DEVICE.type == "cuda")
    try:
        _, t = timed(lambda: ph.density(iter=32, n_v=1))
        add("SLQ density (1 x 32 steps)", "PyHessian", t)
    except RuntimeError as e:  # PyHessian 0.1 calls torch.eig, removed from PyTorch in 2.0
        note = f"crash: {str(e).splitlines()[0][:70]}"
        rows.append({"workload": name, "task": "SLQ density (1 x 32 steps)", "tool": "PyHessian", "note": note})
        print(f"  {'SLQ density (1 x 32 steps)':<28}{'PyHessian':<22}{note}")
    if HessianLinearOperator is not None:
        from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum

        cl = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False)
        _, t = timed(lambda: lanczos_approximate_spectrum(cl, ncv=32, num_repeats=1))
        add("SLQ density (1 x 32 steps)", "curvlinops", t)

    if do_eigs:
        for k, tol in ((1, 5e-3), (3, 5e-3)):
            task = f"top-{k} eigenvalue{'s' if k > 1 else ''}"
            op_k = cold()
            res, t = timed(lambda op_k=op_k, k=k, tol=tol: landscape.top_eigenvalues(op_k, k=k, tol=tol, seed=0))
            err = max(abs(a - b) / abs(b) for a, b in zip(res.eigenvalues, ref[:k]))
            add(task, f"ours (Lanczos, {res.num_matvecs} mv)", t, res.eigenvalues[0], err, engines=res.engines)
            torch.manual_seed(0)
            ph = pyhessian.hessian(copy.deepcopy(model), CE, dataloader=batches, cuda=DEVICE.type == "cuda")
            (vals, _), t = timed(lambda: ph.eigenvalues(top_n=k))  # noqa: B023 - called within the iteration
            err = max(abs(a - b) / abs(b) for a, b in zip(sorted(vals, reverse=True), ref[:k]))
            add(task, "PyHessian (power it.)", t, vals[0], err)
            if HessianLinearOperator is None:
                continue
            lin = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches,
                                        check_deterministic=False).to_scipy()
            vals, t = timed(lambda: eigsh(lin, k=k, which="LA")[0])  # noqa: B023 - called within the iteration
            err = max(abs(a - b) / abs(b) for a, b in zip(sorted(vals, reverse=True), ref[:k]))
            add(task, "curvlinops (ARPACK)", t, float(max(vals)), err)

    # -- 2D surface
    npts = surface_steps ** 2
    dirs = landscape.random_directions(model, 2, seed=0)
    s, t = timed(lambda: landscape.surface_2d(model, CE, batches, dirs, steps=surface_steps))
    add(f"2D surface, per point ({surface_steps}x{surface_steps})", "ours", t, float(s.center_loss), per=npts,
        engines={c["what"]: c["engine"] for c in getattr(s, "engine", {}).values()} or None)
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        print("  loss-landscapes is not installed: its row is left out")
        return g

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    metric = loss_landscapes.metrics.Loss(CE, x, y)
    m = copy.deepcopy(model).eval()
    try:
        _, t = timed(lambda: loss_landscapes.random_plane(m, metric, distance=1, steps=surface_steps,
                                                          normalization="filter", deepcopy_model=True))
        add(f"2D surface, per point ({surface_steps}x{surface_steps})", "loss-landscapes", t, per=npts)
    except ZeroDivisionError as e:  # its filter normalization divides by a zero filter norm (BatchNorm bias at init)
        rows.append({"workload": name, "task": "2D surface", "tool": "loss-landscapes", "note": f"crash: {e}"})
        print(f"  2D surface                  loss-landscapes      crash: ZeroDivisionError: {e}")
    return g


def bn_init_crash(rows):
    """loss-landscapes' filter normalization on a BatchNorm model at initialization."""
    import loss_landscapes
    import loss_landscapes.metrics

    torch.manual_seed(0)
    model = build_model("cnn-digits", 10, 1, 8).eval()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    try:
        out = loss_landscapes.random_plane(model, loss_landscapes.metrics.Loss(CE, x, y), distance=1, steps=3,
                                           normalization="filter", deepcopy_model=True)
        note = "ran" if np.isfinite(out).all() else "non-finite values"
    except Exception as e:  # noqa: BLE001 - we report whatever it raises
        note = f"{type(e).__name__}: {str(e)[:80]}"
    ours = landscape.surface_2d(model, CE, (x, y), landscape.random_directions(model, 2, include_1d=True), steps=3)
    rows.append({"workload": "cnn-digits at init", "task": "2D surface, BatchNorm at init", "tool": "loss-landscapes",
                 "note": note})
    rows.append({"workload": "cnn-digits at init", "task": "2D surface, BatchNorm at init", "tool": "ours",
                 "note": "finite" if np.isfinite(ours.loss).all() else "non-finite"})
    print(f"\n== BatchNorm model at initialization: loss-landscapes: {note}; ours: {rows[-1]['note']}")


def surface_floor(model, batches, steps=11, repeat=3):
    """Surface cost per point in gradient-equivalents, interleaved in one process: ours (automatic
    batching, the given batches of 256, merged into one batch), loss-landscapes, and bare loops of
    eager forward passes over the given and the merged batches (the floor for any method that
    evaluates each point)."""
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        print("  loss-landscapes is not installed: its row is left out")
        return

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    dirs = landscape.random_directions(model, 2, seed=0)
    n = steps * steps

    def bare(bs):
        with torch.no_grad():
            for _ in range(n):
                for xb, yb in bs:
                    CE(model(xb), yb)

    for _ in range(repeat):
        g = grad_time(model, batches)
        res = {}
        for name, mb in (("ours (auto)", None), ("ours (given batches)", 0), ("ours (merged)", 4096)):
            _, res[name] = timed(lambda mb=mb: landscape.surface_2d(model, CE, batches, dirs, steps=steps,
                                                                     max_batch=mb))
        _, res["loss-landscapes"] = timed(lambda: loss_landscapes.random_plane(
            copy.deepcopy(model), loss_landscapes.metrics.Loss(CE, x, y), distance=1, steps=steps,
            normalization="filter", deepcopy_model=True))
        _, res["bare forward (given)"] = timed(lambda: bare(batches))
        _, res["bare forward (merged)"] = timed(lambda: bare([(x, y)]))
        print("  grad-eq per point: " + ", ".join(f"{k} {v / n / g:.3f}" for k, v in res.items())
              + f"  (gradient {1e3 * g:.1f} ms)")


def print_ratios(rows):
    """Per workload and task: our fastest time over the fastest peer's (below 1: we are faster)."""
    print("\n== ours / best peer, same run (gradient-equivalents)")
    keys = sorted({(r["workload"], r["task"]) for r in rows if "grad_eq" in r})
    for w, task in keys:
        mine = [r for r in rows if (r["workload"], r["task"]) == (w, task) and r["tool"].startswith("ours")
                and "grad_eq" in r]
        peers = [r for r in rows if (r["workload"], r["task"]) == (w, task) and not r["tool"].startswith("ours")
                 and "grad_eq" in r]
        if mine and peers:
            a, b = min(mine, key=lambda r: r["grad_eq"]), min(peers, key=lambda r: r["grad_eq"])
            print(f"  {w[:24]:<26}{task:<34}{a['grad_eq']:>7.2f} vs {b['grad_eq']:>7.2f} ({b['tool']})"
                  f"  ratio {a['grad_eq'] / b['grad_eq']:.2f}  engines: {a.get('engines', '')}")
            for r in mine:
                r["ratio_to_best_peer"] = r["grad_eq"] / b["grad_eq"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (scripts/gpu_check.sh runs --device cuda --skip-digits)")
    p.add_argument("--surface-floor", action="store_true",
                   help="only compare surface cost per point with a bare forward loop (digits CNN)")
    p.add_argument("--tuned-malloc", action="store_true",
                   help="rerun under glibc malloc settings that keep freed memory in the process "
                        f"({' '.join(f'{k}={v}' for k, v in TUNED_MALLOC.items())}), for every tool alike")
    a = p.parse_args(argv)
    if a.tuned_malloc and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    global DEVICE
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    tuned = all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc {'tuned' if tuned else 'default'}")
    rows = []
    if a.surface_floor:
        surface_floor(*digits_workload())
        return
    if not a.skip_digits:
        run("cnn-digits, 1797 digits", *digits_workload(), rows, 11)
    if not a.skip_resnet:
        model, batches, src = resnet_workload()
        run(f"resnet20, 128 images ({src})", model, batches, rows, 5, do_eigs=True)
    if DEVICE.type == "cpu":
        bn_init_crash(rows)
    print_ratios(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
