"""The unit costs of a study's plan (:mod:`landscape.study.plan`), timed on the device at hand on
synthetic data of the dataset's shape: nothing is trained, no dataset is loaded or downloaded.

* :func:`data_shape`: the sizes, image shape and classes of a dataset spec, from its name (an
  ``npz:`` file: from its arrays' headers and labels, the images are not read);
* :func:`synthetic_dataset`: random images of that shape (:class:`dnq.data.Dataset`);
* :func:`time_training`: one training step of a run's method as the trainer takes it
  (:class:`dnq.step_graph.TrainStep`, in the mode the trainer would choose), the method's epoch
  start (DNQ's noise statistics), a checkpoint's serialization, a BatchNorm-recompute batch;
* :func:`time_evaluation`: evaluation seconds per image of a model;
* :func:`time_rounding`: one ``rtn`` / ``rtn+bn`` PTQ (:func:`dnq.ptq.apply_ptq`) and the
  quantized model's evaluation per image;
* :func:`time_reconstruction`: a reconstruction's cost per unit and stage: two short runs of
  :func:`dnq.ptq.apply_ptq` give each unit's seconds per step (the difference) and fixed cost
  (caches and evaluations, scaled to the calibration size);
* :func:`time_curvature`: a Hessian-vector product, a block product and a quadratic form (per
  vector), a loss and a gradient, each on one batch of ``hessian_batch`` images, and the
  operator's engine planning.

Every timing synchronizes the device (:func:`landscape._timing.timed`), runs warm-up calls first
and keeps the median of a few repetitions (:func:`median_time`).

Example:
    >>> s = data_shape("synthetic:100:200:32")
    >>> (s.n_train, s.n_test, s.channels, s.size, s.classes)
    (200, 40, 3, 32, 100)
    >>> data_shape("cifar100").n_train, data_shape("digits").size
    (50000, 8)
    >>> ds = synthetic_dataset(s, n_train=16, n_test=8)
    >>> tuple(ds.x_train.shape), ds.num_classes
    ((16, 3, 32, 32), 100)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import statistics
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dnq.batchnorm import recompute_bn
from dnq.data import BatchLoader, Dataset
from dnq.methods import make_method
from dnq.models import build_model
from dnq.ptq import apply_ptq
from dnq.quant import parse_bits
from dnq.step_graph import TrainStep, capture_unavailable, make_optimizer
from dnq.train import evaluate, make_autocast, make_criterion, noise_first_last_bits, resolve_defaults
from dnq_landscape_common.precision import full_precision

from .._timing import timed
from ..hessian import HessianOperator
from ..records import StudyError

__all__ = ["DataShape", "batch_factor", "data_shape", "median_time", "read_json_or_none", "synthetic_dataset",
           "time_curvature", "time_evaluation", "time_reconstruction", "time_rounding", "time_training"]

#: the datasets known by name: (training images, test images, channels, size, classes, white pixel)
_NAMED = {"digits": (1437, 360, 1, 8, 10, 16.0), "cifar10": (50000, 10000, 3, 32, 10, 255.0),
          "cifar100": (50000, 10000, 3, 32, 100, 255.0), "cifar10-subset": (10000, 2000, 3, 32, 10, 255.0)}


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What the plan needs of a dataset: split sizes before any validation split, image shape,
    classes."""

    name: str
    n_train: int
    n_test: int
    channels: int
    size: int
    classes: int
    max_value: float = 255.0


def _npz_header(f: zipfile.ZipFile, key: str) -> tuple:
    """The shape of array ``key`` of an open ``.npz`` (its ``.npy`` header only)."""
    fmt = np.lib.format
    with f.open(f"{key}.npy") as fh:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, _ = read(fh)
    return shape


def _npz_shape(path: str) -> DataShape:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise StudyError(f"npz file not found: {os.path.abspath(path)!r}; give data=npz:PATH with an existing file")
    try:
        with zipfile.ZipFile(path) as f:
            xtr, xte = _npz_header(f, "x_train"), _npz_header(f, "x_test")
        with np.load(path, allow_pickle=False) as f:  # the labels only (small): the number of classes
            classes = int(max(f["y_train"].max(), f["y_test"].max())) + 1
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise StudyError(f"{path} cannot be read as an npz dataset ({type(e).__name__}: {str(e)[:120]})") from None
    if len(xtr) == 4:  # (N, H, W, C) or (N, C, H, W)
        channels = xtr[3] if xtr[3] in (1, 3) and xtr[1] not in (1, 3) else xtr[1]
        size = xtr[2]
    else:  # (N, H, W): grayscale
        channels, size = 1, xtr[-1]
    return DataShape(f"npz:{path}", int(xtr[0]), int(xte[0]), int(channels), int(size), classes)


def data_shape(spec: str, data_root: str | None = None) -> DataShape:
    """The shape of dataset ``spec`` without loading it (``data_root`` is not read: the named
    datasets' sizes are known).

    Raises:
        StudyError: an unknown spec, or an ``npz:`` file that is missing or unreadable.
    """
    if spec in _NAMED:
        return DataShape(spec, *_NAMED[spec])
    if spec.startswith("npz:"):
        return _npz_shape(spec[4:])
    if spec.startswith("synthetic:"):
        parts = spec.split(":")[1:]
        try:
            classes = int(parts[0])
            n = int(parts[1]) if len(parts) > 1 else 10_000
            size = int(parts[2]) if len(parts) > 2 else 32
        except (ValueError, IndexError):
            raise StudyError(f"bad synthetic spec {spec!r}; use synthetic:CLASSES[:N_TRAIN[:SIZE]]") from None
        return DataShape(spec, n, max(n // 5, 1), 3, size, classes)
    raise StudyError(f"unknown dataset {spec!r}; valid: {', '.join(_NAMED)}, npz:PATH, synthetic:CLASSES[:N[:SIZE]]")


def synthetic_dataset(shape: DataShape, n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """Random images and labels of ``shape`` (``n_train`` training and ``n_test`` test images, no
    validation split), normalized as a real dataset is."""
    g = torch.Generator().manual_seed(seed)
    top = int(shape.max_value) + 1

    def images(n):
        return torch.randint(0, top, (n, shape.channels, shape.size, shape.size), generator=g, dtype=torch.uint8)

    def labels(n):
        return torch.randint(0, shape.classes, (n,), generator=g)

    half = (0.5,) * shape.channels
    return Dataset(shape.name, images(n_train), labels(n_train), images(n_test), labels(n_test), shape.classes,
                   half, (0.25,) * shape.channels, augment=shape.size == 32, max_value=shape.max_value)


def median_time(fn, device, repeat: int = 3, warmup: int = 1, enough: float = 1.0) -> float:
    """The median of ``repeat`` synchronized timings of ``fn()`` after ``warmup`` untimed calls;
    a call that takes more than ``enough`` seconds is timed once (its noise is small against it)."""
    for _ in range(warmup):
        fn()
    times = [timed(fn, device)[1]]
    if times[0] > enough:
        return times[0]
    times += [timed(fn, device)[1] for _ in range(max(1, repeat) - 1)]
    return statistics.median(times)


def _model(cfg, shape: DataShape, device) -> nn.Module:
    torch.manual_seed(0)
    return build_model(cfg.model, shape.classes, shape.channels, shape.size).to(device)


# -- training ----------------------------------------------------------------------------------------
def time_training(tc, shape: DataShape, device: torch.device, repeat: int = 3) -> dict:
    """One model's training costs (``tc``: its :class:`dnq.train.TrainConfig`): ``step_s`` (one
    step of its method, batch ``tc.batch_size``, in the trainer's step mode), ``epoch_start_s``
    (the method's work at an epoch's start), ``checkpoint_s`` (serializing model and optimizer),
    ``bn_batch_s`` (one batch of the end-of-training BatchNorm recompute), ``mode``. On CUDA with
    cuDNN's autotuning on, as the trainer runs (the flag is restored after)."""
    saved = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        return _time_training(tc, shape, device, repeat)
    finally:
        torch.backends.cudnn.benchmark = saved


def _time_training(tc, shape: DataShape, device: torch.device, repeat: int) -> dict:
    tc = resolve_defaults(tc, device)
    ds = synthetic_dataset(shape, n_train=tc.batch_size * (repeat + 7), n_test=8).to(device)
    torch.manual_seed(tc.seed)
    model = build_model(tc.model, shape.classes, shape.channels, shape.size).to(device)
    cl = bool(tc.channels_last)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    loader = BatchLoader(ds, tc.batch_size, True, tc.seed, channels_last=cl)
    method = make_method(tc.method, tc.wbits, tc.abits, tc.sam_rho, tc.ema_beta, tc.temperature, tc.act_rho,
                         noise_first_last_bits(tc), tc.act_sampler)
    method.setup(model, ds.calibration_inputs(tc.calib_size, tc.seed), device, tc.seed, 0)
    why = capture_unavailable(device, world=1, compiled=tc.compile, method=method)
    mode = "eager" if tc.cuda_graph is False or why is not None else "graph"
    optimizer = make_optimizer(model, tc.lr, tc.momentum, tc.weight_decay, static=mode != "eager")
    autocast = make_autocast(device, tc.amp, cache=mode != "graph")
    net = torch.compile(model) if tc.compile else model
    step = TrainStep(net, method, optimizer, make_criterion(tc), autocast, steps=len(loader), mode=mode,
                     device=device)
    if mode != "eager":
        step.bind(loader)
    lam = float(tc.lambda_max) if method.uses_noise else 0.0
    _, epoch_start = timed(lambda: method.on_epoch_start(0, lam), device)
    model.train()
    step.new_epoch()
    loader.set_epoch(0)
    if mode != "eager":
        loader.begin_static_epoch()
        run = step.next
    else:
        batches = iter(loader)

        def run():
            step(*next(batches))
    # graph: 3 warm-up steps, the capture, one replay; eager: 2 steps
    step_s = median_time(run, device, repeat=repeat, warmup=5 if mode == "graph" else 2)
    method.on_train_end()
    buf = io.BytesIO()
    _, checkpoint = timed(lambda: torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                                             buf), device)
    batch = [next(iter(BatchLoader(ds, tc.batch_size, True, tc.seed, channels_last=cl)))]
    bn_batch = median_time(lambda: recompute_bn(model, batch, device), device, repeat=repeat)
    return {"step_s": step_s, "epoch_start_s": epoch_start, "checkpoint_s": checkpoint, "bn_batch_s": bn_batch,
            "mode": mode, "amp": bool(tc.amp)}


# -- evaluation and PTQ -----------------------------------------------------------------------------
def _eval_batch(device: torch.device) -> int:
    return 1024 if device.type == "cuda" else 256  # a CPU's cost is linear in the images: fewer suffice


def time_evaluation(model: nn.Module, shape: DataShape, device: torch.device, repeat: int = 2,
                    autocast=None) -> float:
    """Seconds per image of :func:`dnq.train.evaluate` on ``model`` (test-split batches of 1,024
    images as the study takes them; 256 on a CPU, whose cost is linear in the images)."""
    n = _eval_batch(device)
    ds = synthetic_dataset(shape, n_train=8, n_test=n).to(device)
    loader = BatchLoader(ds, 1024, False, split="test")
    if autocast is None:
        return median_time(lambda: evaluate(model, loader), device, repeat=repeat) / n
    return median_time(lambda: evaluate(model, loader, autocast), device, repeat=repeat) / n


def time_rounding(cfg, shape: DataShape, device: torch.device, method: str, bits: str) -> dict:
    """``ptq_s``: one :func:`dnq.ptq.apply_ptq` with ``method`` (``rtn`` / ``rtn+bn``) at ``bits``
    on ``ptq.calib_size`` images under the study's convention; ``eval_image_s``: the quantized
    model's evaluation per image."""
    p = cfg.ptq
    (w, a), = parse_bits(bits)
    model = _model(cfg, shape, device).eval()
    calib = synthetic_dataset(shape, n_train=p["calib_size"], n_test=1).to(device).calibration_inputs(
        p["calib_size"], 0)
    with full_precision():
        def run():
            return apply_ptq(model, method, w, a, calib, range_method=p["range"],
                             first_last_bits=p["first_last_bits"], convention=p["convention"])
        q, ptq_s = run(), median_time(run, device, repeat=1, warmup=0)
        return {"ptq_s": ptq_s, "eval_image_s": time_evaluation(q, shape, device)}


def _recon_once(cfg, model, calib, device, method: str, wa: tuple, iters: int) -> dict:
    p = cfg.ptq
    with full_precision():
        q, seconds = timed(lambda: apply_ptq(
            model, method, wa[0], wa[1], calib, range_method=p["recon_range"], first_last_bits=p["first_last_bits"],
            seed=0, iters=iters, batch_size=p["recon_batch_size"], convention=p["convention"],
            lr_rule=p["recon_lr_rule"]), device)
    return {"total_s": seconds, "units": q.ptq_recon["units"], "model": q}


def time_reconstruction(cfg, shape: DataShape, device: torch.device, method: str, bits: str, iters: int,
                        short: tuple[int, int] | None = None, calib_cap: int = 256) -> dict:
    """One reconstruction's estimated cost at ``iters`` steps per unit, from two short runs of
    ``short`` steps (default 4 and 20 on an accelerator, whose first steps capture the step's graph;
    2 and 8 on a CPU) on ``min(recon_calib_size, calib_cap)`` calibration images: per unit and stage,
    the seconds per step (the difference of the two runs) and the fixed cost (the unit's caches
    and evaluations: the rest of its time, scaled to ``recon_calib_size`` images); the fixed cost
    before the units (BatchNorm folding, initial ranges) as measured.

    Returns:
        ``steps`` (steps of one reconstruction at ``iters``: every unit and stage), ``step_s``
        (their mean seconds per step), ``fixed_s`` (the rest of one reconstruction), ``units``
        (unit-stage pairs) and ``eval_image_s`` (the quantized model's evaluation per image).
    """
    p = cfg.ptq
    (w, a), = parse_bits(bits)
    model = _model(cfg, shape, device).eval()
    n_cal = min(p["recon_calib_size"], calib_cap)
    calib = synthetic_dataset(shape, n_train=n_cal, n_test=1).to(device).calibration_inputs(n_cal, 0)
    k1, k2 = short or ((2, 8) if device.type == "cpu" else (4, 20))
    r1 = _recon_once(cfg, model, calib, device, method, (w, a), k1)
    r2 = _recon_once(cfg, model, calib, device, method, (w, a), k2)
    scale = p["recon_calib_size"] / n_cal
    steps = step_time = 0.0
    fixed = max(r1["total_s"] - sum(u["time_s"] for u in r1["units"]), 0.0)
    for u1, u2 in zip(r1["units"], r2["units"]):
        ds = u2.get("steps", k2) - u1.get("steps", k1)
        per = max((u2["time_s"] - u1["time_s"]) / ds, 0.0) if ds > 0 else 0.0
        full = u2.get("steps", k2) * iters / k2  # this stage's steps at iters (BRECQ's activations: iters // 4)
        steps += full
        step_time += per * full
        fixed += max(u1["time_s"] - per * u1.get("steps", k1), 0.0) * scale
    return {"steps": steps, "step_s": step_time / steps if steps else 0.0, "fixed_s": fixed,
            "units": len(r1["units"]), "eval_image_s": time_evaluation(r2["model"], shape, device)}


# -- curvature ---------------------------------------------------------------------------------------
def time_curvature(cfg, shape: DataShape, device: torch.device, repeat: int = 3, block: int = 4,
                   cpu_images: int = 64) -> dict:
    """The instruments' unit costs on one batch of ``instruments.hessian_batch`` images (seconds):
    ``matvec_s`` (one Hessian-vector product), ``block_s`` and ``form_s`` (per vector, of a block
    product and of quadratic forms, ``block`` vectors at a time), ``loss_s`` (one loss without
    gradients), ``grad_s`` (one gradient), ``setup_s`` (the operator's engine planning: its first
    product and form beyond their steady cost), ``dim`` (parameters), ``layers`` (Conv/Linear
    layers). On a CPU, whose cost is linear in the images, they are timed on ``cpu_images`` images
    and scaled to the batch (the engine planning too: it times its candidates on a quarter of the
    first batch)."""
    n = min(cfg.instruments.hessian_batch, cfg.instruments.hessian_samples)
    timed_n = n if device.type != "cpu" else min(n, cpu_images)
    scale = n / timed_n
    ds = synthetic_dataset(shape, n_train=timed_n, n_test=1).to(device)
    x, y = ds.normalize(ds.x_train), ds.y_train
    model = _model(cfg, shape, device).eval()
    loss_fn = nn.functional.cross_entropy
    with full_precision():
        op = HessianOperator(model, loss_fn, [(x, y)])
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(op.dim, generator=g).to(device=op.device, dtype=op.dtype)
        V = torch.randn(op.dim, block, generator=g).to(device=op.device, dtype=op.dtype)
        _, first_mv = timed(lambda: op.matvec(v), device)
        _, first_q = timed(lambda: op.quadratic_forms(V), device)
        matvec = median_time(lambda: op.matvec(v), device, repeat=repeat, warmup=1)
        form = median_time(lambda: op.quadratic_forms(V), device, repeat=repeat, warmup=0)
        block_s = median_time(lambda: op.matmat(V), device, repeat=repeat, warmup=1)
        grad = median_time(op.gradient, device, repeat=repeat, warmup=1)

        def loss():
            with torch.no_grad():
                return float(loss_fn(model(x), y))
        loss_s = median_time(loss, device, repeat=repeat, warmup=1)
    layers = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return {"matvec_s": scale * matvec, "block_s": scale * block_s / block, "form_s": scale * form / block,
            "loss_s": scale * loss_s, "grad_s": scale * grad,
            "setup_s": scale * (max(first_mv - matvec, 0.0) + max(first_q - form, 0.0)), "dim": op.dim,
            "layers": layers,
            "batch": n, "timed_images": timed_n}


def batch_factor(samples: int, batch: int, device: torch.device) -> float:
    """How many times a product over ``samples`` images costs one over a batch of ``batch``: the
    number of batches on an accelerator (whose cost hardly depends on the batch), the fraction
    ``samples / batch`` on a CPU (whose cost is linear in the images)."""
    n = min(batch, samples)
    return math.ceil(samples / n) if device.type == "cuda" else samples / n


def read_json_or_none(path: Path) -> dict | None:
    """A JSON file's mapping, or None when it is missing or unreadable (a plan never fails on a
    study folder's files: it only reads what is finished)."""
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None
