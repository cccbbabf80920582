"""Peak memory of one Taylor-mode pass (``landscape.taylor.TaylorQuadratic``) with each value
freed after its last use (the default) and with every value kept to the end of the pass.

Workload: resnet20 (CIFAR-10 shape, random weights, eval mode) on a batch of random 32x32
images, with a block of ``k`` random directions over all its parameters: 256 images and 32
directions on CUDA (the Hessian batch and block of a GPU study), 64 and 4 on the CPU. Both
variants run in the same invocation and give the same forms bit for bit (checked).

Memory, per variant:

* ``live``: the interpreter's own count (``peak_live_bytes``): the most bytes its environment
  held at once, activations and tangents, each storage counted once;
* CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``) above what was allocated before the pass;
* CPU: the peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh Python
  process per variant, total and above its level before the pass (after a warm-up pass on one
  image, which loads what a first pass loads). Linux carries ``ru_maxrss`` over ``exec`` from
  the parent's memory, so the children run first, while this process is small; the kernel's
  own high-water mark of the child's memory (``VmHWM`` in ``/proc/self/status``), which starts
  afresh at ``exec``, is reported beside it as a check.

``time_s`` is the faster of two in-process passes per variant (the device synchronized).

    python benchmarks/bench_taylor_memory.py [--device auto|cpu|cuda] [--batch N] [--k K] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dnq.models import build_model  # noqa: E402
from landscape._timing import timed  # noqa: E402
from landscape.taylor import TaylorQuadratic  # noqa: E402

MIB = 2 ** 20
VARIANTS = {"freed": True, "kept": False}


def workload(device: str, batch: int, k: int):
    """resnet20 in eval mode, a batch of random images and labels, ``k`` directions (seeded)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    V = {n: torch.randn(k, *p.shape, generator=g).to(device) for n, p in model.named_parameters()}
    return model, x, y, V


def one_pass(model, x, y, V, free: bool, repeat: int = 1) -> dict:
    """A fresh interpreter's pass (the fastest of ``repeat``, with the largest peaks); on CUDA, also
    the allocator's peak above the level before the pass."""
    dev = x.device
    tq = TaylorQuadratic(model, F.cross_entropy, list(V), free=free)
    out = {"time_s": float("inf"), "cuda_peak_mib": 0.0} if dev.type == "cuda" else {"time_s": float("inf")}
    for _ in range(repeat):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        q, seconds = timed(lambda: tq(x, y, V), dev)
        out["time_s"] = min(out["time_s"], seconds)
        if dev.type == "cuda":
            out["cuda_peak_mib"] = max(out["cuda_peak_mib"], (torch.cuda.max_memory_allocated(dev) - base) / MIB)
    out.update({"live_mib": tq.peak_live_bytes / MIB, "largest_activation_mib": tq.peak_bytes / MIB,
                "forms": q.double().cpu()})
    return out


def _rss_mib() -> tuple[float, float]:
    """Peak RSS so far: ``ru_maxrss`` and ``VmHWM`` (NaN where /proc is missing), in MiB."""
    hwm = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm  # KiB on Linux


def child(variant: str, batch: int, k: int) -> None:
    """A fresh process: warm up on one image, then one measured pass; prints one JSON line."""
    model, x, y, V = workload("cpu", batch, k)
    TaylorQuadratic(model, F.cross_entropy, list(V), free=VARIANTS[variant])(
        x[:1], y[:1], {n: v[:1] for n, v in V.items()})
    before = _rss_mib()
    r = one_pass(model, x, y, V, VARIANTS[variant])
    after = _rss_mib()
    print(json.dumps({"rss_peak_mib": after[0], "rss_before_mib": before[0], "rss_increase_mib": after[0] - before[0],
                      "hwm_peak_mib": after[1], "hwm_increase_mib": after[1] - before[1],
                      "live_mib": r["live_mib"], "forms": r["forms"].tolist()}))


def rss_in_fresh_process(variant: str, batch: int, k: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(batch), "--k", str(k)],
                       capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"the {variant} child process failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="images (default 256 on CUDA, 64 on the CPU)")
    p.add_argument("--k", type=int, default=None, help="directions (default 32 on CUDA, 4 on the CPU)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    batch = a.batch or (256 if device == "cuda" else 64)
    k = a.k or (32 if device == "cuda" else 4)
    if batch < 1 or k < 1:
        p.error("--batch and --k must be >= 1")
    if a.child:
        child(a.child, batch, k)
        return {}

    children = {name: rss_in_fresh_process(name, batch, k) for name in VARIANTS} if device == "cpu" else {}
    model, x, y, V = workload(device, batch, k)
    TaylorQuadratic(model, F.cross_entropy, list(V))(x[:2], y[:2], {n: v[:1] for n, v in V.items()})  # warm-up
    rows = {name: one_pass(model, x, y, V, free, repeat=2) for name, free in VARIANTS.items()}
    forms = {name: r.pop("forms") for name, r in rows.items()}
    identical = torch.equal(forms["freed"], forms["kept"])
    for name, r in children.items():
        identical = identical and r.pop("forms") == forms[name].tolist()  # the same numbers there too
        rows[name].update({key: v for key, v in r.items() if key != "live_mib"})

    metrics = ["live_mib"] + (["cuda_peak_mib"] if device == "cuda" else
                              ["rss_increase_mib", "rss_peak_mib", "hwm_increase_mib"])
    ratios = {m: rows["freed"][m] / rows["kept"][m] for m in metrics if rows["kept"][m] > 0}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"resnet20, batch {batch}, k = {k} directions, {name}, torch {torch.__version__}; "
          f"forms identical: {identical}")
    cols = ["largest_activation_mib"] + metrics + ["time_s"]
    print(f"{'variant':8s}" + "".join(f"{c:>24s}" for c in cols))
    for v, r in rows.items():
        print(f"{v:8s}" + "".join(f"{r[c]:24.1f}" if c != "time_s" else f"{r[c]:24.3f}" for c in cols))
    print(f"{'ratio':8s}" + "".join(f"{ratios[c]:24.3f}" if c in ratios else f"{'':24s}" for c in cols))
    result = {"device": device, "device_name": name, "torch": torch.__version__, "batch": batch, "k": k,
              "identical": identical, "variants": rows, "ratio_freed_to_kept": ratios}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
