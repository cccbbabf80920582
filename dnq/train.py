"""The trainer: one loop for every method (see :data:`dnq.methods.METHODS`).

Shaped like torchvision's ``references/classification/train.py``: a config, the model, data,
optimizer (SGD + Nesterov) with a cosine schedule, optional SWA, bf16 autocast and
channels_last on CUDA, DistributedDataParallel under ``torchrun``, and a checkpoint every epoch
from which ``--resume`` continues bit for bit (on the CPU). :func:`train_one_epoch`,
:func:`evaluate` and the run folder (:mod:`dnq.rundir`) are separate pieces.

Fair comparisons (the same rules for every method):

* a validation split (``val_size``, default ``"auto"``: 20% of digits' training split, else 10%
  capped at 5,000) is held out of training; per-epoch metrics are measured on it, the test
  split only at the end (and per epoch only when there is no validation split);
* at the end (after SWA, if on), every method's BatchNorm running statistics are recomputed on
  the clean final weights over one pass of the training loader (:mod:`dnq.batchnorm`);
  ``bn_recompute=False`` (``--no-bn-recompute``) keeps the statistics accumulated in training;
* the DNQ noise statistics of the first and last layers are taken at ``first_last_bits`` (8, the
  bits ``dnq ptq`` gives them), and the noise strength ramps linearly over the first quarter of
  the epochs unless ``lambda_warmup`` says otherwise.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per epoch, and a last line
with ``"final": true`` holding the final numbers), ``checkpoint.pt`` (state dicts only;
``torch.load(..., weights_only=True)``), ``model.pt`` (the final weights and what is needed to
rebuild the model and its data splits) and ``result.json``.

Example:
    >>> import os, tempfile
    >>> from dnq.train import TrainConfig, train
    >>> out = os.path.join(tempfile.mkdtemp(), "run")
    >>> result = train(TrainConfig(data="digits", model="cnn-digits", method="dnq", epochs=1, out=out), quiet=True)
    >>> result["method"], result["epochs"], 0.0 <= result["test_acc"] <= 1.0
    ('dnq', 1, True)
    >>> sorted(os.listdir(out))
    ['checkpoint.pt', 'config.json', 'metrics.jsonl', 'model.pt', 'result.json']
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from dnq_landscape_common.device import check_device, resolve_device
from dnq_landscape_common.distributed import init_distributed
from dnq_landscape_common.precision import full_precision

from . import __version__
from .batchnorm import batchnorm_layers, recompute_bn
from .data import DATASET_NAMES, NAMED_DATASETS, BatchLoader, load_dataset
from .errors import ConfigError, NonFiniteLossError
from .io import atomic_write_json
from .methods import METHODS, make_method, upcast
from .models import MODELS, build_model
from .noise import SAMPLERS, LambdaSchedule
from .quant import MAX_BITS, MIN_BITS
from .rundir import (
    CheckpointError,
    MetricsLog,
    RunDir,
    load_checkpoint,
    load_file,
    restore,
    save_checkpoint,
    save_final,
    write_config,
)
from .step_graph import CHECK_EVERY, TrainStep, capture_unavailable, current_lr, make_optimizer, tensor_lr


@dataclass
class TrainConfig:
    """Every setting of a training run (all land in ``config.json``)."""

    data: str = "digits"
    model: str = "cnn-digits"
    method: str = "sgd"
    out: str = "runs/default"
    wbits: int = 4
    abits: int = 4
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    lr_warmup_epochs: int = 0
    lambda_max: float = 1.0
    lambda_start: int = 0
    lambda_warmup: int | None = None  # epochs of the linear ramp; None: a quarter of the epochs
    ema_beta: float = 0.9
    temperature: float = 1.0
    act_rho: float = 0.5
    first_last_bits: int | None = 8  # the PTQ the model is prepared for keeps first/last at these bits
    noise_first_last_bits: int | None = None  # None: follow first_last_bits
    act_sampler: str = "auto"
    calib_size: int = 256
    sam_rho: float = 0.05
    swa_start: float | None = None
    bn_recompute: bool = True
    val_size: int | float | str | None = "auto"
    val_seed: int = 0
    seed: int = 0
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    amp: bool | None = None  # bf16 autocast; None: on CUDA only
    channels_last: bool | None = None  # None: on CUDA only
    compile: bool = False
    cuda_graph: bool | None = None  # capture the whole step in a CUDA graph; None: on CUDA wherever it applies
    eval_batch_size: int = 1024

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("out", "device", "compile", "cuda_graph", "download", "data_root", "eval_batch_size")
# Settings a resumption may change on purpose (after a NaN stop: a lower lr or noise strength, a
# warm-up, more or fewer epochs); the changes are recorded in config.json under "resumed".
RESUME_ADJUSTABLE = ("lr", "lr_warmup_epochs", "lambda_max", "lambda_start", "lambda_warmup", "epochs")


def validate(cfg: TrainConfig) -> None:
    """Check every setting at the entry point; raise :class:`ConfigError` naming the valid values.

    The checks go by section: names (data, model, method, folder), bit-widths, counts, numbers and
    their ranges, and the device and precision switches.
    """
    _validate_names(cfg)
    _validate_bits(cfg)
    _validate_counts(cfg)
    _validate_numbers(cfg)
    _validate_switches(cfg)


def _validate_names(cfg: TrainConfig) -> None:
    for key in ("data", "model", "method", "out", "device", "act_sampler"):
        if not isinstance(getattr(cfg, key), str):
            raise ConfigError(f"{key} must be a string, got {getattr(cfg, key)!r}")
    if not cfg.out.strip():
        raise ConfigError("--out is empty (an unset shell variable?); give the run folder's path")
    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; valid models: {', '.join(MODELS)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; valid methods: {', '.join(METHODS)}")
    if not (cfg.data in NAMED_DATASETS or cfg.data.startswith(("npz:", "synthetic:"))):
        raise ConfigError(f"unknown dataset {cfg.data!r}; valid datasets: {', '.join(DATASET_NAMES)}")


def _validate_bits(cfg: TrainConfig) -> None:
    for key in ("wbits", "abits") + tuple(k for k in ("first_last_bits", "noise_first_last_bits")
                                          if getattr(cfg, k) is not None):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or not MIN_BITS <= v <= MAX_BITS:
            raise ConfigError(f"{key} must be an integer in {MIN_BITS}..{MAX_BITS}, got {v!r}")


def _validate_counts(cfg: TrainConfig) -> None:
    for key in ("epochs", "lr_warmup_epochs", "lambda_start", "lambda_warmup", "val_seed", "seed", "batch_size",
                "calib_size", "eval_batch_size"):
        v = getattr(cfg, key)
        if v is None and key == "lambda_warmup":
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key} must be an integer, got {v!r}")
        low = 1 if key in ("epochs", "batch_size", "calib_size", "eval_batch_size") else 0
        if v < low:
            raise ConfigError(f"{key} must be >= {low}, got {v}" + (" (0 would save an untrained model)"
                                                                   if key == "epochs" else ""))
    v = cfg.val_size
    if not (v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            or (isinstance(v, float) and 0 <= v < 1)):
        raise ConfigError(f"val_size must be 'auto', a fraction in [0, 1), a count >= 0 or 0/None for no validation "
                          f"split, got {v!r}")


def _validate_numbers(cfg: TrainConfig) -> None:
    for key in ("lr", "momentum", "weight_decay", "label_smoothing", "lambda_max", "ema_beta", "temperature", "act_rho",
                "sam_rho") + (("swa_start",) if cfg.swa_start is not None else ()):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v!r}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1 or cfg.weight_decay < 0 or not 0 <= cfg.label_smoothing < 1:
        raise ConfigError("need 0 <= momentum < 1, weight_decay >= 0 and 0 <= label_smoothing < 1")
    if cfg.lambda_max < 0 or cfg.temperature <= 0 or cfg.act_rho < 0 or not 0 <= cfg.ema_beta < 1:
        raise ConfigError("need lambda_max >= 0, temperature > 0, act_rho >= 0 and 0 <= ema_beta < 1")
    if cfg.act_sampler not in SAMPLERS:
        raise ConfigError(f"unknown act_sampler {cfg.act_sampler!r}; valid: {', '.join(SAMPLERS)}")
    if cfg.sam_rho <= 0:
        raise ConfigError(f"sam_rho must be > 0, got {cfg.sam_rho}")
    if cfg.swa_start is not None and not 0 < cfg.swa_start < 1:
        raise ConfigError("swa_start is the fraction of training after which SWA averages, in (0, 1); "
                          f"got {cfg.swa_start}")


def _validate_switches(cfg: TrainConfig) -> None:
    check_device(cfg.device, ConfigError)
    for key in ("amp", "channels_last", "cuda_graph"):
        if getattr(cfg, key) not in (None, True, False):
            raise ConfigError(f"{key} must be true, false or null (on CUDA only), got {getattr(cfg, key)!r}")
    for key in ("compile", "bn_recompute"):
        if not isinstance(getattr(cfg, key), bool):
            raise ConfigError(f"{key} must be true or false, got {getattr(cfg, key)!r}")


def noise_first_last_bits(cfg: TrainConfig) -> int | None:
    """Bits of the first/last layers' noise statistics: ``noise_first_last_bits`` if set, else
    ``first_last_bits`` (the bits the PTQ gives them)."""
    return cfg.first_last_bits if cfg.noise_first_last_bits is None else cfg.noise_first_last_bits


def default_lambda_warmup(epochs: int) -> int:
    """The default ramp: lambda grows linearly over the first quarter of the epochs (at least 1)."""
    return max(1, math.ceil(epochs / 4))


def resolve_defaults(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with every setting that depends on others decided (what ``config.json`` records):
    precision (:func:`resolve_precision`) and the lambda ramp's length."""
    cfg = resolve_precision(cfg, device)
    if cfg.lambda_warmup is None:
        cfg = dataclasses.replace(cfg, lambda_warmup=default_lambda_warmup(cfg.epochs))
    return cfg


def resolve_precision(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with ``amp`` and ``channels_last`` decided: unset means on for CUDA, off elsewhere.
    Both can be forced on the CPU (bf16 autocast and channels_last run there too), which is how
    the CUDA paths are tested without a GPU."""
    cuda = device.type == "cuda"
    return dataclasses.replace(cfg, amp=cuda if cfg.amp is None else cfg.amp,
                               channels_last=cuda if cfg.channels_last is None else cfg.channels_last)


def make_autocast(device: torch.device, amp: bool, cache: bool = True):
    """A factory of the training forward's autocast context: bf16 on ``device``'s type, or none.

    ``cache=False`` turns off autocast's cache of casted weights, as a CUDA graph capture needs
    (the numbers are the same)."""
    if not amp:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


# ----------------------------------------------------------------------------------- helpers
def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torchvision

    return {"dnq": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "platform": platform.platform(),
            "cuda": torch.version.cuda, "git_commit": git_commit(), "argv": sys.argv}


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, autocast=contextlib.nullcontext) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over the loader, summed over ranks.

    The model is evaluated in eval mode and put back in its previous mode. An empty loader (no
    validation split) gives ``(nan, nan)``.
    """
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    tot = torch.zeros(3, dtype=torch.float64, device=dev)
    try:
        for x, y in loader:
            with autocast():
                out = model(x)
            tot[0] += nn.functional.cross_entropy(upcast(out), y, reduction="sum").double()
            tot[1] += (out.argmax(1) == y).sum()
            tot[2] += len(y)
    finally:
        model.train(was)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tot)
    loss, correct, n = tot.tolist()
    if n == 0:
        return math.nan, math.nan
    return loss / n, correct / n


def make_criterion(cfg: TrainConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def model_meta(cfg: TrainConfig, ds) -> dict:
    """What :func:`load_model` needs to rebuild the network and its input normalization."""
    data = f"npz:{os.path.abspath(os.path.expanduser(cfg.data[4:]))}" if cfg.data.startswith("npz:") else cfg.data
    return {"arch": cfg.model, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "image_size": ds.image_size, "data": data, "mean": list(ds.mean), "std": list(ds.std),
            "max_value": ds.max_value, "val_size": ds.val_size, "val_seed": ds.val_seed or 0,
            "data_root": os.path.abspath(os.path.expanduser(cfg.data_root or "data")),
            "data_sha256": ds.fingerprint()}


def check_run_folder(run_dir: str | os.PathLike) -> None:
    """Raise ``FileNotFoundError`` naming what is missing: the folder itself, or its ``model.pt``
    (a training that did not finish)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist; give the folder of a trained run (the --out of "
                                "`dnq train`)")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is a file, not a run folder; give the --out of `dnq train`")
    if not (run_dir / "model.pt").is_file():
        if (run_dir / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"{run_dir} has a checkpoint but no model.pt: its training did not finish; "
                                    "continue it with `dnq train ... --resume`")
        raise FileNotFoundError(f"{run_dir} holds no model.pt: it is not a finished `dnq train` run")


def load_model(run_dir: str | os.PathLike, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the final model of a run folder (weights loaded with ``weights_only=True``).

    Returns ``(model in eval mode, metadata)``.
    """
    path = Path(run_dir) / "model.pt"
    check_run_folder(run_dir)
    fix = "train the run again (dnq train ... --overwrite)"
    blob = load_file(path, fix, map_location=device)
    try:
        meta = blob["meta"]
        model = build_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
        model.load_state_dict(blob["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a model written by dnq train ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''}); {fix}") from None
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Train a model as ``cfg`` says; returns the final metrics (also in ``result.json``).

    The final model's BatchNorm statistics are recomputed on its clean weights over one pass of
    the training loader (:mod:`dnq.batchnorm`) for every method, unless ``cfg.bn_recompute`` is
    False; the final validation and test numbers are measured in float32 with them.

    Raises:
        ConfigError: a bad setting or an existing run folder (names the fix).
        DataError: a dataset that cannot be loaded.
        NonFiniteLossError: a NaN/Inf loss; the message names epoch and step, and the last good
            checkpoint stays in the run folder.
    """
    validate(cfg)
    want = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    rank, world, local_rank, own_pg = init_distributed(want)
    benchmark = torch.backends.cudnn.benchmark  # autotuning is turned on for CUDA; the caller's is restored
    try:
        return _Run(cfg, rank, world, local_rank, quiet).fit(resume, overwrite)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if own_pg:
            dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def train_one_epoch(step: TrainStep, method, loader: BatchLoader, scheduler, *, epoch: int, out: Path,
                    bar=None) -> tuple[torch.Tensor, int]:
    """One epoch of ``method``'s steps (``step``: :class:`dnq.step_graph.TrainStep`); returns
    ``([sum of losses, correct], samples seen)`` (a device tensor). The losses stay on the device;
    they are read (a host sync: the finite-loss check and the progress bar) every
    :data:`dnq.step_graph.CHECK_EVERY` steps of the step's mode and at the end."""
    steps = len(loader)
    step.net.train()
    step.new_epoch()
    every = CHECK_EVERY[step.mode]
    seen = 0
    bound = step.loader is not None  # the step samples its batches itself (static buffers, in the graph)
    if bound:
        loader.begin_static_epoch()
    batches = None if bound else iter(loader)
    for i in range(steps):
        if bound:
            step.next()
            seen += loader.batch_size // loader.world_size
        else:
            x, y = next(batches)
            step(x, y)
            seen += len(y)
        if i % every == every - 1 or i == steps - 1:
            _check_finite(step.losses[: i + 1], epoch, out)
            if bar is not None:
                bar.set_postfix(loss=f"{float(step.losses[i]):.4f}", acc=f"{float(step.correct) / seen:.3f}",
                                lam=f"{method.lam:.3g}")
        scheduler.step()
        if bar is not None:
            bar.update()
    _check_finite(step.losses, epoch, out)
    return torch.stack([step.losses.sum(), step.correct.float()]), seen


class _Run:
    """One training run: the objects of the loop and the run folder (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, local_rank: int, quiet: bool):
        self.device = resolve_device(cfg.device, local_rank)
        self.cfg = resolve_defaults(cfg, self.device)
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.out = Path(cfg.out)
        self.show = not quiet and rank == 0

    # -- setup ------------------------------------------------------------------------------
    def _data(self) -> None:
        cfg = self.cfg
        self.ds = load_dataset(cfg.data, cfg.data_root, cfg.download, val_size=cfg.val_size,
                               val_seed=cfg.val_seed)  # fails before anything is written
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {self.world} processes")
        if cfg.batch_size > len(self.ds.x_train):
            raise ConfigError(f"batch size {cfg.batch_size} is larger than the {len(self.ds.x_train)} training images "
                              f"(after the {self.ds.val_size}-image validation split); use a smaller --batch-size")

    def _check_resume(self, ckpt: dict) -> None:
        need = ("epoch", "config", "world_size", "model", "optimizer", "scheduler", "method", "rng")
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in need) or not isinstance(ckpt["config"], dict):
            raise CheckpointError(f"{self.out / 'checkpoint.pt'} is not a dnq train checkpoint (missing entries); "
                                  "delete it to restart the run from scratch, or start over with --overwrite")
        saved = _upgrade_saved_config(ckpt["config"], self.device.type == "cuda")
        diff = {k: (saved.get(k), v) for k, v in self.cfg.to_dict().items()
                if k not in RESUMABLE_CHANGES + RESUME_ADJUSTABLE and saved.get(k) != v}
        if diff:
            raise ConfigError("cannot resume with different settings (saved, given): "
                              + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items())
                              + f"; only {', '.join(RESUME_ADJUSTABLE)} may change on --resume")
        self.adjusted = {k: (saved.get(k), getattr(self.cfg, k)) for k in RESUME_ADJUSTABLE
                         if saved.get(k) != getattr(self.cfg, k)}
        if self.cfg.epochs <= int(ckpt["epoch"]) and "epochs" in self.adjusted:
            raise ConfigError(f"--epochs {self.cfg.epochs}: the checkpoint is already after epoch "
                              f"{int(ckpt['epoch']) + 1}; give more epochs than that")
        if ckpt["world_size"] != self.world:
            raise ConfigError(f"the run was trained with {ckpt['world_size']} processes; resume it with the same "
                              f"number (got {self.world})")

    def _build(self) -> None:
        cfg, device, ds = self.cfg, self.device, self.ds
        rank, world, cl = self.rank, self.world, cfg.channels_last
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, ds.num_classes, ds.in_channels, ds.image_size).to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        ds.to(device)
        self.train_loader = BatchLoader(ds, cfg.batch_size, True, cfg.seed, rank, world, channels_last=cl)
        self.eval_split = "val" if ds.val_size else "test"  # per-epoch numbers: validation (test only without one)
        self.epoch_loader = BatchLoader(ds, cfg.eval_batch_size, False, rank=rank, world_size=world,
                                        channels_last=cl, split=self.eval_split)
        calib_x = ds.calibration_inputs(cfg.calib_size, cfg.seed)  # training images, validation excluded
        if cl:
            calib_x = calib_x.contiguous(memory_format=torch.channels_last)
        self.method = make_method(cfg.method, cfg.wbits, cfg.abits, cfg.sam_rho, cfg.ema_beta, cfg.temperature,
                                  cfg.act_rho, noise_first_last_bits(cfg), cfg.act_sampler)
        self.method.setup(model, calib_x, device, cfg.seed, rank)
        self.schedule = LambdaSchedule(cfg.lambda_max, cfg.lambda_start, cfg.lambda_warmup)
        self.step_mode, self.why_eager = self._step_mode(world)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, static=self.step_mode != "eager")
        steps = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(max(1, cfg.epochs * steps), cfg.lr_warmup_epochs * steps))
        self.swa_epoch = None if cfg.swa_start is None else min(cfg.epochs - 1, int(cfg.swa_start * cfg.epochs))
        self.swa = torch.optim.swa_utils.AveragedModel(model) if self.swa_epoch is not None else None
        self.criterion = make_criterion(cfg)
        self.autocast = make_autocast(device, cfg.amp, cache=self.step_mode != "graph")
        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.local_rank] if device.type == "cuda" else None)
        self.net = torch.compile(net) if cfg.compile else net
        self.step = TrainStep(self.net, self.method, self.optimizer, self.criterion, self.autocast,
                              steps=steps, mode=self.step_mode, device=device)
        if self.step_mode != "eager":
            self.step.bind(self.train_loader)

    def _step_mode(self, world: int) -> tuple[str, str | None]:
        """``"graph"`` where the step can be captured and ``cuda_graph`` is not False, else
        ``"eager"`` (and why not, said in one line when a capture was asked for or expected)."""
        cfg = self.cfg
        if cfg.cuda_graph is False:
            return "eager", "--no-cuda-graph"
        why = capture_unavailable(self.device, world=world, compiled=cfg.compile, method=self.method)
        if why is None:
            return "graph", None
        if self.rank == 0 and (cfg.cuda_graph or self.device.type == "cuda"):
            warnings.warn(f"the training step is not captured in a CUDA graph: {why}; it runs eagerly", stacklevel=3)
        return "eager", why

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool, overwrite: bool) -> dict:
        """Check everything, then open the run folder (locked), train, finish; a failure before
        the first checkpoint leaves the folder as it was (see :class:`dnq.rundir.RunDir`)."""
        rank, world = self.rank, self.world
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest convolution once
        rundir = RunDir(self.out, resume, overwrite)
        if rank == 0:
            rundir.check()
        self._data()
        ckpt = None
        self.adjusted = {}
        if resume:
            ckpt = load_checkpoint(self.out)
            self._check_resume(ckpt)
        self._build()  # every check has passed before anything is written
        if rank == 0:
            rundir.open()
        _barrier(world)
        try:
            result = self._run(ckpt)
        except BaseException:
            if rank == 0:
                rundir.rollback()
            raise
        else:
            if rank == 0:
                rundir.commit()
        finally:
            if rank == 0:
                rundir.close()
        return result

    def _run(self, ckpt: dict | None) -> dict:
        cfg, out, rank, world = self.cfg, self.out, self.rank, self.world
        start = 0
        if ckpt is not None:
            start = restore(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, swa=self.swa,
                            method=self.method, device=self.device)
            if self.adjusted:
                self._apply_adjustments(start)
            if self.step_mode != "eager":
                tensor_lr(self.optimizer)  # load_state_dict put back the checkpoint's float
        elif rank == 0:
            write_config(out, {**cfg.to_dict(), "world_size": world, "resolved_device": str(self.device),
                               "splits": self._splits(), "step": self._step_record(), "environment": environment()})
        log = MetricsLog(out, start - 1) if rank == 0 else None
        for epoch in range(start, cfg.epochs):
            self._epoch(epoch, log)
        return self._finish()

    def _apply_adjustments(self, start: int) -> None:
        """A resumption with a changed lr, warm-up, lambda schedule or epochs: the schedules are
        rebuilt from the new settings at the checkpoint's step; config.json records the change."""
        cfg = self.cfg
        steps = len(self.train_loader)
        self.scheduler.lr_lambdas = [_lr_lambda(max(1, cfg.epochs * steps), cfg.lr_warmup_epochs * steps)]
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["initial_lr"] = cfg.lr
            g["lr"] = cfg.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        if self.rank == 0:
            path = self.out / "config.json"
            saved = json.loads(path.read_text())
            changed = {k: {"from": a, "to": b} for k, (a, b) in self.adjusted.items()}
            saved.setdefault("resumed", []).append({"at_epoch": start, "changed": changed})
            for k, (_, b) in self.adjusted.items():
                saved[k] = b
            atomic_write_json(path, saved)

    def _step_record(self) -> dict:
        """How the training step runs (``config.json``): its mode, why it is not captured, the
        optimizer's form, and the training images each epoch leaves out (the last partial batch
        is dropped, so every step has one static shape)."""
        n, b = len(self.ds.x_train), self.cfg.batch_size
        return {"mode": self.step_mode, "cuda_graph": self.step_mode == "graph", "not_captured_because": self.why_eager,
                "optimizer": "SGD, fused, tensor learning rate" if self.step_mode != "eager" else "SGD, foreach",
                "dropped_last_batch": n % b, "steps_per_epoch": n // b}

    def _splits(self) -> dict:
        ds = self.ds
        return {"train": len(ds.x_train), "val": ds.val_size, "test": len(ds.x_test), "val_seed": ds.val_seed}

    def _epoch(self, epoch: int, log) -> None:
        cfg, method, world = self.cfg, self.method, self.world
        t0 = time.perf_counter()
        self.train_loader.set_epoch(epoch)
        lam = self.schedule(epoch) if method.uses_noise else 0.0
        method.on_epoch_start(epoch, lam)
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   dynamic_ncols=True) if self.show else None
        try:
            tr, seen = train_one_epoch(self.step, method, self.train_loader, self.scheduler, epoch=epoch, out=self.out,
                                       bar=bar)
        finally:
            if bar is not None:
                bar.close()
        if self.swa is not None and epoch >= self.swa_epoch:
            self.swa.update_parameters(self.model)
        if world > 1:
            dist.all_reduce(tr)
            for b in self.model.buffers():  # BatchNorm statistics of rank 0, so every rank evaluates one model
                dist.broadcast(b, 0)
        ev_loss, ev_acc = evaluate(self.model, self.epoch_loader, self.autocast)
        steps = len(self.train_loader)
        sp = self.eval_split
        rec = {"epoch": epoch, "train_loss": float(tr[0]) / (steps * world), "train_acc": float(tr[1]) / (seen * world),
               f"{sp}_loss": ev_loss, f"{sp}_acc": ev_acc, "lr": current_lr(self.optimizer),
               "lambda": lam, "time_s": time.perf_counter() - t0, **method.epoch_metrics()}
        rec["images_per_s"] = seen * world / rec["time_s"]
        rec["step"] = self.step.summary()  # eager / static / graph, and the captures and replays so far
        if self.rank == 0:
            save_checkpoint(self.out, epoch=epoch, config=cfg.to_dict(), world_size=world, model=self.model,
                            optimizer=self.optimizer, scheduler=self.scheduler, swa=self.swa, method=method,
                            device=self.device)
            log.append(rec)
            if self.show:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {rec['train_loss']:.4f}  train acc "
                           f"{rec['train_acc']:.4f}  {sp} loss {ev_loss:.4f}  {sp} acc {ev_acc:.4f}  lambda {lam:.3g}  "
                           f"({rec['time_s']:.1f}s, {rec['images_per_s']:.0f} img/s)")
        _barrier(world)

    # -- the end ----------------------------------------------------------------------------
    def _evaluate_final(self, model: nn.Module) -> dict:
        """Validation (when there is a split) and test numbers in float32, as PTQ measures them."""
        ds, cl, res = self.ds, self.cfg.channels_last, {}
        with full_precision():
            for split in (("val",) if ds.val_size else ()) + ("test",):
                loader = BatchLoader(ds, self.cfg.eval_batch_size, False, rank=self.rank, world_size=self.world,
                                     channels_last=cl, split=split)
                res[f"{split}_loss"], res[f"{split}_acc"] = evaluate(model, loader)
        if not ds.val_size:
            res["val_loss"] = res["val_acc"] = None
        return res

    def _finish(self) -> dict:
        cfg, ds, out, rank = self.cfg, self.ds, self.out, self.rank
        self.method.on_train_end()  # clean weights, no noise hooks
        final = self.model
        saved_bn = None
        trained = cfg.epochs > 0
        bn = "as trained"
        if self.swa is not None and trained:
            final = self.swa.module
            if not cfg.bn_recompute:  # the behaviour before the one-rule BatchNorm: non-augmented images
                bn_loader = BatchLoader(ds, cfg.batch_size, True, cfg.seed, 0, 1, channels_last=cfg.channels_last,
                                        augment=False)
                torch.optim.swa_utils.update_bn(bn_loader, self.swa, self.device)
                bn = "swa-update-bn"
        if cfg.bn_recompute and trained and batchnorm_layers(final):
            bn = "recomputed"
            # the numbers with the statistics training left (an SWA average has none of its own)
            saved_bn = self._evaluate_final(final) if self.swa is None else None
            # the training loader as training saw it (same augmentation), a pass of its own (epoch
            # index cfg.epochs), whole on every rank: every rank computes the same statistics
            loader = BatchLoader(ds, cfg.batch_size, True, cfg.seed, 0, 1, channels_last=cfg.channels_last)
            loader.set_epoch(cfg.epochs)
            recompute_bn(final, loader, self.device)
        fin = self._evaluate_final(final)
        result = {"method": cfg.method, "model": cfg.model, "data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed,
                  **fin, "swa": self.swa is not None, "bn": bn, "bn_as_trained": saved_bn, "splits": self._splits(),
                  "precision": "float32"}
        if rank == 0:
            MetricsLog(out, cfg.epochs - 1).append({"epoch": cfg.epochs - 1, "final": True, **fin, "bn": result["bn"]})
            save_final(out, final, model_meta(cfg, ds), result)
            if self.show:
                tqdm.write(f"final ({result['bn']} BatchNorm statistics): "
                           + (f"val acc {fin['val_acc']:.4f}, " if fin["val_acc"] is not None else "")
                           + f"test acc {fin['test_acc']:.4f} -> {out / 'model.pt'}")
        _barrier(self.world)
        return result


def _upgrade_saved_config(saved: dict, cuda: bool) -> dict:
    """A checkpoint's config as this version would have resolved it.

    Runs saved before ``channels_last`` existed had bf16 autocast and channels_last exactly when
    on CUDA. Runs saved before the fair-comparison rules (no ``bn_recompute`` key) had no
    validation split, kept the trained BatchNorm statistics, took the first/last layers' noise at
    the target bits, and their ``gaussian`` was today's ``gaussian-walk``: resuming them needs
    those settings, given explicitly (``--val-size 0 --no-bn-recompute --first-last-bits none``).
    """
    if "channels_last" not in saved:
        saved = {**saved, "amp": bool(saved.get("amp", True)) and cuda, "channels_last": cuda}
    if "bn_recompute" not in saved:
        saved = {**saved, "bn_recompute": False, "val_size": 0, "val_seed": 0, "first_last_bits": None,
                 "method": "gaussian-walk" if saved.get("method") == "gaussian" else saved.get("method")}
    return saved


def _check_finite(losses: torch.Tensor, epoch: int, out: Path) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        step = int(bad.nonzero()[0, 0])
        kept = (f"the last good checkpoint (after epoch {epoch}) is kept in {out / 'checkpoint.pt'}" if epoch > 0
                else "no checkpoint was written (it failed in the first epoch)")
        raise NonFiniteLossError(
            f"non-finite loss ({float(losses[step])}) at epoch {epoch + 1}, step {step + 1}; {kept}. "
            "Lower --lr or the noise strength (--lambda-max), or add --lr-warmup-epochs.")
