"""Step time of training methods as ratios to a baseline, on the same model and batch, in one run.

Setups (a method under given settings) are measured round-robin (one short burst each, in a
shuffled order, repeated; the first step after a switch is not timed, and a burst is timed
whole, between two device synchronizations, as the trainer runs steps), so a noisy machine slows
all of them alike; the figure of merit is median(mean step time of a burst) / the same for the
baseline.

    python benchmarks/bench_train.py                          # every method vs sgd: cnn-digits and resnet20
    python benchmarks/bench_train.py --suite issue8           # the targets of issue 8 (see below)
    python benchmarks/bench_train.py --models resnet20 --device cuda --batch-size 512 --json out.json

    python benchmarks/bench_train.py --suite graph            # issue 22: eager vs captured steps (see below)

Targets (issue 2): dnq <= 1.2x sgd; sam is ~2x (two forward/backward passes).
Targets (issue 8, ``--suite issue8``, resnet20): on the CPU, dnq <= 1.2x sgd both in float32 and
with ``--amp --channels-last`` (bf16 autocast), and compiled dnq not slower than eager dnq; on
CUDA, dnq <= 1.3x sgd (bf16, channels_last), and the same compiled-vs-eager comparison.
Targets (issue 22, ``--suite graph``, resnet20 and resnet18 on CIFAR-100-shaped batches of 128,
bf16 + channels_last): on one H200 the captured step (:mod:`dnq.step_graph`, ``graph``) of
resnet20 <= 2.5 ms and of resnet18 <= 3.5 ms, graphed dnq <= 1.2x graphed sgd; each is shown
against its eager step. On the CPU (no capture) the suite compares the capturable step run
eagerly (``static``) with the eager one: it must not be slower.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn as nn

from dnq.methods import METHODS, make_method
from dnq.models import build_model
from dnq.step_graph import TrainStep, make_optimizer
from dnq.train import make_autocast

SHAPES = {"cnn-digits": (1, 8, 10), "mlp-digits": (1, 8, 10)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str, batch: int, device: torch.device, rounds: int, steps: int, setups: dict, baseline: str,
          act_sampler: str = "auto") -> dict:
    """``setups``: label -> (method, amp, channels_last, compile[, step mode]); the step mode
    (:data:`dnq.step_graph.STEP_MODES`, default ``"eager"``) runs the step through
    :class:`dnq.step_graph.TrainStep`. Returns medians and ratios."""
    c, s, k = SHAPES.get(model_name, (3, 32, 100))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, c, s, s, generator=g).to(device)
    y = torch.randint(0, k, (batch,), generator=g).to(device)
    calib0 = torch.randn(256, c, s, s, generator=g).to(device)
    state = {}
    setups = {k: (*v, "eager")[:5] for k, v in setups.items()}
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    for label, (name, amp, cl, comp, mode) in setups.items():
        torch.manual_seed(0)
        model = build_model(model_name, k, c, s).to(device).train()
        x, calib = x0, calib0
        if cl:
            model = model.to(memory_format=torch.channels_last)
            x = x0.contiguous(memory_format=torch.channels_last)
            calib = calib0.contiguous(memory_format=torch.channels_last)
        method = make_method(name, wbits=4, abits=4, act_sampler=act_sampler)
        method.setup(model, calib, device, 0, 0)
        method.on_epoch_start(0, 1.0)
        opt = make_optimizer(model, 1e-3, 0.9, 5e-4, static=mode != "eager")
        net = torch.compile(model) if comp else model
        autocast = make_autocast(device, amp, cache=mode != "graph")
        state[label] = (TrainStep(net, method, opt, crit, autocast, steps=4 * (steps + 1) + 8, mode=mode,
                                  device=device), x)
    times = {n: [] for n in setups}

    def step(label):
        ts, x = state[label]
        ts(x, y)

    compile_s = {}
    for label in setups:  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(3):
            step(label)
        _sync(device)
        compile_s[label] = time.perf_counter() - t0
    order = list(setups)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no setup always runs first after a switch
        for label in order:
            state[label][0].new_epoch()  # the step's loss buffer, in place
            step(label)  # the first step after a switch is not timed
            # a burst of steps between two synchronizations, as the trainer runs them: on a GPU
            # the host queues step k+1 while step k runs (a sync per step would charge every
            # kernel launch to the step time)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(label)
            _sync(device)
            times[label].append((time.perf_counter() - t0) / steps)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"model": model_name, "batch": batch, "device": str(device), "baseline": baseline,
            "setups": {n: {"method": m, "amp": a, "channels_last": c_, "compile": cp, "step": md}
                       for n, (m, a, c_, cp, md) in setups.items()},
            "captures": {n: state[n][0].captures for n in setups},
            "median_step_ms": {n: 1e3 * v for n, v in med.items()},
            "ratio": {n: med[n] / med[baseline] for n in setups},
            "warmup_s": compile_s}


def issue8_suites(cuda: bool) -> list[tuple[str, dict, str]]:
    """(title, setups, baseline) of the issue-8 targets."""
    if cuda:
        return [("bf16 autocast + channels_last",
                 {"sgd": ("sgd", True, True, False), "dnq": ("dnq", True, True, False)}, "sgd"),
                ("compiled vs eager dnq (bf16 + channels_last)",
                 {"dnq eager": ("dnq", True, True, False), "dnq compiled": ("dnq", True, True, True)}, "dnq eager")]
    return [("float32", {"sgd": ("sgd", False, False, False), "dnq": ("dnq", False, False, False)}, "sgd"),
            ("--amp --channels-last (bf16 autocast on the CPU)",
             {"sgd": ("sgd", True, True, False), "dnq": ("dnq", True, True, False)}, "sgd"),
            ("compiled vs eager dnq (float32)",
             {"dnq eager": ("dnq", False, False, False), "dnq compiled": ("dnq", False, False, True)}, "dnq eager")]


def graph_suites(cuda: bool) -> list[tuple[str, dict, str]]:
    """(title, setups, baseline) of the issue-22 comparison: every method eager and captured
    (``static`` on the CPU, where nothing is captured), bf16 autocast + channels_last."""
    mode = "graph" if cuda else "static"
    setups = {}
    for m in ("sgd", "dnq", "sam"):
        setups[f"{m} eager"] = (m, True, True, False, "eager")
        setups[f"{m} {mode}"] = (m, True, True, False, mode)
    return [(f"eager vs {mode} step (bf16 autocast + channels_last)", setups, f"sgd {mode}")]


def _print(title, r):
    print(f"\n{r['model']}, batch {r['batch']}, {r['device']}: {title}")
    print(f"  {'setup':<16}{'median step (ms)':>18}{'ratio':>10}{'warm-up (s)':>14}")
    for n in r["median_step_ms"]:
        print(f"  {n:<16}{r['median_step_ms'][n]:>18.2f}{r['ratio'][n]:>9.2f}x{r['warmup_s'][n]:>14.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="default: cnn-digits,resnet20 (resnet20 with --suite issue8)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--suite", choices=("methods", "issue8", "graph"), default="methods",
                   help="methods: every method vs sgd under one setting; issue8: the issue-8 comparisons; graph: "
                        "the issue-22 eager vs captured steps")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="steps per setup per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA only)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last (default: on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile every setup (methods suite)")
    p.add_argument("--act-sampler", default="auto", choices=("auto", "fresh", "table"),
                   help="activation-noise random numbers (see dnq.noise.QuantNoise)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    amp = cuda if a.amp is None else a.amp
    cl = cuda if a.channels_last is None else a.channels_last
    if a.suite == "issue8":
        suites = issue8_suites(cuda)
        models = (a.models or "resnet20").split(",")
    elif a.suite == "graph":
        suites = graph_suites(cuda)
        models = (a.models or "resnet20,resnet18").split(",")
    else:
        methods = a.methods.split(",")
        if "sgd" not in methods:
            methods.insert(0, "sgd")
        suites = [(f"amp={amp}, channels_last={cl}, compile={a.compile}",
                   {m: (m, amp, cl, a.compile) for m in methods}, "sgd")]
        models = (a.models or "cnn-digits,resnet20").split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    results = []
    for m in models:
        for title, setups, base in suites:
            r = bench(m, a.batch_size, device, a.rounds, a.steps, setups, base, a.act_sampler)
            r["title"] = title
            results.append(r)
            _print(title, r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
