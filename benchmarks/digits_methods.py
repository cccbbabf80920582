"""FP and PTQ accuracy of every method on digits, over several seeds (mean and std).

Noise methods (dnq, dnq-w, dnq-a, gaussian) are trained once per target bit-width (their noise
models that target's quantization error); sgd and sam are trained once and quantized at every
setting. PTQ: symmetric per-channel weights, asymmetric per-tensor activations, first/last layer
at 8 bits, BatchNorm folded, range method ``--range`` (default minmax).

    python benchmarks/digits_methods.py --seeds 0,1,2 --epochs 30 --out runs/digits_methods
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from dnq.data import BatchLoader, load_dataset
from dnq.io import atomic_write_json
from dnq.methods import METHODS
from dnq.quant import parse_bits, quantize
from dnq.train import TrainConfig, evaluate, load_model, train

NOISE = ("dnq", "dnq-w", "dnq-a", "gaussian")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--bits", default="W4A4,W3A3,W2A4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--range", default="minmax")
    p.add_argument("--out", default="runs/digits_methods")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    seeds = [int(s) for s in a.seeds.split(",")]
    settings = parse_bits(a.bits)
    ds = load_dataset("digits")
    test, calib = BatchLoader(ds, 1024, False), ds.calibration_inputs(256, 0)
    rows = []
    for method in a.methods.split(","):
        targets = settings if method in NOISE else [settings[0]]
        for seed in seeds:
            for tw, ta in targets:
                out = Path(a.out) / f"{method}-W{tw}A{ta}-s{seed}"
                if not (out / "model.pt").is_file():
                    train(TrainConfig(data="digits", model="cnn-digits", method=method, wbits=tw, abits=ta,
                                      epochs=a.epochs, seed=seed, out=str(out)), quiet=True, overwrite=True)
                model, _ = load_model(out)
                fp_loss, fp_acc = evaluate(model, test)
                for w, b in settings:
                    q = quantize(model, w, b, calib, range_method=a.range)
                    loss, acc = evaluate(q, test)
                    rows.append({"method": method, "seed": seed, "target": f"W{tw}A{ta}", "bits": f"W{w}A{b}",
                                 "fp_acc": fp_acc, "fp_loss": fp_loss, "acc": acc, "loss": loss})
            print(f"{method} seed {seed} done", flush=True)
    atomic_write_json(Path(a.out) / "results.json", rows)

    def cell(vals):
        return f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals) if len(vals) > 1 else 0:.2f}"

    names = [f"W{w}A{b}" for w, b in settings]
    print("\nmatched: noise methods trained for the column's bit-width (FP: the first target's model)")
    print("| method | FP | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for method in a.methods.split(","):
        r = [x for x in rows if x["method"] == method]
        first = names[0]
        fp = [x["fp_acc"] for x in r if x["target"] == first and x["bits"] == first]
        cols = [cell([x["acc"] for x in r if x["bits"] == n and (x["target"] == n or method not in NOISE)]) for n in names]
        print(f"| {method} | {cell(fp)} | " + " | ".join(cols) + " |")
    print(f"\none model per method trained for {names[0]}, quantized at every setting")
    print("| method | FP | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for method in a.methods.split(","):
        r = [x for x in rows if x["method"] == method and x["target"] == names[0]]
        fp = [x["fp_acc"] for x in r if x["bits"] == names[0]]
        print(f"| {method} | {cell(fp)} | " + " | ".join(cell([x["acc"] for x in r if x["bits"] == n]) for n in names) + " |")


if __name__ == "__main__":
    main()
