"""Reconstruction PTQ time per model on this machine: AdaRound, BRECQ and QDrop against
round-to-nearest, for cnn-digits and resnet20.

Timing only: the models are at their (seeded) initialization and the calibration images are
seeded Gaussian noise of the dataset's shape (the time of a step does not depend on the weights'
values). Every method quantizes at W4A4 with the first/last layer at 8 bits, 1,024 calibration
images, batch 32, ``--iters`` steps per block (default 500, the CPU default; the papers use
20,000). Reported per (model, method): wall seconds, seconds per step and unit, and the ratio to
``rtn`` (min-max) measured in the same run, which is what to compare across machines.

    .venv/bin/python benchmarks/bench_recon.py --json out.json
    .venv/bin/python benchmarks/bench_recon.py --models resnet20 --iters 100 --device cuda

``--step`` (issue 22) measures one reconstruction step instead: a QDrop step of resnet20's first
block (``layers.0``) at batch 32 with the step of this tree against the step before issue 22 (the
``dnq/recon.py`` of ``--old-rev``, read with ``git show`` and loaded as a module next to the
current one; both run in the same process, alternately, ``--repeats`` times), as milliseconds
per step and aten ops per step; with ``--device cuda`` also the step of resnet18's ``layer2.0``
(torchvision's, 100 classes), and the current step eager and replayed as a CUDA graph. A step's
time and ops are the difference between the unit at ``N + --steps`` and at ``N`` steps divided by
``--steps`` (set-up, cache capture and the evaluation passes cancel), with the regularizer on
from the first step (``warmup=0``; the old step skipped it during the warm-up fifth). The ops
are those the host dispatches (a ``TorchDispatchMode``), so the replayed graph's are 0. The result
is one JSON line on stdout.

    .venv/bin/python benchmarks/bench_recon.py --step
    .venv/bin/python benchmarks/bench_recon.py --step --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnq.models import build_model  # noqa: E402
from dnq.quant import quantize  # noqa: E402
from dnq.recon import RECON_METHODS, reconstruct  # noqa: E402

SHAPES = {"cnn-digits": (1, 8), "resnet20": (3, 32)}
ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "84147771aacf3eca4101255d97863985c515da7f"
"""The commit whose dnq/recon.py is the step before issue 22 (the per-step Python loop)."""
BLOCKS = {"resnet20": ("resnet20", 10, "layers.0"), "resnet18": ("resnet18", 100, "layer2.0")}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str, iters: int, device: torch.device, calib_size: int = 1024) -> list[dict]:
    ch, size = SHAPES[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, 10, ch, size).to(device).eval()
    calib = torch.randn(calib_size, ch, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    _sync(device)
    t0 = time.perf_counter()
    quantize(model, 4, 4, calib[:256])
    _sync(device)
    rtn = time.perf_counter() - t0
    rows.append({"model": model_name, "method": "rtn", "iters": 0, "units": None, "time_s": rtn, "ratio_to_rtn": 1.0,
                 "s_per_step_unit": None})
    for method in RECON_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cnn-digits falls back to layers, with a warning
            _sync(device)
            t0 = time.perf_counter()
            q = reconstruct(model, 4, 4, calib, method, iters=iters)
            _sync(device)
            t = time.perf_counter() - t0
        units = q.ptq_recon["units"]
        steps = sum(u["steps"] for u in units)
        step_time = sum(u["time_s"] for u in units)
        rows.append({"model": model_name, "method": method, "iters": iters, "units": len(units), "time_s": t,
                     "ratio_to_rtn": t / rtn, "s_per_step_unit": step_time / max(steps, 1),
                     "loss_ratio_last_unit": units[-1]["loss_after"] / max(units[-1]["loss_before"], 1e-30)})
        print(f"{model_name:11s} {method:9s} {t:8.1f} s  ({t / rtn:7.1f}x rtn, {len(units)} units)", flush=True)
    return rows


# -- one step (issue 22) ------------------------------------------------------------------------
class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _Done(Exception):
    pass


def load_old_recon(rev: str):
    """``dnq/recon.py`` of ``rev``, loaded as the module ``dnq._recon_before_issue22`` (its relative
    imports resolve to this tree's ``dnq``); None where git or the commit is not at hand (a copy of
    the tree on a GPU machine), and the comparison with the old step is left out."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:dnq/recon.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"the step before issue 22 is not compared: git show {rev}:dnq/recon.py failed ({type(e).__name__})",
              file=sys.stderr)
        return None
    spec = importlib.util.spec_from_loader("dnq._recon_before_issue22", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "dnq"
    exec(compile(src, f"{rev[:12]}:dnq/recon.py", "exec"), mod.__dict__)
    return mod


def unit_runs(mod, model, calib, unit: str, steps: list[int], *, count: bool = False, **kw) -> list[tuple]:
    """``mod``'s reconstruction of ``unit`` (QDrop, W4A4, batch 32) at each number of ``steps``, in one
    :func:`reconstruct` call (the units before it at one step): ``(seconds, aten ops or None)`` each."""
    orig, out = mod._reconstruct_unit, []
    device = calib.device

    def patched(u, layers, **k):
        if u != unit:
            return orig(u, layers, **{**k, "iters": 1})
        for n in steps:
            _sync(device)
            counter = _Count() if count else contextlib.nullcontext()
            t0 = time.perf_counter()
            with counter:
                orig(u, layers, **{**k, "iters": n})
            _sync(device)
            out.append((time.perf_counter() - t0, sum(counter.ops.values()) if count else None))
        raise _Done

    mod._reconstruct_unit = patched
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod.reconstruct(model, 4, 4, calib, "qdrop", iters=1, batch_size=32, warmup=0.0, range_method="minmax",
                            **kw)
    except _Done:
        pass
    finally:
        mod._reconstruct_unit = orig
    return out


def per_step(mod, model, calib, unit, base: int, steps: int, **kw) -> float:
    (t1, _), (t2, _) = unit_runs(mod, model, calib, unit, [base, base + steps], **kw)
    return (t2 - t1) / steps


def ops_per_step(mod, model, calib, unit, **kw) -> float:
    (_, a), (_, b) = unit_runs(mod, model, calib, unit, [4, 8], count=True, **kw)
    return (b - a) / 4


def bench_step(device: torch.device, old_rev: str, repeats: int, steps: int, calib_size: int) -> dict:
    """ms per step of the step before issue 22 and of this tree's (eager, and on CUDA graphed), alternately."""
    import dnq.recon as new

    old = load_old_recon(old_rev)
    blocks = ["resnet20"] if device.type == "cpu" else ["resnet20", "resnet18"]
    variants = {"old": (old, {})} if old is not None else {}
    if device.type == "cuda":
        variants.update({"new_eager": (new, {"cuda_graph": False}), "new_graph": (new, {"cuda_graph": True})})
    else:
        variants["new"] = (new, {})
    out: dict = {}
    for name in blocks:
        arch, classes, unit = BLOCKS[name]
        torch.manual_seed(0)
        model = build_model(arch, classes, 3, 32).to(device).eval()
        calib = torch.randn(calib_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
        row: dict = {"unit": unit, "batch": 32, "steps": steps, "repeats": repeats}
        for v, (mod, kw) in variants.items():
            row[f"{v}_ops"] = ops_per_step(mod, model, calib, unit, **kw)
        times = {v: [] for v in variants}
        for _ in range(repeats):  # alternately: a load change on a shared machine hits both
            for v, (mod, kw) in variants.items():
                times[v].append(per_step(mod, model, calib, unit, 10, steps, **kw) * 1e3)
        for v, ts in times.items():
            row[f"{v}_ms"] = statistics.median(ts)
            row[f"{v}_ms_all"] = [round(t, 3) for t in ts]
        for v in variants:
            if v != "old" and "old" in variants:  # the ratio of the medians and the median of the per-repeat ratios
                row[f"ratio_{v}_to_old"] = row[f"{v}_ms"] / row["old_ms"]
                row[f"ratio_{v}_to_old_paired"] = statistics.median(a / b for a, b in zip(times[v], times["old"]))
        if "new_graph" in variants:
            row["ratio_graph_to_eager"] = row["new_graph_ms"] / row["new_eager_ms"]
        out[name] = row
        print(f"{name} {unit}: " + ", ".join(f"{v} {row[f'{v}_ms']:.2f} ms / {row[f'{v}_ops']:.0f} ops"
                                             for v in variants), file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn-digits,resnet20")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--step", action="store_true", help="one step, before issue 22 and now (see above)")
    p.add_argument("--old-rev", default=OLD_REV, help="the commit of the step before issue 22")
    p.add_argument("--repeats", type=int, default=5, help="--step: alternating repeats (the median is reported)")
    p.add_argument("--steps", type=int, default=40, help="--step: steps timed per repeat")
    p.add_argument("--calib-size", type=int, default=256, help="--step: cached images")
    args = p.parse_args()
    device = torch.device(args.device)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cores": os.cpu_count(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    if args.step:
        res = {"machine": machine, "old_rev": args.old_rev,
               "step": bench_step(device, args.old_rev, args.repeats, args.steps, args.calib_size)}
        print(json.dumps(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        return
    rows = []
    for m in args.models.split(","):
        rows += bench(m.strip(), args.iters, device)
    out = {"machine": machine, "iters": args.iters, "rows": rows}
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
