"""The instruments at a user's scale: torchvision resnet18 (10 classes, 11.18M parameters) on 64
CIFAR images, against SciPy's ``eigsh`` on the same operator, with each instrument's peak memory.

Each measurement runs in a fresh process (``--one NAME``), so that its peak RSS
(``ru_maxrss``) is that instrument's alone (plus the model, the data and PyTorch itself, whose
baseline is measured too: ``baseline``). The images are the first 64 training images of
``../shared/data/cifar10-subset.npz`` when it is there, else seeded random images (the operator
is then a different one: the file says which).

    python benchmarks/bench_scale.py --out benchmarks/bench_scale.json      # about 15 minutes, 2 threads

Results: BENCHMARKS.md, "Instruments at scale (issue 20)".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
CASES = ("baseline", "top3", "eigsh", "trace", "slq-auto", "slq-full")


def setup(images: int = 64):
    import numpy as np
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    if NPZ.is_file():
        with np.load(NPZ) as f:
            x = torch.from_numpy(f["x_train"][:images]).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(f["y_train"][:images]).long()
        source = "cifar10-subset (first 64 training images)"
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(images, 3, 32, 32, generator=g), torch.randint(0, 10, (images,), generator=g)
        source = "seeded random images"
    x = (x - 0.5) / 0.25
    return model, torch.nn.functional.cross_entropy, [(x, y)], source


def one(case: str) -> dict:
    import numpy as np
    import torch

    import landscape

    model, loss_fn, data, source = setup()
    op = landscape.HessianOperator(model, loss_fn, data)
    out = {"case": case, "dim": op.dim, "threads": torch.get_num_threads(), "data": source}
    t0 = time.perf_counter()
    if case == "top3":
        r = landscape.top_eigenvalues(op, k=3, seed=0, progress=False)
        out.update(eigenvalues=r.eigenvalues, converged=r.converged, iterations=r.iterations,
                   relative_residuals=r.relative_residuals, num_matvecs=r.num_matvecs,
                   reorthogonalization=r.reorthogonalization, basis_bytes=r.basis_bytes)
    elif case == "eigsh":
        from scipy.sparse.linalg import eigsh

        lin = op.to_scipy()
        vals, vecs = eigsh(lin, k=3, which="LA", tol=1e-6, v0=np.random.default_rng(0).standard_normal(op.dim))
        order = np.argsort(vals)[::-1]
        out.update(eigenvalues=vals[order].tolist(), num_matvecs=op.num_matvecs, tol=1e-6)
    elif case == "trace":
        r = landscape.hessian_trace(op, seed=0, progress=False)
        out.update(value=r.value, std_error=r.std_error, relative_std_error=r.std_error / abs(r.value),
                   num_matvecs=r.num_matvecs)
    elif case in ("slq-auto", "slq-full"):
        kw = {"reorth": "full", "memory_budget": 64 << 30} if case == "slq-full" else {}
        r = landscape.spectral_density(op, seed=0, progress=False, **kw)
        out.update(reorthogonalization=r.reorthogonalization, basis_bytes=r.basis_bytes, num_matvecs=r.num_matvecs,
                   moments=[r.moment(p) for p in (1, 2)])
    elif case != "baseline":
        raise SystemExit(f"unknown case {case!r}")
    if case == "baseline":
        op.matvec(torch.randn(op.dim))  # the operator's own memory: one product
    out["time_s"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", choices=CASES, help="run one case in this process and print its JSON")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    a = p.parse_args()
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(one(a.one)))
        return
    results = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    for case in a.cases.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", case, "--threads", str(a.threads)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            results.append({"case": case, "error": r.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by = {r["case"]: r for r in results}
    if "top3" in by and "eigsh" in by and "eigenvalues" in by["eigsh"]:
        ours, ref = by["top3"]["eigenvalues"], by["eigsh"]["eigenvalues"]
        print("top-3 relative difference to eigsh:", [abs(u - v) / abs(v) for u, v in zip(ours, ref)])
    if a.out:
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
