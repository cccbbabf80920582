"""The instruments on one GPU: cost in gradient-equivalents, and what TF32 would do to them.

    python benchmarks/bench_instruments_cuda.py [--batch 256] [--json out.json]

Each product engine is timed per vector at blocks of 1 and 32, replayed from CUDA graphs (the
default) and eagerly (``graphs=False``), in the same run. A measurement that crashes is recorded
under ``crashes`` ("Type: first line") and the run goes on; with --json the results are written
out after every measurement.

Workload: resnet20 (0.27 M parameters) at initialization, eval mode, one batch of random
32x32 images, mean cross-entropy. Every time is the median of a few synchronized runs, also
given as a ratio to one gradient (forward + backward) of the same batch, measured in the same
run. Precision: one Hessian-vector product in float32, against float64, (a) computed directly
with ``torch.func`` while TF32 is on (PyTorch's default for cuDNN convolutions on Ampere and
later), and (b) through :class:`landscape.HessianOperator` with the same global TF32 settings,
which it switches off for its own work and restores.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import traceback

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp

import landscape
from dnq.models import build_model

CE = nn.functional.cross_entropy


def timed(fn, device, repeat=5, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def raw_hvp(model, x, y, v):
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(lambda p: CE(functional_call(model, p, (x,)), y))
    return jvp(g, (params,), (v,))[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
    data = [(x, y)]
    out = {"device": str(dev), "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "batch": a.batch, "params": sum(p.numel() for p in model.parameters())}

    def gradient():
        model.zero_grad(set_to_none=True)
        CE(model(x), y).backward()

    t_grad = timed(gradient, dev)
    model.zero_grad(set_to_none=True)
    out["gradient_ms"] = 1e3 * t_grad
    times, out["crashes"], out["graphs"] = {}, {}, {}

    def save():
        out["times_ms"] = {k: 1e3 * v for k, v in times.items()}
        out["gradient_equivalents"] = {k: v / t_grad for k, v in times.items()}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)

    def measure(name, fn):
        """``times[name] = fn()``; a crash is recorded and the run goes on."""
        try:
            times[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["crashes"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            traceback.print_exc()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        save()

    for method in ("fwd-rev", "rev-rev", "cached"):
        for k in (32, 1):
            for graphs in (True, False):
                def product(method=method, k=k, graphs=graphs):
                    op = landscape.HessianOperator(model, CE, data, method=method, max_block=32, graphs=graphs)
                    V = torch.randn(op.dim, k, device=dev)
                    t = timed(lambda: op.matmat(V), dev, repeat=3) / k
                    out["graphs"][f"{method}, block {k}, graphs {'on' if graphs else 'off'}"] = \
                        op.planner.get("graph").to_dict()
                    return t

                measure(f"hvp {method}, block {k}, per vector, graphs {'on' if graphs else 'off'}", product)

    def forms():
        op = landscape.HessianOperator(model, CE, data, quadratic="taylor")
        Z = torch.randn(op.dim, 32, device=dev)
        return timed(lambda: op.quadratic_forms(Z), dev, repeat=3) / 32

    measure("quadratic form (taylor), per probe", forms)
    op = landscape.HessianOperator(model, CE, data)
    measure("hutchinson trace, 64 probes", lambda: timed(lambda: landscape.hessian_trace(op, 64, method="hutchinson"),
                                                         dev, repeat=2))
    measure("top-3 eigenvalues (lanczos, tol 1e-3)", lambda: timed(lambda: landscape.top_eigenvalues(op, k=3, tol=1e-3),
                                                                   dev, repeat=1))
    d = landscape.random_directions(model, 1, seed=0)[0]
    measure("1-D surface, 21 points", lambda: timed(lambda: landscape.surface_1d(model, CE, data, d, steps=21), dev,
                                                    repeat=2))
    out["engine_choice"] = {"method": op.method, "quadratic": op.quadratic, "timings": op.timings,
                            "plan": op.planner.to_dict()}
    save()

    # precision of one product under TF32, against float64
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    ref = raw_hvp(copy.deepcopy(model).double(), x.double(), y, {n: t.double() for n, t in v.items()})
    ref = torch.cat([t.reshape(-1) for t in ref.values()])
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    errs = {}
    try:
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            hv = torch.cat([t.reshape(-1) for t in raw_hvp(model, x, y, v).values()]).double()
            errs[f"torch.func, TF32 {'on' if tf32 else 'off'}"] = float((hv - ref).norm() / ref.norm())
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        op = landscape.HessianOperator(model, CE, data, method="fwd-rev")
        hv = op.matvec(op.flatten(v)).double()
        errs["HessianOperator, global TF32 on"] = float((hv - ref).norm() / ref.norm())
        out["tf32_restored"] = torch.backends.cudnn.allow_tf32 is True and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    out["hvp_relative_error_vs_float64"] = errs
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
