"""The trainer: one loop for every method (``sgd``, ``dnq``, ``dnq-w``, ``dnq-a``, ``gaussian``, ``sam``).

Shaped like torchvision's ``references/classification/train.py``: a config, the model, data,
optimizer (SGD + Nesterov) with a cosine schedule, optional SWA, bf16 autocast and
channels_last on CUDA, DistributedDataParallel under ``torchrun``, and a checkpoint every epoch
from which ``--resume`` continues bit for bit (on the CPU).

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt``
(state dicts only; ``torch.load(..., weights_only=True)``), ``model.pt`` (the final weights and
what is needed to rebuild the model) and ``result.json``.

Example:
    >>> from dnq.train import TrainConfig, train
    >>> result = train(TrainConfig(data="digits", model="cnn-digits", method="dnq", epochs=2,
    ...                            out="runs/example"), quiet=True, overwrite=True)
    >>> sorted(result)[:2]
    ['epochs', 'method']
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from . import __version__
from .data import DATASET_NAMES, BatchLoader, load_dataset
from .io import atomic_torch_save, atomic_write_json, atomic_write_text, safe_load
from .methods import METHODS, make_method, upcast
from .models import MODELS, build_model
from .noise import SAMPLERS, LambdaSchedule
from .quant import MAX_BITS, MIN_BITS


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the valid values."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


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
    lambda_warmup: int = 0
    ema_beta: float = 0.9
    temperature: float = 1.0
    act_rho: float = 0.5
    noise_first_last_bits: int | None = None
    act_sampler: str = "auto"
    calib_size: int = 256
    sam_rho: float = 0.05
    swa_start: float | None = None
    seed: int = 0
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    amp: bool | None = None  # bf16 autocast; None: on CUDA only
    channels_last: bool | None = None  # None: on CUDA only
    compile: bool = False
    eval_batch_size: int = 1024

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("out", "device", "compile", "download", "data_root", "eval_batch_size")


def validate(cfg: TrainConfig) -> None:
    """Check every setting at the entry point; raise :class:`ConfigError` naming the valid values."""
    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; valid models: {', '.join(MODELS)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; valid methods: {', '.join(METHODS)}")
    if not (cfg.data in ("digits", "cifar10", "cifar100") or cfg.data.startswith(("npz:", "synthetic:"))):
        raise ConfigError(f"unknown dataset {cfg.data!r}; valid datasets: {', '.join(DATASET_NAMES)}")
    for key in ("wbits", "abits") + (("noise_first_last_bits",) if cfg.noise_first_last_bits is not None else ()):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or not MIN_BITS <= v <= MAX_BITS:
            raise ConfigError(f"{key} must be an integer in {MIN_BITS}..{MAX_BITS}, got {v!r}")
    positive_ints = ("batch_size", "calib_size", "eval_batch_size")
    for key in ("epochs", "lr_warmup_epochs", "lambda_start", "lambda_warmup"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in positive_ints:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
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
        raise ConfigError(f"swa_start is the fraction of training after which SWA averages, in (0, 1); got {cfg.swa_start}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"unknown device {cfg.device!r}; valid: auto, cpu, cuda, cuda:N")
    if cfg.device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--device {cfg.device} under torchrun: every process takes the GPU of its LOCAL_RANK, so "
                          "a fixed cuda:N would put all ranks on one GPU; pass --device cuda (or auto) and choose "
                          "GPUs with CUDA_VISIBLE_DEVICES")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device} asked for, but CUDA is not available here; use --device cpu or auto")
    for key in ("amp", "channels_last"):
        if getattr(cfg, key) not in (None, True, False):
            raise ConfigError(f"{key} must be true, false or null (on CUDA only), got {getattr(cfg, key)!r}")
    if not isinstance(cfg.compile, bool):
        raise ConfigError(f"compile must be true or false, got {cfg.compile!r}")


def resolve_precision(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with ``amp`` and ``channels_last`` decided: unset means on for CUDA, off elsewhere.
    Both can be forced on the CPU (bf16 autocast and channels_last run there too), which is how
    the CUDA paths are tested without a GPU."""
    cuda = device.type == "cuda"
    return dataclasses.replace(cfg, amp=cuda if cfg.amp is None else cfg.amp,
                               channels_last=cuda if cfg.channels_last is None else cfg.channels_last)


def make_autocast(device: torch.device, amp: bool):
    """A factory of the training forward's autocast context: bf16 on ``device``'s type, or none."""
    if not amp:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------- helpers
def init_distributed(device_kind: str) -> tuple[int, int, int, bool]:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    Returns ``(rank, world_size, local_rank, initialized_here)``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        # bind the group to this rank's GPU (eager NCCL init; no guessing of the device later)
        dist.init_process_group(backend, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


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


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber anything: an existing non-empty folder needs ``--resume`` or ``--overwrite``."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; pick one")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise ConfigError(f"cannot resume: no checkpoint.pt in {out}; start the run without --resume")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {out} already exists and is not empty; pass --resume to continue it "
                              "or --overwrite to replace it")
        if not (out / "config.json").is_file():
            raise ConfigError(f"refusing to --overwrite {out}: it has no config.json, so it does not look like a run "
                              "folder; pick another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


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

    The model is evaluated in eval mode and put back in its previous mode.
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
    return loss / max(n, 1), correct / max(n, 1)


def make_criterion(cfg: TrainConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def model_meta(cfg: TrainConfig, ds) -> dict:
    """What :func:`load_model` needs to rebuild the network and its input normalization."""
    data = f"npz:{os.path.abspath(os.path.expanduser(cfg.data[4:]))}" if cfg.data.startswith("npz:") else cfg.data
    return {"arch": cfg.model, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "image_size": ds.image_size, "data": data, "mean": list(ds.mean), "std": list(ds.std),
            "max_value": ds.max_value}


def load_model(run_dir: str | os.PathLike, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the final model of a run folder (weights loaded with ``weights_only=True``).

    Returns ``(model in eval mode, metadata)``.
    """
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no model.pt in {run_dir}; is the training finished? (dnq train ... --resume continues it)")
    blob = safe_load(path, map_location=device)
    meta = blob["meta"]
    model = build_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    model.load_state_dict(blob["model"])
    return model.to(device).eval(), meta


def _read_metrics(path: Path, upto_epoch: int) -> list[str]:
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [ln for ln in lines if json.loads(ln)["epoch"] <= upto_epoch]


# ----------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Train a model as ``cfg`` says; returns the final test metrics (also in ``result.json``).

    Raises:
        ConfigError: a bad setting or an existing run folder (names the fix).
        DataError: a dataset that cannot be loaded.
        NonFiniteLossError: a NaN/Inf loss; the message names epoch and step, and the last good
            checkpoint stays in the run folder.
    """
    validate(cfg)
    want = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    rank, world, local_rank, own_pg = init_distributed(want)
    benchmark = torch.backends.cudnn.benchmark  # _train turns autotuning on for CUDA; the caller's is restored
    try:
        return _train(cfg, resume, overwrite, quiet, rank, world, local_rank)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if own_pg:
            dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _train(cfg, resume, overwrite, quiet, rank, world, local_rank) -> dict:
    device = resolve_device(cfg.device, local_rank)
    cfg = resolve_precision(cfg, device)
    out = Path(cfg.out)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest convolution once
    show = not quiet and rank == 0

    # the run folder: only rank 0 touches the disk
    ckpt = None
    ds = load_dataset(cfg.data, cfg.data_root, cfg.download)  # fails before anything is written
    if cfg.batch_size % world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    if rank == 0:
        prepare_run_dir(out, resume, overwrite)
    _barrier(world)
    if resume:
        ckpt = safe_load(out / "checkpoint.pt")
        saved = _upgrade_saved_config(ckpt["config"], cuda)
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
        if diff:
            raise ConfigError("cannot resume with different settings (saved, given): "
                              + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items()))
        if ckpt["world_size"] != world:
            raise ConfigError(f"the run was trained with {ckpt['world_size']} processes; resume it with the same number "
                              f"(got {world})")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.num_classes, ds.in_channels, ds.image_size).to(device)
    channels_last = cfg.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ds.to(device)
    train_loader = BatchLoader(ds, cfg.batch_size, True, cfg.seed, rank, world, channels_last=channels_last)
    test_loader = BatchLoader(ds, cfg.eval_batch_size, False, rank=rank, world_size=world, channels_last=channels_last)
    calib_x = ds.calibration_inputs(cfg.calib_size, cfg.seed)
    if channels_last:
        calib_x = calib_x.contiguous(memory_format=torch.channels_last)

    method = make_method(cfg.method, cfg.wbits, cfg.abits, cfg.sam_rho, cfg.ema_beta, cfg.temperature,
                         cfg.act_rho, cfg.noise_first_last_bits, cfg.act_sampler)
    method.setup(model, calib_x, device, cfg.seed, rank)
    schedule = LambdaSchedule(cfg.lambda_max, cfg.lambda_start, cfg.lambda_warmup)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                weight_decay=cfg.weight_decay)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(max(1, cfg.epochs * steps), cfg.lr_warmup_epochs * steps))
    swa_epoch = None if cfg.swa_start is None else min(cfg.epochs - 1, int(cfg.swa_start * cfg.epochs))
    swa = torch.optim.swa_utils.AveragedModel(model) if swa_epoch is not None else None
    criterion = make_criterion(cfg)
    autocast = make_autocast(device, cfg.amp)

    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if swa is not None and ckpt["swa"] is not None:
            swa.load_state_dict(ckpt["swa"])
        method.load_state_dict(ckpt["method"])
        _set_rng_state(ckpt["rng"], device)
        start_epoch = int(ckpt["epoch"]) + 1
    elif rank == 0:
        atomic_write_json(out / "config.json", {**cfg.to_dict(), "world_size": world, "resolved_device": str(device),
                                                "environment": environment()})
    metrics_path = out / "metrics.jsonl"
    history = _read_metrics(metrics_path, start_epoch - 1) if rank == 0 else []

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        lam = schedule(epoch) if method.uses_noise else 0.0
        method.on_epoch_start(epoch, lam)
        net.train()
        losses = torch.zeros(steps, device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(train_loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show,
                   leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            optimizer.zero_grad(set_to_none=True)
            loss, logits = method.step(net, x, y, criterion, autocast)
            losses[step] = loss
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if step % 20 == 19 or step == steps - 1:  # one host sync every 20 steps
                _check_finite(losses[: step + 1], epoch, out)
                if show:
                    bar.set_postfix(loss=f"{float(losses[step]):.4f}", acc=f"{float(correct) / seen:.3f}",
                                    lam=f"{lam:.3g}")
            optimizer.step()
            scheduler.step()
        bar.close()
        _check_finite(losses, epoch, out)
        if swa is not None and epoch >= swa_epoch:
            swa.update_parameters(model)
        tr = torch.stack([losses.sum(), correct.float()])
        if world > 1:
            dist.all_reduce(tr)
            for b in model.buffers():  # BatchNorm statistics of rank 0, so every rank evaluates one model
                dist.broadcast(b, 0)
        test_loss, test_acc = evaluate(model, test_loader, autocast)
        rec = {"epoch": epoch, "train_loss": float(tr[0]) / (steps * world), "train_acc": float(tr[1]) / (seen * world),
               "test_loss": test_loss, "test_acc": test_acc, "lr": optimizer.param_groups[0]["lr"],
               "lambda": lam, "time_s": time.perf_counter() - t0, **method.epoch_metrics()}
        rec["images_per_s"] = seen * world / rec["time_s"]
        if rank == 0:
            state = {"epoch": epoch, "config": cfg.to_dict(), "world_size": world, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "swa": swa.state_dict() if swa is not None else None, "method": method.state_dict(),
                     "rng": _rng_state(device)}
            atomic_torch_save(state, out / "checkpoint.pt")
            history.append(json.dumps(rec))
            atomic_write_text(metrics_path, "\n".join(history) + "\n")
            if show:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {rec['train_loss']:.4f}  train acc {rec['train_acc']:.4f}  "
                           f"test loss {test_loss:.4f}  test acc {test_acc:.4f}  lambda {lam:.3g}  "
                           f"({rec['time_s']:.1f}s, {rec['images_per_s']:.0f} img/s)")
        _barrier(world)

    final = model
    if method.uses_noise:
        method.noise.act_lambda = 0.0  # the SWA copy shares the activation-noise hooks
    if swa is not None and cfg.epochs > 0:
        bn_loader = BatchLoader(ds, cfg.batch_size, True, cfg.seed, 0, 1, channels_last=channels_last, augment=False)
        torch.optim.swa_utils.update_bn(bn_loader, swa, device)
        final = swa.module
    test_loss, test_acc = evaluate(final, test_loader, autocast)
    result = {"method": cfg.method, "model": cfg.model, "data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed,
              "test_loss": test_loss, "test_acc": test_acc, "swa": swa is not None}
    if rank == 0:
        state = {k: v.detach().to("cpu").contiguous() for k, v in final.state_dict().items()}
        atomic_torch_save({"model": state, "meta": model_meta(cfg, ds), "result": result}, out / "model.pt")
        atomic_write_json(out / "result.json", result)
        if show:
            tqdm.write(f"final: test acc {test_acc:.4f}, test loss {test_loss:.4f} -> {out / 'model.pt'}")
    _barrier(world)
    return result


def _upgrade_saved_config(saved: dict, cuda: bool) -> dict:
    """A checkpoint's config as this version would have resolved it: runs saved before
    ``channels_last`` existed had bf16 autocast and channels_last exactly when on CUDA."""
    if "channels_last" in saved:
        return saved
    return {**saved, "amp": bool(saved.get("amp", True)) and cuda, "channels_last": cuda}


def _check_finite(losses: torch.Tensor, epoch: int, out: Path) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        step = int(bad.nonzero()[0, 0])
        kept = (f"the last good checkpoint (after epoch {epoch}) is kept in {out / 'checkpoint.pt'}" if epoch > 0
                else "no checkpoint was written (it failed in the first epoch)")
        raise NonFiniteLossError(
            f"non-finite loss ({float(losses[step])}) at epoch {epoch + 1}, step {step + 1}; {kept}. "
            "Lower --lr or the noise strength (--lambda-max), or add --lr-warmup-epochs.")
