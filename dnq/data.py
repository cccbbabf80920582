"""Datasets as tensors, and a batch loader that augments on the device.

Every dataset is loaded whole into memory as ``uint8`` images (N, C, H, W) plus ``int64``
labels, the way airbench does it: on CUDA the whole training set lives on the GPU and
random crop + flip run there in batches, so data loading never starves the GPU.

Dataset specs (the ``--data`` flag):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download),
  split 80/20 with a fixed, stratified, seeded split (:data:`DIGITS_SPLIT_SEED`).
* ``cifar10`` / ``cifar100``: torchvision datasets read from ``data_root``; downloaded only
  when ``download=True`` (``--download``).
* ``cifar10-subset``: 1,000 training and 200 test images per class of CIFAR-10 (10,000 /
  2,000), a seeded choice (:data:`SUBSET_SEED`) from torchvision's CIFAR-10 in ``data_root``,
  shuffled: the recipe of the subset the project's cifar10-subset numbers were measured on.
  Those used JPEG-decoded copies of the same images (``npz:PATH`` reads such a file), so
  accuracies on this subset are close to, not identical with, the published ones.
* ``npz:PATH``: a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (uint8 images, HWC or
  CHW, or HW for grayscale).
* ``synthetic:CLASSES[:N_TRAIN[:SIZE]]``: random uint8 images (3 x SIZE x SIZE, default 32) for
  throughput checks; labels are random, so accuracy is meaningless.

**Validation split** (``val_size``): a stratified, seeded part of the training split held out of
training (:meth:`Dataset.hold_out`): per-epoch metrics and every choice a study makes use it,
the test split is for final numbers only. ``"auto"`` (:func:`resolve_val_size`) holds out 20%
of digits and, elsewhere, 10% of the training images but at most 5,000 (5,000 of CIFAR's 50,000).
The split depends only on ``val_seed`` (default 0), never on the training seed, so every method
and seed is selected on the same images. Calibration images always come from what is left of
the training split.

Example:
    >>> from dnq.data import load_dataset
    >>> ds = load_dataset("digits")
    >>> tuple(ds.x_train.shape), ds.num_classes
    ((1437, 1, 8, 8), 10)
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import DataError

DIGITS_SPLIT_SEED = 0
VAL_SPLIT_SEED = 0
DATASET_NAMES = ("digits", "cifar10", "cifar100", "cifar10-subset", "npz:PATH", "synthetic:CLASSES[:N_TRAIN[:SIZE]]")
#: the datasets known by name (the others: npz:PATH, synthetic:...)
NAMED_DATASETS = ("digits", "cifar10", "cifar100", "cifar10-subset")
#: seed of the cifar10-subset choice (per class: 1,000 training and 200 test images)
SUBSET_SEED = 0
SUBSET_PER_CLASS = (1000, 200)


@dataclass
class Dataset:
    """A whole dataset in memory.

    Attributes:
        name: the spec it was loaded from.
        x_train, x_test: ``uint8`` images of shape (N, C, H, W).
        y_train, y_test: ``int64`` labels.
        x_val, y_val: the validation images and labels held out of the training split (empty
            when there is none; see :meth:`hold_out`).
        num_classes: number of classes.
        mean, std: per-channel statistics of the training images, in [0, 1] units.
        augment: whether standard random-crop + flip augmentation applies (32x32 data).
        max_value: the value of a white pixel (255, or 16 for digits).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    max_value: float = 255.0
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    val_seed: int | None = None
    _consts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.x_val is None:
            self.x_val = self.x_train[:0]
            self.y_val = self.y_train[:0]

    @property
    def val_size(self) -> int:
        return int(len(self.x_val))

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def hold_out(self, val_size: int, seed: int = VAL_SPLIT_SEED) -> "Dataset":
        """Move ``val_size`` training images into the validation split (returns self).

        Stratified by label when every class has at least two images (scikit-learn's
        ``train_test_split``), seeded by ``seed`` alone. The normalization statistics stay those
        of the full training split, so a model's input pipeline does not depend on the split.
        """
        if self.val_size:
            raise DataError("this dataset already has a validation split; load it again to split differently")
        n = len(self.x_train)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < n:
            raise DataError(f"validation size must be an integer in 0..{n - 1} (the {n} training images), "
                            f"got {val_size!r}")
        if val_size == 0:
            return self
        from sklearn.model_selection import train_test_split

        y = self.y_train.cpu().numpy()
        counts = np.bincount(y)
        classes = int((counts > 0).sum())
        stratify = y if counts[counts > 0].min() >= 2 and classes <= val_size <= n - classes else None
        idx_tr, idx_val = train_test_split(np.arange(n), test_size=val_size, random_state=seed, stratify=stratify)
        idx_tr, idx_val = np.sort(idx_tr), np.sort(idx_val)
        dev = self.x_train.device
        t_tr, t_val = torch.from_numpy(idx_tr).to(dev), torch.from_numpy(idx_val).to(dev)
        self.x_val, self.y_val = self.x_train[t_val], self.y_train[t_val]
        self.x_train, self.y_train = self.x_train[t_tr], self.y_train[t_tr]
        self.val_seed = seed
        return self

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def to(self, device) -> "Dataset":
        """Move the image and label tensors to ``device`` (returns self)."""
        for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def fingerprint(self) -> str:
        """SHA-256 of the images and labels of every split (training, validation and test
        together, in the order loaded): equal fingerprints mean the same data."""
        h = hashlib.sha256()
        for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            t = getattr(self, k).detach().cpu().contiguous()
            h.update(k.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def normalize(self, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Map uint8 images to normalized float images.

        The mean and std tensors are made once per device and dtype (a host-to-device copy per
        batch would block the GPU's stream every step)."""
        key = (x.device, dtype)
        consts = self._consts.get(key)
        if consts is None:
            consts = self._consts[key] = (torch.tensor(self.mean, dtype=dtype).view(1, -1, 1, 1).to(x.device),
                                          torch.tensor(self.std, dtype=dtype).view(1, -1, 1, 1).to(x.device))
        mean, std = consts
        return (x.to(dtype) / self.max_value - mean) / std

    def calibration_inputs(self, n: int = 256, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        """``n`` normalized, non-augmented training images chosen with a seeded permutation."""
        if n < 1:
            raise DataError(f"calibration size must be >= 1, got {n}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.x_train), generator=g)[: min(n, len(self.x_train))]
        return self.normalize(self.x_train[idx.to(self.x_train.device)], dtype)


def _channel_stats(x: torch.Tensor, max_value: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.double() / max_value
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _to_nchw(x: np.ndarray, key: str, path: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {x.dtype}; expected uint8 images (0..255)")
    if x.ndim == 3:  # N, H, W grayscale
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: {key} has shape {x.shape}; expected (N,H,W,C), (N,C,H,W) or (N,H,W)")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.shape[1] in (1, 3):
        return x
    raise DataError(f"{path}: cannot tell channels in {key} of shape {x.shape}; "
                    "store images as (N,H,W,C) or (N,C,H,W) with 1 or 3 channels")


def _load_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # values 0..16
    y = d.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=y))


def _load_torchvision(name: str, data_root: str | None, download: bool):
    import torchvision

    root = os.path.expanduser(data_root or "data")
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        tr = cls(root, train=True, download=download)
        te = cls(root, train=False, download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted."
        folder = os.path.join(os.path.abspath(root), getattr(cls, "base_folder", name))
        raise DataError(
            f"{name} not found (or corrupted) under the data root {os.path.abspath(root)!r} (torchvision reads it "
            f"from, and --download writes it to, {folder!r}); pass --download to fetch it there, point --data-root "
            f"at a folder that holds it, or give the images as a file with --data npz:PATH (uint8 x_train, y_train, "
            f"x_test, y_test)"
        ) from None
    except PermissionError as e:
        raise DataError(f"{name} under {os.path.abspath(root)!r} cannot be read: permission denied ({e.filename}); "
                        "make the files readable (chmod u+r)") from None
    xtr = np.ascontiguousarray(tr.data.transpose(0, 3, 1, 2))
    xte = np.ascontiguousarray(te.data.transpose(0, 3, 1, 2))
    return xtr, xte, np.asarray(tr.targets, np.int64), np.asarray(te.targets, np.int64)


def _subset(x: np.ndarray, y: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every class, a seeded choice, then shuffled with the same generator."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise DataError(f"cifar10-subset: class {int(c)} has only {len(idx)} images, {per_class} needed")
        picks.append(np.sort(rng.choice(idx, per_class, replace=False)))
    order = rng.permutation(np.concatenate(picks))
    return np.ascontiguousarray(x[order]), y[order]


def _load_cifar10_subset(data_root: str | None, download: bool):
    """The seeded CIFAR-10 subset (module doc) from torchvision's CIFAR-10."""
    xtr, xte, ytr, yte = _load_torchvision("cifar10", data_root, download)
    xtr, ytr = _subset(xtr, ytr, SUBSET_PER_CLASS[0], SUBSET_SEED)
    xte, yte = _subset(xte, yte, SUBSET_PER_CLASS[1], SUBSET_SEED)
    return xtr, xte, ytr, yte


def _labels(y: np.ndarray, key: str, path: str) -> np.ndarray:
    """Integer class labels 0..K-1 as int64, or a :class:`DataError` naming the problem."""
    if y.ndim != 1:
        raise DataError(f"{path}: {key} has shape {y.shape}; labels must be one integer per image (shape (N,)), "
                        "not one-hot or 2-D")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{path}: {key} holds non-integer values; labels must be class indices 0..K-1")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} has dtype {y.dtype}; labels must be integers 0..K-1")
    return y.astype(np.int64)


def _load_npz(path: str):
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"npz file not found: {os.path.abspath(path)!r}; give --data npz:PATH with an existing file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path} cannot be read: permission denied; make it readable (chmod u+r {path})")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes); an npz dataset needs x_train, y_train, x_test, y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing}; "
                                "an npz dataset needs x_train, y_train, x_test, y_test")
            xtr = _to_nchw(f["x_train"], "x_train", path)
            xte = _to_nchw(f["x_test"], "x_test", path)
            ytr, yte = _labels(f["y_train"], "y_train", path), _labels(f["y_test"], "y_test", path)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path} cannot be read as an npz file ({type(e).__name__}: {str(e)[:120]}); it may be "
                        "truncated or not an npz (np.savez) file") from None
    if len(xtr) == 0 or len(xte) == 0:
        raise DataError(f"{path}: the {'training' if len(xtr) == 0 else 'test'} split is empty; both need images")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"{path}: image and label counts differ "
                        f"({len(xtr)}/{len(ytr)} train, {len(xte)}/{len(yte)} test)")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{path}: train images {xtr.shape[1:]} and test images {xte.shape[1:]} differ in shape")
    return xtr, xte, ytr, yte


def _load_synthetic(arg: str):
    parts = arg.split(":")
    try:
        classes = int(parts[0])
        n_train = int(parts[1]) if len(parts) > 1 else 10_000
        size = int(parts[2]) if len(parts) > 2 else 32
    except ValueError:
        raise DataError(f"bad synthetic spec {arg!r}; "
                        "use synthetic:CLASSES[:N_TRAIN[:SIZE]], e.g. synthetic:100:50000") from None
    if classes < 2 or n_train < 1 or size < 4:
        raise DataError(f"bad synthetic spec {arg!r}: need CLASSES >= 2, N_TRAIN >= 1, SIZE >= 4")
    rng = np.random.default_rng(1234)
    n_test = max(n_train // 5, 1)
    xtr = rng.integers(0, 256, (n_train, 3, size, size), dtype=np.uint8)
    xte = rng.integers(0, 256, (n_test, 3, size, size), dtype=np.uint8)
    return xtr, xte, rng.integers(0, classes, n_train), rng.integers(0, classes, n_test), classes


def resolve_val_size(val_size, spec: str, n_train: int) -> int:
    """The number of validation images ``val_size`` asks for, out of ``n_train`` training images.

    ``"auto"``: 20% for digits, else 10% capped at 5,000; a float in (0, 1): that fraction
    (rounded); an int: that count; ``0`` or ``None``: no validation split.
    """
    if val_size is None:
        return 0
    if val_size == "auto":
        return round(0.2 * n_train) if spec == "digits" else min(5000, round(0.1 * n_train))
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise DataError(f"val_size must be 'auto', a fraction in (0, 1) or a count of images, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0 <= val_size < 1:
            raise DataError(f"a fractional val_size must be in [0, 1), got {val_size}; give a count as an integer")
        return round(val_size * n_train)
    if not 0 <= val_size < n_train:
        raise DataError(f"val_size {val_size} must be in 0..{n_train - 1} (the training split has {n_train} images)")
    return val_size


def load_dataset(spec: str, data_root: str | None = None, download: bool = False, *, val_size=0,
                 val_seed: int = VAL_SPLIT_SEED) -> Dataset:
    """Load a dataset from its spec (see the module docstring).

    Args:
        spec: ``digits``, ``cifar10``, ``cifar100``, ``npz:PATH`` or ``synthetic:CLASSES[:N[:SIZE]]``.
        data_root: folder of the torchvision datasets (default ``./data``).
        download: allow torchvision to download CIFAR into ``data_root``.
        val_size: images held out of the training split for validation (see
            :func:`resolve_val_size`; default 0: none).
        val_seed: seed of the validation split.

    Raises:
        DataError: unknown spec, missing files, or malformed arrays; the message names the fix.
    """
    max_value, num_classes = 255.0, None
    if spec == "digits":
        xtr, xte, ytr, yte = _load_digits()
        max_value = 16.0
    elif spec in ("cifar10", "cifar100"):
        xtr, xte, ytr, yte = _load_torchvision(spec, data_root, download)
        num_classes = 10 if spec == "cifar10" else 100
    elif spec == "cifar10-subset":
        xtr, xte, ytr, yte = _load_cifar10_subset(data_root, download)
        num_classes = 10
    elif spec.startswith("npz:"):
        xtr, xte, ytr, yte = _load_npz(spec[4:])
    elif spec.startswith("synthetic:"):
        xtr, xte, ytr, yte, num_classes = _load_synthetic(spec[len("synthetic:"):])
    else:
        raise DataError(f"unknown dataset {spec!r}; valid: {', '.join(DATASET_NAMES)}")
    x_train, x_test = torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(np.ascontiguousarray(xte))
    y_train, y_test = torch.from_numpy(np.asarray(ytr, np.int64)), torch.from_numpy(np.asarray(yte, np.int64))
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    if int(min(y_train.min(), y_test.min())) < 0:
        raise DataError(f"{spec}: labels must be 0..K-1, found a negative label")
    present = torch.unique(y_train)
    if len(present) < 2:
        raise DataError(f"{spec}: every training label is {int(present[0])}: a classifier needs at least 2 classes "
                        "(check y_train, or the file's labels)")
    distinct = int(torch.unique(torch.cat([y_train, y_test])).numel())
    if num_classes > max(10 * distinct, 1000):
        raise DataError(f"{spec}: the largest label is {num_classes - 1} but only {distinct} distinct labels occur; "
                        f"a model with {num_classes} outputs is almost surely a mistake: "
                        f"map the labels to 0..{distinct - 1}")
    mean, std = _channel_stats(x_train, max_value)
    ds = Dataset(spec, x_train, y_train, x_test, y_test, num_classes, mean, std,
                 augment=x_train.shape[-1] == 32 and x_train.shape[-2] == 32, max_value=max_value)
    return ds.hold_out(resolve_val_size(val_size, spec, len(x_train)), val_seed)


def training_subsets(ds: Dataset, samples: int, replicates: int, seed: int, batch: int = 128
                     ) -> list[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """``replicates`` disjoint sets of ``samples`` normalized, non-augmented training images
    (validation excluded) with their labels, each as ``(indices into ds.x_train, batches)``:
    consecutive slices of one seeded permutation, so subset 0 is exactly
    :func:`training_batches` (same seed, same batches).

    Raises:
        ValueError: ``samples * replicates`` is more than the training images (the message says
            how many there are), or a count that is not an integer >= 1.

    Example:
        >>> ds = load_dataset("digits")
        >>> (idx0, batches), (idx1, _) = training_subsets(ds, 100, 2, seed=0, batch=64)
        >>> [len(y) for _, y in batches], len(set(idx0.tolist()) & set(idx1.tolist()))
        ([64, 36], 0)
        >>> torch.equal(batches[0][0], training_batches(ds, 100, seed=0, batch=64)[0][0])
        True
    """
    n_train = len(ds.x_train)
    ok = [isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (samples, replicates, batch)]
    if not all(ok):
        raise ValueError(f"samples, replicates and batch must be integers >= 1, got {samples!r}, {replicates!r} and "
                         f"{batch!r}")
    if samples * replicates > n_train:
        raise ValueError(f"{replicates} disjoint subsets of {samples} images need {samples * replicates} training "
                         f"images, but {ds.name} has {n_train}; lower the number of subsets or the images per subset "
                         f"(at most {n_train // samples} subsets of {samples})")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    out = []
    for r in range(replicates):
        idx = perm[r * samples:(r + 1) * samples]
        dev_idx = idx.to(ds.x_train.device)
        x, y = ds.normalize(ds.x_train[dev_idx]), ds.y_train[dev_idx]
        out.append((idx, [(x[j:j + batch], y[j:j + batch]) for j in range(0, samples, batch)]))
    return out


def training_batches(ds: Dataset, samples: int, seed: int, batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` (at most every) normalized, non-augmented training images (validation
    excluded) with their labels, a seeded choice, in batches: the images of a study's curvature
    measurements and of a sensitivity measurement (subset 0 of :func:`training_subsets`)."""
    return training_subsets(ds, min(samples, len(ds.x_train)), 1, seed, batch)[0][1]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, batched on ``x``'s device.

    Equivalent per image to torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip()``, but one gather for the whole batch.

    Args:
        x: images (N, C, H, W), any dtype.
        generator: a ``torch.Generator`` on ``x.device`` (makes the augmentation reproducible).
        padding: zero padding on every side before the crop.
    """
    n, c, h, w = x.shape
    dev = x.device
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = ox[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
              rows, cols]


class BatchLoader:
    """Seeded mini-batches from a :class:`Dataset` split, sharded across ranks.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees exactly the
    batches of an uninterrupted one. Each global batch of ``batch_size`` samples is split into
    ``world_size`` equal contiguous shards; rank ``r`` gets shard ``r``, so the union of the
    ranks' batches is the single-process batch.

    Args:
        ds: the dataset.
        batch_size: global batch size (divisible by ``world_size``).
        train: training split (shuffled, last partial batch dropped, augmented if ``ds.augment``)
            or test split (in order, all samples).
        seed: base seed of the shuffling and augmentation.
        rank, world_size: this process's shard.
        dtype, channels_last: layout of the normalized float batches.
        augment: override the dataset's augmentation flag (training batches only).
        split: the split to read when ``train`` is False: ``"test"`` (default) or ``"val"``.
    """

    def __init__(self, ds: Dataset, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, dtype=torch.float32, channels_last: bool = False, augment: bool | None = None,
                 split: str | None = None):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} is not divisible by the {world_size} processes; "
                            f"use a multiple of {world_size}")
        self.ds, self.batch_size, self.train, self.seed = ds, batch_size, train, seed
        self.rank, self.world_size, self.dtype, self.channels_last = rank, world_size, dtype, channels_last
        self.augment = ds.augment if augment is None else augment
        if split is None:
            split = "train" if train else "test"
        if train and split != "train":
            raise DataError(f"a training loader reads the train split, not {split!r}")
        self.split = split
        self.x, self.y = ds.split(split)
        self.epoch = 0
        self.generator = torch.Generator(device=self.x.device)  # reseeded every epoch (_generator)
        self._order: torch.Tensor | None = None
        if train and len(self.x) < batch_size:
            raise DataError(f"batch size {batch_size} is larger than the {len(self.x)} training samples")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _generator(self) -> torch.Generator:
        """The epoch's generator: one object, reseeded (a CUDA graph keeps the generators it was
        captured with)."""
        return self.generator.manual_seed(1_000_003 * (self.seed + 1) + 7919 * self.epoch + 17)

    # -- static batches: the same batches, written into fixed buffers by a capturable function --
    def begin_static_epoch(self) -> None:
        """Start the epoch :meth:`set_epoch` chose for :meth:`static_batch`: reseed the generator
        and draw the epoch's order into a fixed device buffer (as iterating would)."""
        if not self.train:
            raise DataError("static batches are for the training loader (shuffled, partial batch dropped)")
        g = self._generator()
        n = len(self.x)
        if self._order is None or self._order.numel() != n:
            self._order = torch.empty(n, dtype=torch.long, device=self.x.device)
        torch.randperm(n, generator=g, out=self._order)

    def static_batch(self, step: torch.Tensor, x_out: torch.Tensor, y_out: torch.Tensor) -> None:
        """Write batch ``step`` (a 0-dim long device tensor) of the epoch into ``x_out`` and
        ``y_out``: the batch iterating would give (same images, augmentation and normalization),
        by fixed-shape device operations with no host read, so a CUDA graph can capture it.

        Example:
            >>> import torch
            >>> from dnq.data import BatchLoader, load_dataset
            >>> loader = BatchLoader(load_dataset("synthetic:10:64:32"), 16, True, seed=0)
            >>> loader.set_epoch(1)
            >>> x1, y1 = list(loader)[1]
            >>> loader.begin_static_epoch()
            >>> x, y = torch.empty_like(x1), torch.empty_like(y1)
            >>> for i in range(2):
            ...     loader.static_batch(torch.tensor(i), x, y)
            >>> torch.equal(x, x1), torch.equal(y, y1)
            (True, True)
        """
        b, per = self.batch_size, self.batch_size // self.world_size
        idx = self._order[: len(self) * b].view(len(self), b).index_select(0, step.view(1)).view(b)
        if self.world_size > 1:
            idx = idx[self.rank * per: (self.rank + 1) * per]
        x = self.x.index_select(0, idx)
        if self.augment:
            x = random_crop_flip(x, self.generator)
        x_out.copy_(self.ds.normalize(x, self.dtype))
        y_out.copy_(self.y.index_select(0, idx))

    def __iter__(self):
        n, b, dev = len(self.x), self.batch_size, self.x.device
        g = self._generator()
        order = torch.randperm(n, device=dev, generator=g) if self.train else torch.arange(n, device=dev)
        per = b // self.world_size
        for i in range(len(self)):
            idx = order[i * b: (i + 1) * b]
            if self.world_size > 1:
                if self.train:
                    idx = idx[self.rank * per: (self.rank + 1) * per]
                else:
                    idx = idx[self.rank::self.world_size]
            x = self.x[idx]
            if self.train and self.augment:
                x = random_crop_flip(x, g)
            x = self.ds.normalize(x, self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[idx]
