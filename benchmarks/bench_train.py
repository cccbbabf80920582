"""Step time of every training method as a ratio to plain SGD, on the same model and batch, in one run.

Methods are measured round-robin (one short burst each, in a shuffled order, repeated; the
first step of each burst is not timed), so a noisy machine slows all of them alike; the figure of merit is median(step time of METHOD) / median(step time of sgd).

    python benchmarks/bench_train.py                      # cnn-digits (batch 128) and resnet20 (batch 128, 32x32)
    python benchmarks/bench_train.py --models resnet20 --device cuda --json out.json

Targets (issue 2): dnq <= 1.2x sgd; sam is ~2x (two forward/backward passes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time

import torch
import torch.nn as nn

from dnq.methods import METHODS, make_method
from dnq.models import build_model

SHAPES = {"cnn-digits": (1, 8, 10), "mlp-digits": (1, 8, 10)}


def bench(model_name: str, batch: int, device: torch.device, rounds: int, steps: int, methods, amp: bool,
          act_sampler: str = "auto") -> dict:
    c, s, k = SHAPES.get(model_name, (3, 32, 100))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, s, s, generator=g).to(device)
    y = torch.randint(0, k, (batch,), generator=g).to(device)
    calib = torch.randn(256, c, s, s, generator=g).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and amp else contextlib.nullcontext
    setups = {}
    for name in methods:
        torch.manual_seed(0)
        model = build_model(model_name, k, c, s).to(device).train()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        method = make_method(name, wbits=4, abits=4, act_sampler=act_sampler)
        method.setup(model, calib, device, 0, 0)
        method.on_epoch_start(0, 1.0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        setups[name] = (model, method, opt)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    times = {n: [] for n in methods}

    def step(name):
        model, method, opt = setups[name]
        opt.zero_grad(set_to_none=True)
        method.step(model, x, y, crit, autocast)
        opt.step()

    for name in methods:  # warm-up
        for _ in range(3):
            step(name)
    order = list(methods)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no method always runs first after a switch
        for name in order:
            step(name)  # the first step after a switch is not timed
            for _ in range(steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step(name)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"model": model_name, "batch": batch, "device": str(device),
            "median_step_ms": {n: 1e3 * v for n, v in med.items()},
            "ratio_to_sgd": {n: med[n] / med["sgd"] for n in methods}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn-digits,resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="steps per method per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--act-sampler", default="auto", choices=("auto", "fresh", "table"),
                   help="activation-noise random numbers (see dnq.noise.QuantNoise)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    if "sgd" not in methods:
        methods.insert(0, "sgd")
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}")
    for m in a.models.split(","):
        r = bench(m, a.batch_size, torch.device(a.device), a.rounds, a.steps, methods, a.amp, a.act_sampler)
        results.append(r)
        print(f"\n{m}, batch {a.batch_size}, activation-noise sampler {a.act_sampler}:")
        print(f"  {'method':<10}{'median step (ms)':>18}{'ratio to sgd':>14}")
        for n in methods:
            print(f"  {n:<10}{r['median_step_ms'][n]:>18.2f}{r['ratio_to_sgd'][n]:>13.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
