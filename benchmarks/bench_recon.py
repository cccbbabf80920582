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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnq.models import build_model  # noqa: E402
from dnq.quant import quantize  # noqa: E402
from dnq.recon import RECON_METHODS, reconstruct  # noqa: E402

SHAPES = {"cnn-digits": (1, 8), "resnet20": (3, 32)}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn-digits,resnet20")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for m in args.models.split(","):
        rows += bench(m.strip(), args.iters, device)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "cores": os.cpu_count(), "torch": torch.__version__, "device": str(device)},
           "iters": args.iters, "rows": rows}
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
