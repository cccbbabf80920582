"""A study: train (or reuse) a set of models, quantize each, measure its flatness, and keep
everything in one directory, so that :mod:`landscape.regress` and :mod:`landscape.report` can
tie flatness to PTQ accuracy.

A study is a declarative configuration (:class:`StudyConfig`): the data, the architecture, a
list of run specifications (method and noise strength ``lambda_max`` or SAM radius ``sam_rho``;
a list of values sweeps them), seeds, the PTQ bit-widths, and the budgets of the instruments.
Presets: ``digits`` (the default, under 3 minutes on a 2-core CPU), ``cifar10-subset`` (the
CIFAR-10 subset in an ``.npz`` file, about 70 minutes on a 2-core CPU) and ``cifar100`` (the DNQ paper's setting,
for a GPU). Custom studies come from a JSON or TOML file with the same keys.

Layout of ``out/``::

    study.json                 the configuration and its hash
    runs/<run>-<hash>/         one `dnq train` run directory per model (config, checkpoints)
    models/<run>.json          one record per model: training result and every measurement

Each measurement is stored with a key (a hash of what it depends on: the trained model and the
instrument's settings) and written atomically as soon as it is done: rerunning the study skips
finished trainings and finished measurements, and a killed study loses nothing it had finished
(an interrupted training resumes from its last checkpoint).

Measurements per model (``H`` is the Hessian of the training loss on ``hessian_samples``
non-augmented training images, evaluated in eval mode):

* ``fp``: validation and test accuracy and loss (the run's own validation split, held out of
  training); ``ptq:<bits>`` / ``ptq+bn:<bits>``: the same after PTQ at each bit-width, variant
  ``rtn`` / ``rtn+bn`` (:data:`DEFAULT_PTQ`: :func:`dnq.quant.quantize`, min-max, BatchNorm
  folded, first/last layer at 8 bits, 256 calibration images from the training split; ``rtn+bn``
  re-estimates the BatchNorm statistics on them through the quantized model before folding);
* ``trace`` (with its standard error), ``eigen`` (top eigenvalues), ``density`` (SLQ),
  ``blocks`` (per-layer traces);
* ``noise`` per bit-width: ``Tr(H Sigma)`` with ``Sigma`` the per-channel variance of the
  model's own weight quantization error ``Q(W) - W`` (symmetric per-channel min-max, first/last
  at 8 bits, BatchNorm not folded so that the error lives in the parameters ``H`` is taken in),
  the second-order prediction ``g.mu + 1/2 (mu^T H mu + Tr(H Sigma))`` of the loss increase,
  and the measured increase ``L(Q(W)) - L(W)`` on the same images (weights only);
* ``surface``: a 2-D filter-normalized surface; ``slice``: the loss along ``Q(W) - W`` (alpha =
  1 is the weight-quantized model) at each bit-width.

Every measurement runs in full float32 precision (:func:`landscape.precision.full_precision`:
no TF32, no autocast), whatever the process's settings, which training keeps.

Under ``torchrun``, training is data-parallel (``dnq train``) and the curvature products are
sharded across ranks (:class:`landscape.HessianOperator`); rank 0 writes the records.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
import tomllib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from . import directions as _dirs
from .density import spectral_density
from .eigen import top_eigenvalues
from .hessian import HessianOperator
from .precision import full_precision
from .surface import surface_1d, surface_2d
from .trace import block_traces, hessian_trace, predicted_loss_increase
from dnq.quant import PTQ_VARIANTS

STUDY_VERSION = 2

# The PTQ every model of a study gets (the same for every method): recorded in study.json and
# stated in the report's header. Variants: "rtn" (round to nearest with min-max ranges, BatchNorm
# folded with the model's statistics) and "rtn+bn" (the same, with BatchNorm statistics re-estimated
# on the calibration images through the quantized model before folding).
DEFAULT_PTQ = {"variants": ["rtn", "rtn+bn"], "weight_mode": "symmetric", "weight_granularity": "per output channel",
               "act": "asymmetric per tensor", "range": "minmax", "first_last_bits": 8, "calib_size": 256,
               "calib_split": "train (validation images excluded)", "fold_bn": True}
VARIANT_SUFFIX = {"rtn": "", "rtn+bn": "_bn"}


def ptq_column(stem: str, bits: str, variant: str = "rtn") -> str:
    """The summary column of a PTQ quantity: ``ptq_acc_W4A4`` (``rtn``), ``ptq_acc_W4A4_bn`` (``rtn+bn``)."""
    return f"{stem}_{bits}{VARIANT_SUFFIX[variant]}"


class StudyError(ValueError):
    """A bad study configuration or output directory (the message names the fix)."""


@dataclasses.dataclass
class Instruments:
    """Budgets of the measurements (every field is part of the measurement keys)."""

    hessian_samples: int = 512
    hessian_batch: int = 256
    trace_method: str = "hutch++"
    trace_matvecs: int = 48
    eig_k: int = 3
    eig_tol: float = 1e-3
    density_runs: int = 2
    density_steps: int = 32
    block_matvecs: int = 16
    noise_matvecs: int = 32
    surface_steps: int = 11
    surface_span: float = 1.0
    slice_steps: int = 21
    slice_span: tuple = (-0.5, 1.5)
    seed: int = 0


@dataclasses.dataclass
class StudyConfig:
    """What to train and measure. ``runs`` is a list of dicts with a ``method`` and, optionally,
    ``lambda_max`` / ``sam_rho`` / any other :class:`dnq.train.TrainConfig` field; a list value
    sweeps it; an optional ``name`` labels the run in the report. Every run is trained with each
    of ``seeds``."""

    name: str = "study"
    data: str = "digits"
    model: str = "cnn-digits"
    runs: list = dataclasses.field(default_factory=lambda: [{"method": "sgd"}])
    seeds: list = dataclasses.field(default_factory=lambda: [0])
    bits: list = dataclasses.field(default_factory=lambda: ["W4A4", "W3A3"])
    train_bits: str = "W4A4"
    train: dict = dataclasses.field(default_factory=dict)
    instruments: Instruments = dataclasses.field(default_factory=Instruments)
    data_root: str | None = None
    ptq: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_PTQ))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["instruments"]["slice_span"] = list(d["instruments"]["slice_span"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StudyError(f"unknown study keys {unknown}; valid: {sorted(known)}")
        inst = d.pop("instruments", {}) or {}
        known_i = {f.name for f in dataclasses.fields(Instruments)}
        bad = sorted(set(inst) - known_i)
        if bad:
            raise StudyError(f"unknown instrument keys {bad}; valid: {sorted(known_i)}")
        if "slice_span" in inst:
            inst["slice_span"] = tuple(inst["slice_span"])
        ptq = {**DEFAULT_PTQ, **(d.pop("ptq", None) or {})}
        cfg = cls(**d, instruments=Instruments(**inst), ptq=ptq)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from dnq.quant import parse_bits
        from dnq.train import TrainConfig

        if not self.runs:
            raise StudyError("the study has no runs; give at least one {'method': ...}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for i, r in enumerate(self.runs):
            if "method" not in r:
                raise StudyError(f"run {i} has no 'method' (one of sgd, dnq, dnq-w, dnq-a, gaussian, sam)")
            bad = sorted(set(r) - fields - {"name"})
            if bad:
                raise StudyError(f"run {i}: unknown training settings {bad}")
        bad = sorted(set(self.train) - fields)
        if bad:
            raise StudyError(f"train: unknown training settings {bad}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise StudyError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        try:
            for b in [*self.bits, self.train_bits]:
                parse_bits(b)
        except ValueError as e:
            raise StudyError(f"bad bit-width: {e}") from None
        unknown = sorted(set(self.ptq) - set(DEFAULT_PTQ))
        if unknown:
            raise StudyError(f"ptq: unknown keys {unknown}; valid: {sorted(DEFAULT_PTQ)}")
        bad = [v for v in self.ptq.get("variants", []) if v not in PTQ_VARIANTS]
        if bad or not self.ptq.get("variants"):
            raise StudyError(f"ptq.variants must be a non-empty list of {', '.join(PTQ_VARIANTS)}, got "
                             f"{self.ptq.get('variants')!r}")
        fixed = {k: DEFAULT_PTQ[k] for k in ("weight_mode", "weight_granularity", "act", "range", "calib_split",
                                             "fold_bn")}
        changed = {k: self.ptq[k] for k in fixed if k in self.ptq and self.ptq[k] != fixed[k]}
        if changed:
            raise StudyError(f"ptq: {changed} cannot be changed in a study (it is the simple PTQ of the toolkit: "
                             f"{fixed}); use `dnq ptq` for other quantizers")
        i = self.instruments
        if i.trace_method not in ("hutchinson", "hutch++"):
            raise StudyError(f"instruments.trace_method must be 'hutchinson' or 'hutch++', got {i.trace_method!r}")
        for k in ("hessian_samples", "hessian_batch", "trace_matvecs", "eig_k", "density_runs", "density_steps",
                  "block_matvecs", "noise_matvecs", "surface_steps", "slice_steps"):
            if int(getattr(i, k)) < 1:
                raise StudyError(f"instruments.{k} must be >= 1, got {getattr(i, k)}")

    def hash(self) -> str:
        return _hash(self.to_dict())

    def expand(self) -> list[dict]:
        """One dict of training settings per model, with its run id."""
        out, seen = [], set()
        for spec in self.runs:
            keys = sorted(spec)
            values = [v if isinstance(v, list) else [v] for v in (spec[k] for k in keys)]
            for combo in itertools.product(*values):
                settings = dict(zip(keys, combo))
                label = settings.pop("name", None)
                for seed in self.seeds:
                    s = {**self.train, **settings, "seed": seed}
                    rid = _run_id({**settings, "seed": seed}) if label is None else _safe(f"{label}-s{seed}")
                    if rid in seen:
                        raise StudyError(f"two runs expand to the same settings or name ({rid}); remove the duplicate")
                    seen.add(rid)
                    name = rid if label is None else (str(label) if len(self.seeds) == 1 else f"{label} (seed {seed})")
                    config = _run_id(settings, seed=False) if label is None else _safe(str(label))
                    out.append({"id": rid, "name": name, "settings": s, "config": config})
        return out


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _run_id(s: dict, seed: bool = True) -> str:
    """A run's id: method, strength, other settings and seed (``seed=False``: the training
    configuration shared by all seeds, the cluster of the report's bootstrap)."""
    from dnq.methods import NOISE_METHODS

    parts = [s["method"]]
    if s["method"] in NOISE_METHODS and "lambda_max" in s:
        parts.append(f"lam{_fmt(s['lambda_max'])}")
    if s["method"] == "sam" and "sam_rho" in s:
        parts.append(f"rho{_fmt(s['sam_rho'])}")
    for k in sorted(s):
        if k not in ("method", "lambda_max", "sam_rho", "seed"):
            parts.append(f"{k}{_fmt(s[k])}")
    if seed:
        parts.append(f"s{s['seed']}")
    return _safe("-".join(parts))


def _safe(text: str) -> str:
    """A file-name-safe id (the label itself is kept, escaped, in the report)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)).strip(".")
    return out[:120] or "run"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- presets --------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    "digits": {
        "name": "digits", "data": "digits", "model": "cnn-digits",
        # gaussian / gaussian-iso at lambda 1: the variance of DNQ's measured weight error, not tuned
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [0.5, 1.0, 2.0]},
                 {"method": "dnq-w", "lambda_max": [1.0]}, {"method": "dnq-a", "lambda_max": [1.0]},
                 {"method": "gaussian", "lambda_max": [1.0]}, {"method": "gaussian-iso", "lambda_max": [1.0]},
                 {"method": "sam", "sam_rho": [0.02, 0.1, 0.3]}],
        "seeds": [0, 1], "bits": ["W4A4", "W3A3", "W2A4"], "train_bits": "W3A3",
        "train": {"epochs": 12, "batch_size": 128, "lr": 0.1},
        "instruments": {"hessian_samples": 512, "trace_matvecs": 48, "eig_k": 3, "density_runs": 2,
                        "density_steps": 32, "block_matvecs": 16, "noise_matvecs": 32, "surface_steps": 11,
                        "slice_steps": 21},
    },
    "cifar10-subset": {
        "name": "cifar10-subset", "data": "npz:../shared/data/cifar10-subset.npz", "model": "resnet20",
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [0.5, 1.0]}, {"method": "sam", "sam_rho": [0.05]}],
        "seeds": [0], "bits": ["W4A4", "W3A3", "W2A4"], "train_bits": "W4A4",
        "train": {"epochs": 30, "batch_size": 128, "lr": 0.1},
        # sized on a 2-core CPU: an epoch of resnet20 took 15 s (sgd) and 15.6 s (dnq); the measurements of
        # one model 438 s at these budgets (with 16 block probes; 1,235 s with 1,024 images, 2x48 SLQ steps,
        # 32 noise probes and a 15x15 surface): about 70 minutes for the four models
        "instruments": {"hessian_samples": 512, "trace_matvecs": 48, "density_runs": 1, "density_steps": 32,
                        "block_matvecs": 8, "noise_matvecs": 16, "surface_steps": 11, "slice_steps": 21},
    },
    "cifar100": {
        "name": "cifar100", "data": "cifar100", "model": ["resnet20", "resnet56", "resnet18", "mobilenetv2"],
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [1.0]}, {"method": "sam", "sam_rho": [0.05]}],
        "seeds": [0], "bits": ["W4A4", "W3A3", "W2A4"], "train_bits": "W4A4",
        "train": {"epochs": 120, "batch_size": 128, "lr": 0.1},
        "instruments": {"hessian_samples": 4096, "hessian_batch": 512, "trace_matvecs": 96, "eig_k": 5,
                        "density_runs": 4, "density_steps": 64, "block_matvecs": 32, "noise_matvecs": 64,
                        "surface_steps": 21, "slice_steps": 41},
    },
}


def load_config(preset: str | None = None, config: str | os.PathLike | None = None, **overrides) -> StudyConfig:
    """A study from a preset name and/or a JSON/TOML file (the file's keys override the preset's).

    ``overrides`` (for example ``train={"epochs": 2}``) are applied last; dict values merge.
    """
    if preset is None and config is None:
        preset = "digits"
    d: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise StudyError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        d = copy.deepcopy(PRESETS[preset])
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise StudyError(f"study config {path} not found")
        text = path.read_text()
        try:
            extra = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise StudyError(f"cannot parse {path}: {e}") from None
        d = _merge(d, extra)
    d = _merge(d, overrides)
    if isinstance(d.get("model"), list):  # a list of architectures: one sub-study each is the user's job here
        raise StudyError(f"preset {preset!r} lists several models {d['model']}; run one study per model with "
                         "--set model=NAME (or a config file with 'model')")
    return StudyConfig.from_dict(d)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- the runner -------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    from dnq.io import atomic_write_json

    atomic_write_json(path, obj)


class Study:
    """Runs a :class:`StudyConfig` into ``out`` (see the module doc).

    Args:
        config: the study.
        out: its directory; an existing directory must hold the same study (same name), or be
            empty.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        progress: progress bars (``False`` for quiet runs).
    """

    def __init__(self, config: StudyConfig, out: str | os.PathLike, device: str = "auto", progress: bool = True):
        from dnq.train import init_distributed, resolve_device

        self.cfg, self.out, self.progress = config, Path(out), progress
        kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device.split(":")[0]
        # under torchrun: join the process group (training is data-parallel, products sharded)
        self.rank, self.world, local_rank, self.own_pg = init_distributed(kind)
        self.device = resolve_device(device, local_rank)
        self._datasets: dict = {}  # loaded once per study, not once per model

    # -- directory --------------------------------------------------------------------------
    def prepare(self) -> None:
        meta = self.out / "study.json"
        if meta.is_file():
            old = json.loads(meta.read_text())
            if old.get("config", {}).get("name") != self.cfg.name:
                raise StudyError(f"{self.out} holds study {old.get('config', {}).get('name')!r}, not "
                                 f"{self.cfg.name!r}; choose another --out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise StudyError(f"{self.out} exists, is not empty and holds no study.json; choose another --out")
        self._barrier()  # every rank has checked before rank 0 writes
        if self.rank == 0:
            (self.out / "models").mkdir(parents=True, exist_ok=True)
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            _write_json(meta, {"version": STUDY_VERSION, "config": self.cfg.to_dict(), "hash": self.cfg.hash(),
                               "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # -- one model ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train and measure every model; returns the records."""
        try:
            self.prepare()
            runs = self.cfg.expand()
            records = []
            bar = tqdm(runs, desc=f"study {self.cfg.name}", disable=not self.progress or self.rank != 0)
            for r in bar:
                bar.set_postfix_str(r["id"])
                records.append(self.run_one(r))
            return records
        finally:
            if self.own_pg:
                dist.destroy_process_group()

    def _record_path(self, rid: str) -> Path:
        return self.out / "models" / f"{rid}.json"

    def _load_record(self, rid: str) -> dict | None:
        p = self._record_path(rid)
        return json.loads(p.read_text()) if p.is_file() else None

    def _save(self, rec: dict) -> None:
        if self.rank == 0:
            _write_json(self._record_path(rec["id"]), rec)

    def train_config(self, settings: dict, out: Path):
        from dnq.quant import parse_bits
        from dnq.train import TrainConfig

        (w, a), = parse_bits(self.cfg.train_bits)
        base = {"data": self.cfg.data, "model": self.cfg.model, "wbits": w, "abits": a,
                "data_root": self.cfg.data_root, "first_last_bits": self.cfg.ptq["first_last_bits"],
                "device": "cpu" if self.device.type == "cpu" else ("cuda" if self.world > 1 else str(self.device))}
        return TrainConfig(**{**base, **settings, "out": str(out)})

    def run_one(self, r: dict) -> dict:
        from dnq.train import load_model, train

        cfg_train = self.train_config(r["settings"], Path("."))
        tkey = _hash({k: v for k, v in cfg_train.to_dict().items() if k not in ("out", "device", "data_root")})
        run_dir = self.out / "runs" / f"{r['id']}-{tkey[:8]}"
        rec = self._load_record(r["id"])
        if rec is None or rec.get("train_key") != tkey:
            rec = {"id": r["id"], "name": r["name"], "config": r["config"], "settings": r["settings"],
                   "train_key": tkey, "run_dir": str(run_dir.relative_to(self.out)), "measurements": {}}
        if not (run_dir / "model.pt").is_file():
            t0 = time.perf_counter()
            resume = (run_dir / "checkpoint.pt").is_file()
            cfg_train = self.train_config(r["settings"], run_dir)
            result = train(cfg_train, resume=resume, overwrite=not resume and run_dir.exists(), quiet=True)
            rec["train"] = {**result, "time_s": time.perf_counter() - t0}
            self._save(rec)
            self._barrier()  # model.pt is written by rank 0
        elif "train" not in rec and (run_dir / "result.json").is_file():
            rec["train"] = json.loads((run_dir / "result.json").read_text())
        model, meta = load_model(run_dir, self.device)
        m = Measure(self, rec, model, meta)
        self._record_splits(m.ds)
        m.all()
        return rec

    def _record_splits(self, ds) -> None:
        """Write the split sizes into study.json once (the report states them)."""
        if self.rank != 0:
            return
        path = self.out / "study.json"
        meta = json.loads(path.read_text())
        splits = {"train": len(ds.x_train), "val": ds.val_size, "test": len(ds.x_test),
                  "calibration": min(self.cfg.ptq["calib_size"], len(ds.x_train)),
                  "hessian": min(self.cfg.instruments.hessian_samples, len(ds.x_train))}
        if meta.get("splits") != splits:
            _write_json(path, {**meta, "splits": splits})


class Measure:
    """The measurements of one trained model (each skipped when its key is already recorded)."""

    def __init__(self, study: Study, rec: dict, model: nn.Module, meta: dict):
        from dnq.data import load_dataset

        self.s, self.rec, self.model = study, rec, model
        self.inst = study.cfg.instruments
        self.ptq_cfg = study.cfg.ptq
        key = (meta["data"], meta.get("val_size", 0), meta.get("val_seed", 0))  # the run's own splits
        if key not in study._datasets:
            study._datasets[key] = load_dataset(meta["data"], study.cfg.data_root, val_size=key[1],
                                                val_seed=key[2]).to(study.device)
        self.ds = study._datasets[key]
        self._order = None
        n = min(self.inst.hessian_samples, len(self.ds.x_train))
        g = torch.Generator().manual_seed(self.inst.seed)
        idx = torch.randperm(len(self.ds.x_train), generator=g)[:n].to(study.device)
        x = self.ds.normalize(self.ds.x_train[idx])
        y = self.ds.y_train[idx]
        rank, world = study.rank, study.world
        b = self.inst.hessian_batch
        self.hdata = [(x[i:i + b], y[i:i + b]) for i in range(0, n, b)]
        self.my_hdata = self.hdata[rank::world] if world > 1 else self.hdata  # products sharded across ranks
        self.loss_fn = nn.functional.cross_entropy
        self._op = None

    def op(self) -> HessianOperator:
        if self._op is None:
            self._op = HessianOperator(self.model, self.loss_fn, self.my_hdata)
        return self._op

    def _do(self, name: str, deps: dict, fn) -> None:
        key = _hash({"train": self.rec["train_key"], "name": name, **deps})
        have = self.rec["measurements"].get(name)
        if have is not None and have.get("key") == key:
            return
        t0 = time.perf_counter()
        with full_precision():  # the user's TF32 / autocast settings stay for training, not for measurements
            value = fn()
        self.rec["measurements"][name] = {"key": key, "value": value, "time_s": time.perf_counter() - t0,
                                          "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.s._save(self.rec)

    def all(self) -> None:
        i = self.inst
        self._do("fp", {"splits": ["val", "test"]}, self.fp)
        pdeps = {k: self.ptq_cfg[k] for k in ("first_last_bits", "calib_size")}
        for variant in self.ptq_cfg["variants"]:
            for bits in self.s.cfg.bits:
                name = f"ptq:{bits}" if variant == "rtn" else f"ptq+bn:{bits}"
                self._do(name, {"bits": bits, "variant": variant, **pdeps},
                         lambda bits=bits, variant=variant: self.ptq(bits, variant))
        hd = {"samples": i.hessian_samples, "batch": i.hessian_batch, "seed": i.seed}
        self._do("trace", {**hd, "m": i.trace_method, "mv": i.trace_matvecs},
                 lambda: hessian_trace(self.op(), i.trace_matvecs, i.trace_method, seed=i.seed).to_dict())
        self._do("eigen", {**hd, "k": i.eig_k, "tol": i.eig_tol}, self.eigen)
        self._do("density", {**hd, "r": i.density_runs, "s": i.density_steps},
                 lambda: spectral_density(self.op(), i.density_runs, i.density_steps, seed=i.seed).to_dict())
        self._do("blocks", {**hd, "mv": i.block_matvecs},
                 lambda: block_traces(self.op(), i.block_matvecs, seed=i.seed).to_dict())
        for bits in self.s.cfg.bits:
            self._do(f"noise:{bits}", {**hd, "bits": bits, "mv": i.noise_matvecs}, lambda bits=bits: self.noise(bits))
        self._do("surface", {**hd, "steps": i.surface_steps, "span": i.surface_span}, self.surface)
        for bits in self.s.cfg.bits:
            self._do(f"slice:{bits}", {**hd, "bits": bits, "steps": i.slice_steps, "span": list(i.slice_span)},
                     lambda bits=bits: self.slice(bits))

    # -- the measurements -------------------------------------------------------------------
    def _accuracy(self, model: nn.Module) -> dict:
        """Accuracy and loss on the validation split (None without one) and on the test split."""
        from dnq.data import BatchLoader
        from dnq.train import evaluate

        out = {}
        for split in ("val", "test"):
            if split == "val" and not self.ds.val_size:
                out["val_loss"] = out["val_acc"] = None
                continue
            out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(model, BatchLoader(self.ds, 1024, False, split=split))
        return out

    def fp(self) -> dict:
        return self._accuracy(self.model)

    def ptq(self, bits: str, variant: str = "rtn") -> dict:
        """The study's PTQ (:data:`DEFAULT_PTQ`) at ``bits``: ``rtn``, or ``rtn+bn`` with BatchNorm
        statistics re-estimated on the calibration images through the quantized model."""
        from dnq.quant import parse_bits, quantize

        (w, a), = parse_bits(bits)
        calib = self.ds.calibration_inputs(self.ptq_cfg["calib_size"], self.inst.seed)
        q = quantize(self.model, w, a, calib, first_last_bits=self.ptq_cfg["first_last_bits"],
                     bn_reestimate=variant == "rtn+bn")
        return {**self._accuracy(q), "variant": variant}

    def eigen(self) -> dict:
        res = top_eigenvalues(self.op(), k=self.inst.eig_k, tol=self.inst.eig_tol, seed=self.inst.seed)
        d = res.to_dict()
        d.pop("eigenvectors", None)
        return d

    def _weight_bits(self, bits: str) -> dict[str, int]:
        """Weight bits per Conv/Linear layer as PTQ gives them (first/last in execution order at
        the study's ``first_last_bits``: :func:`dnq.quant.layer_bits`)."""
        from dnq.quant import execution_order, layer_bits, parse_bits

        (w, a), = parse_bits(bits)
        if self._order is None:
            self._order = execution_order(self.model, self.hdata[0][0])
        return {n: wb for n, (wb, _) in layer_bits(self._order, w, a, self.ptq_cfg["first_last_bits"]).items()}

    def _weight_quantized(self, bits: str) -> nn.Module:
        """A copy with every Conv/Linear weight replaced by Q(W) (no BatchNorm folding): the
        quantizer of :func:`dnq.quant.weight_error` (symmetric per-channel min-max), at the bits
        PTQ gives each layer."""
        from dnq.quant import quantize_weight

        wbits = self._weight_bits(bits)
        q = copy.deepcopy(self.model).eval()
        mods = dict(q.named_modules())
        with torch.no_grad():
            for name, b in wbits.items():
                layer = mods[name]
                layer.weight.copy_(quantize_weight(layer.weight.float(), b, "symmetric", "minmax").to(layer.weight))
        return q

    @full_precision()
    def _loss(self, model: nn.Module) -> float:
        tot, n = 0.0, 0
        with torch.no_grad():
            for x, y in self.hdata:
                tot += float(self.loss_fn(model(x), y)) * len(y)
                n += len(y)
        return tot / n

    def noise(self, bits: str) -> dict:
        from dnq.quant import parse_bits, quant_layers

        (w, _), = parse_bits(bits)
        q = self._weight_quantized(bits)
        layers = [n for n, _ in quant_layers(self.model)]
        qp, mp = dict(q.named_parameters()), dict(self.model.named_parameters())
        var, mean = {}, {}
        for name in layers:
            k = f"{name}.weight"
            err = (qp[k] - mp[k]).detach().reshape(mp[k].shape[0], -1).double()
            var[k] = err.var(dim=1, unbiased=False)
            mean[k] = err.mean(dim=1)
        op = self.op()
        pred = predicted_loss_increase(op, var, mean=mean, num_matvecs=self.inst.noise_matvecs, seed=self.inst.seed)
        was = self.model.training
        self.model.eval()
        try:
            base, quant = self._loss(self.model), self._loss(q)
        finally:
            self.model.train(was)
        out = pred.to_dict()
        out.update({"trace_h_sigma": 2 * pred.trace_term, "trace_h_sigma_std_error": 2 * pred.trace_std_error,
                    "measured": quant - base, "loss_fp": base, "loss_weight_quantized": quant, "wbits": w})
        return out

    def surface(self) -> dict:
        i = self.inst
        dirs = _dirs.random_directions(self.model, 2, "filter", seed=i.seed)
        s = surface_2d(self.model, self.loss_fn, self.hdata, dirs, span=(-i.surface_span, i.surface_span),
                       steps=i.surface_steps)
        return s.to_dict()

    def slice(self, bits: str) -> dict:
        i = self.inst
        d = _dirs.quantization_direction(self.model, self._weight_quantized(bits))
        s = surface_1d(self.model, self.loss_fn, self.hdata, d, span=tuple(i.slice_span), steps=i.slice_steps)
        out = s.to_dict()
        out["ptq_alpha"] = 1.0
        return out


def run_study(config: StudyConfig | str = "digits", out: str | os.PathLike = "reports/digits", *,
              device: str = "auto", progress: bool = True) -> list[dict]:
    """Run (or resume) a study; ``config`` is a :class:`StudyConfig` or a preset name."""
    if isinstance(config, str):
        config = load_config(config)
    return Study(config, out, device=device, progress=progress).run()


def load_records(path: str | os.PathLike, include_other: bool = False) -> list[dict]:
    """The model records of a study directory, in the run order of its current configuration
    (models still being measured included). Records of runs the configuration no longer lists
    (left by an earlier version of the study) are kept on disk and returned only with
    ``include_other=True``."""
    path = Path(path)
    if not (path / "study.json").is_file():
        raise StudyError(f"{path} holds no study.json; run `landscape study --out {path}` first")
    meta = json.loads((path / "study.json").read_text())
    order = [r["id"] for r in StudyConfig.from_dict(meta["config"]).expand()]
    recs = {p.stem: json.loads(p.read_text()) for p in sorted((path / "models").glob("*.json"))}
    mine = [recs[k] for k in order if k in recs]
    return mine + [v for k, v in recs.items() if k not in order] if include_other else mine


def summary_rows(records: list[dict], bits: list[str] | None = None) -> list[dict]:
    """One flat row per model: the columns the regression and the report use.

    Columns: ``model``, ``config`` (the training configuration, shared by its seeds: the cluster
    of the report's bootstrap), ``method``, ``lambda_max``, ``sam_rho``, ``seed``, ``fp_val_acc``,
    ``fp_val_loss`` (validation split), ``fp_acc``, ``fp_loss`` (test split), the flatness
    measures, and per bit-width ``b`` and PTQ variant (:func:`ptq_column`: no suffix for ``rtn``,
    ``_bn`` for ``rtn+bn``) ``ptq_acc``, ``ptq_val_acc``, ``acc_drop`` (test), and
    ``ptq_loss_increase`` (test); ``trace_h_sigma_b``, ``predicted_b``, ``measured_b``.
    Missing measurements are ``None`` (a study still running).
    """
    rows = []
    for rec in records:
        m = rec.get("measurements", {})

        def val(name, *path):
            v = m.get(name, {}).get("value")
            for p in path:
                if v is None:
                    return None
                v = v[p] if isinstance(v, dict) else (v[p] if isinstance(v, list) and len(v) > p else None)
            return v

        fp_acc = val("fp", "test_acc")
        config = rec.get("config") or re.sub(r"-s-?\d+$", "", rec["id"])
        row = {"model": rec.get("name", rec["id"]), "config": config, "method": rec["settings"].get("method"),
               "lambda_max": rec["settings"].get("lambda_max"), "sam_rho": rec["settings"].get("sam_rho"),
               "seed": rec["settings"].get("seed"), "fp_val_acc": val("fp", "val_acc"),
               "fp_val_loss": val("fp", "val_loss"), "fp_acc": fp_acc, "fp_loss": val("fp", "test_loss"),
               "trace": val("trace", "value"), "trace_se": val("trace", "std_error"),
               "top_eigenvalue": val("eigen", "eigenvalues", 0)}
        for b in bits or sorted({k.split(":", 1)[1] for k in m if k.startswith("ptq:")}):
            for variant, key in (("rtn", f"ptq:{b}"), ("rtn+bn", f"ptq+bn:{b}")):
                if variant == "rtn+bn" and key not in m:
                    continue  # a study without the variant (or an older one)
                acc = val(key, "test_acc")
                row[ptq_column("ptq_acc", b, variant)] = acc
                row[ptq_column("ptq_val_acc", b, variant)] = val(key, "val_acc")
                row[ptq_column("acc_drop", b, variant)] = None if acc is None or fp_acc is None else fp_acc - acc
                loss = val(key, "test_loss")
                row[ptq_column("ptq_loss_increase", b, variant)] = (None if loss is None or row["fp_loss"] is None
                                                                    else loss - row["fp_loss"])
            row[f"trace_h_sigma_{b}"] = val(f"noise:{b}", "trace_h_sigma")
            row[f"predicted_{b}"] = val(f"noise:{b}", "predicted")
            row[f"measured_{b}"] = val(f"noise:{b}", "measured")
        rows.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return rows
