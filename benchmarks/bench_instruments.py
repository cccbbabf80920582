"""Curvature and surface instruments side by side with PyHessian, curvlinops and loss-landscapes.

One command, one run. Every time is also given in gradient-equivalents: the median time of one
full-data gradient (forward + backward over all batches) measured in the same run, so the
figures survive a noisy machine. Accuracy is against a reference computed here in float64
with our Lanczos at a tight tolerance, cross-checked with SciPy's ARPACK (to 1e-7).

    python benchmarks/bench_instruments.py [--json out.json] [--skip-resnet] [--device cuda]

A tool that crashes becomes a row ("crash: Type: first line") and the run goes on; with --json
every row is written out as soon as it is measured. On CUDA our rows say what was replayed from
CUDA graphs, and "ours, no graphs" rows time the same calls with ``graphs=False``.

Workloads: the digits CNN (cnn-digits, 14,458 parameters, trained 30 epochs with SGD, seed 0)
on all 1,797 digits images in batches of 256; resnet20 at initialization on a batch of 128
32x32 images (the CIFAR-10 subset in ../shared when present, else random images).
hessian-eigenthings is not on PyPI and cannot be installed here; it is left out.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
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


class Table:
    """The rows of one run: each printed as it comes and, with ``json_path``, written out at once
    (a run cut short, by a timeout or a dead GPU, keeps every row it measured)."""

    def __init__(self, json_path=None):
        self.rows, self.json_path = [], json_path

    def append(self, row):
        self.rows.append(row)
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self.rows, indent=2))


def crash_note(e: BaseException) -> str:
    """``"crash: Type: first line"`` (at most 120 characters of message)."""
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"crash: {type(e).__name__}: {first}"


def attempt(table, workload, task, tool, fn):
    """Run one tool's measurement ``fn()`` (which adds its own rows). A tool that raises becomes a
    row ``"crash: Type: first line"`` and the run goes on (ours also prints its traceback: a crash
    of ours is a bug to fix). Returns ``fn``'s result, or ``None`` after a crash."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - whatever a tool raises is reported, not fatal
        note = crash_note(e)
        table.append({"workload": workload, "task": task, "tool": tool, "note": note})
        print(f"  {task:<28}{tool:<22}{note}")
        if tool.startswith("ours"):
            traceback.print_exc()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # a failed kernel surfaces here, not in the next tool's row
        return None


def graph_note(op) -> str:
    """What the operator replayed from CUDA graphs (empty on the CPU)."""
    c = op.planner.get("graph")
    if c is None or DEVICE.type != "cuda":
        return ""
    return f"graphs: {c.engine}" + (f" ({len(c.errors)} eager)" if c.errors else "")


class Workload:
    """One model and its data: the unit (one gradient), the float64 reference, and the rows."""

    def __init__(self, name, model, batches, rows):
        self.name, self.model, self.batches, self.rows = name, model, batches, rows
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cuda = DEVICE.type == "cuda"
        self.g = grad_time(model, batches)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        g_cl = grad_time(cl, [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches])
        print(f"\n== {name}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"{sum(len(b[1]) for b in batches)} samples; one gradient = {1e3 * self.g:.1f} ms "
              f"(the unit; with a channels-last copy of the model: {1e3 * g_cl:.1f} ms)")
        self.ref = self.tool("reference (float64)", "ours", self.reference)

    def add(self, task, tool, seconds, value=None, err=None, note="", per=1, engines=None):
        eng = "" if engines is None else ", ".join(f"{k} x{v}" for k, v in engines.items())
        g = self.g
        self.rows.append({"workload": self.name, "task": task, "tool": tool, "seconds": seconds,
                          "grad_eq": seconds / g / per, "value": value, "rel_error": err, "note": note, "engines": eng})
        e = "" if err is None else f"  rel. error {err:.1e}"
        v = "" if value is None else f"  value {value:.6g}"
        print(f"  {task:<28}{tool:<22}{seconds / g / per:>8.2f} grad-eq{v}{e}  {note}  {eng}")

    def tool(self, task, who, fn):
        """One tool's measurement; a crash is a row (:func:`attempt`)."""
        return attempt(self.rows, self.name, task, who, fn)

    def rel_err(self, vals, k):
        if self.ref is None:
            return None
        return max(abs(a - b) / abs(b) for a, b in zip(sorted(vals, reverse=True), self.ref[:k]))

    def reference(self):
        """Top-3 in float64 (float32 products carry ~1e-5 relative noise), cross-checked with ARPACK."""
        from scipy.sparse.linalg import eigsh

        m64, b64 = copy.deepcopy(self.model).double(), [(x.double(), y) for x, y in self.batches]
        top = landscape.top_eigenvalues(landscape.HessianOperator(m64, CE, b64), k=3, tol=1e-9, seed=1).eigenvalues
        arpack = np.sort(eigsh(landscape.HessianOperator(m64, CE, b64).to_scipy(), k=3, which="LA", tol=1e-12)[0])
        assert np.allclose(top, arpack[::-1], rtol=1e-7), (top, arpack)
        print(f"  reference top-3 eigenvalues {top}  (gap top-1/top-2 {(top[0] - top[1]) / top[0]:.1%})")
        return top

    def cold(self, **kw):
        """A new operator: every timed call of ours pays for its own engine choice."""
        return landscape.HessianOperator(self.model, CE, self.batches, **kw)

    def ours(self, task, fn):
        """Our row(s) for ``task``: ``fn(label, **operator_kwargs)``; on CUDA also without graphs."""
        self.tool(task, "ours", lambda: fn("ours"))
        if self.cuda:
            self.tool(task, "ours, no graphs", lambda: fn("ours, no graphs", graphs=False))

    def pyhessian(self):
        import pyhessian

        torch.manual_seed(0)
        return pyhessian.hessian(copy.deepcopy(self.model), CE, dataloader=self.batches, cuda=self.cuda)

    def curvlinops(self):
        """curvlinops' Hessian operator of this workload."""
        from curvlinops import HessianLinearOperator

        return HessianLinearOperator(self.model, nn.CrossEntropyLoss(), self.params, self.batches,
                                     check_deterministic=False)


def has_curvlinops() -> bool:
    """Whether curvlinops is installed (the bench extra; the GPU machine may have only the dev extra)."""
    return importlib.util.find_spec("curvlinops") is not None


def trace_tasks(w):
    """Hutchinson with 16 probes (ours: Taylor forms, and products), Hutch++ with 48 matvecs."""
    task = "Hutchinson, per probe (16)"

    def ours(label, **kw):
        op = w.cold(**kw)
        res, t = timed(lambda: landscape.hessian_trace(op, 16, method="hutchinson", seed=0))
        w.add(task, label, t, res.value, per=16, engines=res.engines, note=graph_note(op))

    w.ours(task, ours)
    w.tool(task, "ours, products", lambda: ours("ours, products", quadratic="hvp"))

    def peer_pyhessian():
        ph = w.pyhessian()
        vals, t = timed(lambda: ph.trace(maxIter=16, tol=float("-inf")))
        w.add(task, "PyHessian", t, float(np.mean(vals)), per=16)

    def peer_curvlinops():
        from curvlinops import hutchinson_trace

        cl = w.curvlinops()
        torch.manual_seed(0)
        val, t = timed(lambda: hutchinson_trace(cl, 16))
        w.add(task, "curvlinops", t, float(val), per=16)

    w.tool(task, "PyHessian", peer_pyhessian)
    if has_curvlinops():
        w.tool(task, "curvlinops", peer_curvlinops)

    def hutchpp():
        op = w.cold()
        hpp, t = timed(lambda: landscape.hessian_trace(op, 48, method="hutch++", seed=0))
        w.add("Hutch++, 48 matvecs", "ours", t, hpp.value, note=f"+- {hpp.std_error:.3g} {graph_note(op)}".strip(),
              engines=hpp.engines)

    w.tool("Hutch++, 48 matvecs", "ours", hutchpp)


def slq_tasks(w):
    """SLQ spectral density: one run of 32 Lanczos steps."""
    task = "SLQ density (1 x 32 steps)"

    def ours(label, **kw):
        op = w.cold(**kw)
        dens, t = timed(lambda: landscape.spectral_density(op, num_runs=1, lanczos_steps=32, seed=0))
        w.add(task, label, t, engines=dens.engines, note=graph_note(op))

    def peer_pyhessian():  # PyHessian 0.1 calls torch.eig, removed from PyTorch in 2.0: a crash row
        ph = w.pyhessian()
        _, t = timed(lambda: ph.density(iter=32, n_v=1))
        w.add(task, "PyHessian", t)

    def peer_curvlinops():
        from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum

        cl = w.curvlinops()
        _, t = timed(lambda: lanczos_approximate_spectrum(cl, ncv=32, num_repeats=1))
        w.add(task, "curvlinops", t)

    w.ours(task, ours)
    w.tool(task, "PyHessian", peer_pyhessian)
    if has_curvlinops():
        w.tool(task, "curvlinops", peer_curvlinops)


def eig_tasks(w, k, tol=5e-3):
    """The top ``k`` eigenvalues: ours (Lanczos), PyHessian (power iteration), curvlinops (ARPACK)."""
    from scipy.sparse.linalg import eigsh

    task = f"top-{k} eigenvalue{'s' if k > 1 else ''}"

    def ours(label, **kw):
        op = w.cold(**kw)
        res, t = timed(lambda: landscape.top_eigenvalues(op, k=k, tol=tol, seed=0))
        w.add(task, f"{label} (Lanczos, {res.num_matvecs} mv)", t, res.eigenvalues[0], w.rel_err(res.eigenvalues, k),
              engines=res.engines, note=graph_note(op))

    def peer_pyhessian():
        ph = w.pyhessian()
        (vals, _), t = timed(lambda: ph.eigenvalues(top_n=k))
        w.add(task, "PyHessian (power it.)", t, vals[0], w.rel_err(vals, k))

    def peer_curvlinops():
        lin = w.curvlinops().to_scipy()
        vals, t = timed(lambda: eigsh(lin, k=k, which="LA")[0])
        w.add(task, "curvlinops (ARPACK)", t, float(max(vals)), w.rel_err(vals, k))

    w.ours(task, ours)
    w.tool(task, "PyHessian (power it.)", peer_pyhessian)
    if has_curvlinops():
        w.tool(task, "curvlinops (ARPACK)", peer_curvlinops)


def surface_tasks(w, steps):
    """A 2-D surface of ``steps`` x ``steps`` points: ours and loss-landscapes."""
    npts = steps ** 2
    task = f"2D surface, per point ({steps}x{steps})"

    def ours():
        dirs = landscape.random_directions(w.model, 2, seed=0)
        s, t = timed(lambda: landscape.surface_2d(w.model, CE, w.batches, dirs, steps=steps))
        w.add(task, "ours", t, float(s.center_loss), per=npts,
              engines={c["what"]: c["engine"] for c in getattr(s, "engine", {}).values()} or None)

    def peer_loss_landscapes():  # at initialization its filter normalization divides by zero; on CUDA it
        import loss_landscapes  # mixes devices (filter_normalize_): crash rows, and the run goes on
        import loss_landscapes.metrics

        x = torch.cat([b[0] for b in w.batches])
        y = torch.cat([b[1] for b in w.batches])
        metric = loss_landscapes.metrics.Loss(CE, x, y)
        m = copy.deepcopy(w.model).eval()
        _, t = timed(lambda: loss_landscapes.random_plane(m, metric, distance=1, steps=steps, normalization="filter",
                                                          deepcopy_model=True))
        w.add(task, "loss-landscapes", t, per=npts)

    w.tool(task, "ours", ours)
    try:
        import loss_landscapes  # noqa: F401 - is it installed?
    except ImportError:
        print("  loss-landscapes is not installed: its row is left out")
        return
    w.tool(task, "loss-landscapes", peer_loss_landscapes)


def run(name, model, batches, rows, surface_steps, do_eigs=True):
    """Every task on one workload, each tool's crash a row; returns the unit (one gradient, s)."""
    w = Workload(name, model, batches, rows)
    if not has_curvlinops():
        print("  curvlinops is not installed: its rows are left out")
    trace_tasks(w)
    slq_tasks(w)
    if do_eigs:
        eig_tasks(w, 1)
        eig_tasks(w, 3)
    surface_tasks(w, surface_steps)
    return w.g


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
    rows = Table(a.json)
    if a.surface_floor:
        surface_floor(*digits_workload())
        return
    if not a.skip_digits:
        attempt(rows, "cnn-digits, 1797 digits", "workload", "setup",
                lambda: run("cnn-digits, 1797 digits", *digits_workload(), rows, 11))
    if not a.skip_resnet:
        def resnet():
            model, batches, src = resnet_workload()
            run(f"resnet20, 128 images ({src})", model, batches, rows, 5, do_eigs=True)

        attempt(rows, "resnet20, 128 images", "workload", "setup", resnet)
    if DEVICE.type == "cpu":
        attempt(rows, "cnn-digits at init", "2D surface, BatchNorm at init", "setup", lambda: bn_init_crash(rows))
    print_ratios(rows.rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows.rows, indent=2))


if __name__ == "__main__":
    main()
