"""A finished training run, loaded in one call: the model, its loss, its data splits and the
statistics of its weight quantization noise.

:func:`load_run` rebuilds what ``dnq train`` wrote to a run folder (``model.pt``, read with
``weights_only=True``) together with the dataset and validation split it was trained on, so that
the instruments of :mod:`landscape`, :mod:`dnq.quant` and :mod:`dnq.recon` can be pointed at it
directly.

Examples:
    A trained run (``dnq train ... --out runs/digits-dnq``):

    >>> from dnq import load_run
    >>> run = load_run("runs/digits-dnq")                                         # doctest: +SKIP
    >>> data = run.batches("train", samples=512)     # [(normalized images, labels), ...]  # doctest: +SKIP
    >>> mean, variances = run.weight_noise("W4A4")   # per output channel, by weight name  # doctest: +SKIP

    A folder holding what ``dnq train`` writes at the end, here for an untrained model:

    >>> import shutil, tempfile
    >>> from dnq.models import build_model
    >>> from dnq.rundir import save_final
    >>> out = tempfile.mkdtemp()
    >>> meta = {"arch": "cnn-digits", "num_classes": 10, "in_channels": 1, "image_size": 8, "data": "digits"}
    >>> save_final(out, build_model("cnn-digits", 10, 1, 8), meta, result={})
    >>> run = load_run(out)
    >>> [tuple(x.shape) for x, y in run.batches("train", samples=300)]  # batches of at most 256 images
    [(256, 1, 8, 8), (44, 1, 8, 8)]
    >>> mean, variances = run.weight_noise("W4A4")  # first and last layer at 8 bits, as PTQ gives them
    >>> {name: tuple(v.shape) for name, v in variances.items()}  # one variance per output channel
    {'0.weight': (16,), '3.weight': (32,), '7.weight': (32,), '12.weight': (10,)}
    >>> shutil.rmtree(out)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .data import DataError, Dataset, load_dataset
from .quant import execution_order, layer_bits, parse_bits, weight_error_moments
from .train import load_model


def run_dataset(meta: dict, data: str | None = None, data_root: str | None = None) -> Dataset:
    """The dataset a run was trained on, with its validation split, from the run's metadata.

    Args:
        meta: ``model.pt``'s metadata (:func:`dnq.train.load_model`).
        data: another place for the same data (``npz:NEWPATH`` for a file that moved, or a named
            dataset); its content must be the run's (the SHA-256 ``model.pt`` recorded, or for
            runs written before it was recorded, the split sizes, class count and per-channel
            statistics).
        data_root: folder of the torchvision datasets (default: the run's).

    Raises:
        DataError: the data cannot be loaded (the message says to pass ``--data``), or ``data``
            holds other images than the run's.
    """
    spec = data or meta["data"]
    root = data_root or meta.get("data_root")
    val_size, val_seed = int(meta.get("val_size") or 0), int(meta.get("val_seed") or 0)
    if data is None and spec.startswith("npz:") and not os.path.isfile(os.path.expanduser(spec[4:])):
        raise DataError(f"the run's dataset {spec[4:]} cannot be loaded: the file is not there (moved or deleted?); "
                        "pass its new place as --data npz:NEWPATH (data= in Python), whose content is checked "
                        "against the run's")
    ds = load_dataset(spec, root, val_size=val_size, val_seed=val_seed)
    if data is not None:
        _check_same_data(ds, meta, spec)
    return ds


def _check_same_data(ds: Dataset, meta: dict, spec: str) -> None:
    want = meta.get("data_sha256")
    if want is not None:
        got = ds.fingerprint()
        if got != want:
            raise DataError(f"{spec} holds other data than the run was trained on (SHA-256 {got[:12]}..., the run "
                            f"recorded {want[:12]}...); give the dataset the run was trained on")
        return
    checks = {"classes": (ds.num_classes, meta.get("num_classes")), "validation images": (ds.val_size,
              int(meta.get("val_size") or 0)), "image size": (ds.image_size, meta.get("image_size"))}
    for what, (got, rec) in checks.items():
        if rec is not None and got != rec:
            raise DataError(f"{spec} does not match the run's data ({what}: {got}, the run recorded {rec}); give the "
                            "dataset the run was trained on")
    for what in ("mean", "std"):
        rec, got = meta.get(what), getattr(ds, what)
        if rec is not None and any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(got, rec)):
            raise DataError(f"{spec} does not match the run's data (per-channel {what} {list(got)}, the run recorded "
                            f"{list(rec)}); give the dataset the run was trained on")


@dataclass
class Run:
    """A finished run (:func:`load_run`).

    Attributes:
        path: the run folder.
        model: the final model, in eval mode, on ``device`` (takes normalized images).
        meta: ``model.pt``'s metadata (architecture, data spec, normalization, split).
        dataset: the run's data, with the validation split it held out (:class:`dnq.data.Dataset`;
            images are ``uint8``: :meth:`batches` normalizes them).
        loss_fn: ``torch.nn.functional.cross_entropy``: the plain cross-entropy that PTQ, the
            study and the curvature instruments measure (training used label smoothing, see
            ``config["label_smoothing"]``).
        config: the run's ``config.json`` (every training setting), or ``{}`` when absent.
        device: where the model and the batches live.
    """

    path: Path
    model: nn.Module
    meta: dict
    dataset: Dataset
    loss_fn: object = nn.functional.cross_entropy
    config: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")

    def batches(self, split: str = "train", samples: int | None = 512, batch_size: int = 256,
                seed: int | None = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(normalized images, labels)`` batches of a split, on :attr:`device`, without
        augmentation: a list, the same on every pass (what :class:`landscape.HessianOperator`
        needs).

        Args:
            split: ``"train"`` (the training images, validation excluded), ``"val"`` or ``"test"``.
            samples: how many images (``None``: the whole split).
            batch_size: images per batch.
            seed: a seeded choice of ``samples`` images (``None``: the first ones, in order).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x, y = self.dataset.split(split)
        n = len(y) if samples is None else min(int(samples), len(y))
        if n < 1:
            raise ValueError(f"the {split} split of {self.path} is empty" if not len(y) else
                             f"samples must be >= 1, got {samples}")
        if seed is None:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        idx = idx.to(x.device)
        xs, ys = self.dataset.normalize(x[idx]).to(self.device), y[idx].to(self.device)
        return [(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, n, batch_size)]

    def calibration_images(self, n: int = 256, seed: int = 0) -> torch.Tensor:
        """``n`` normalized training images (validation excluded), a seeded choice: the
        calibration set of ``dnq ptq`` (same seed, same images)."""
        return self.dataset.calibration_inputs(n, seed).to(self.device)

    def weight_bits(self, bits: str = "W4A4", first_last_bits: int | None = 8) -> dict[str, int]:
        """Weight bits per Conv/Linear layer as PTQ gives them at ``bits`` (first and last layer,
        in execution order, at ``first_last_bits``)."""
        (w, a), = parse_bits(bits)
        order = execution_order(self.model, self.calibration_images(2))
        return {n: wb for n, (wb, _) in layer_bits(order, w, a, first_last_bits).items()}

    def weight_noise(self, bits: str = "W4A4", first_last_bits: int | None = 8) -> tuple[dict, dict]:
        """``(mean, variances)`` of the weight quantization error ``Q(W) - W`` per output channel,
        by weight name (float64 ``(C,)`` tensors), at the bits PTQ gives each layer: the noise DNQ
        models, in the form :func:`landscape.predicted_loss_increase` takes
        (``predicted_loss_increase(op, variances, mean)``)."""
        return weight_error_moments(self.model, self.weight_bits(bits, first_last_bits))


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu", *, data: str | None = None,
             data_root: str | None = None) -> Run:
    """Load a finished ``dnq train`` run folder.

    Args:
        path: the run folder (the ``--out`` of ``dnq train``).
        device: where to put the model and the data.
        data: the dataset at another place (``npz:NEWPATH``), checked against the run's record.
        data_root: folder of the torchvision datasets (default: the run's).

    Raises:
        FileNotFoundError: no such folder, or no ``model.pt`` (an unfinished training).
        dnq.rundir.CheckpointError: a ``model.pt`` that cannot be read (named, with the fix).
        dnq.data.DataError: the run's data cannot be found or differs from the run's.
    """
    device = torch.device(device)
    model, meta = load_model(path, device)
    ds = run_dataset(meta, data, data_root)
    config = {}
    cfg_path = Path(path) / "config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError:
            config = {}
    return Run(Path(path), model, meta, ds, nn.functional.cross_entropy, config, device)
