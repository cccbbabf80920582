"""A study: train (or reuse) a set of models, quantize each, measure its flatness, and keep
everything in one directory, so that :mod:`landscape.regress` and :mod:`landscape.report` can
tie flatness to PTQ accuracy.

A study is a declarative configuration (:class:`StudyConfig`): the data, the architecture, a
list of run specifications (method and noise strength ``lambda_max`` or SAM radius ``sam_rho``;
a list of values sweeps them), seeds, the PTQ bit-widths, and the budgets of the instruments.
Presets: ``digits`` (the default, sized for a 2-core CPU), ``cifar10-subset`` (resnet20 on the
CIFAR-10 subset in an ``.npz`` file: sgd, dnq, gaussian and sam, 2 seeds, PTQ rtn, rtn+bn and qdrop
at 500 steps per block) and ``cifar100`` (the DNQ paper's setting for a GPU: 120 epochs, W4A4 /
W2A4 / W2A2, every PTQ method at the papers' 20,000 steps); their measured wall times are in
BENCHMARKS.md. Custom studies come from a JSON or TOML file with the same keys.

Layout of ``out/``::

    study.json                 the configuration and its hash
    runs/<run>-<hash>/         one `dnq train` run directory per model (config, checkpoints)
    models/<run>.json          one record per model: training result and every measurement

Each measurement is stored with a key (:class:`MeasurementKey`: a frozen dataclass per kind of
measurement whose fields are every input the number depends on besides the trained model, hashed
with the model's training key) and written atomically as soon as it is done: rerunning the study
skips finished trainings and finished measurements, and a killed study loses nothing it had
finished (an interrupted training resumes from its last checkpoint). Records written before the
key classes (hand-written dict keys) never match them: their measurements are taken again.

Measurements per model (``H`` is the Hessian of the training loss on ``hessian_samples``
non-augmented training images, evaluated in eval mode):

* ``fp``: validation and test accuracy and loss (the run's own validation split, held out of
  training); ``ptq:<bits>`` / ``ptq+bn:<bits>`` / ``ptq+<method>:<bits>``: the same after PTQ at
  each bit-width with each PTQ method of ``ptq`` (:data:`DEFAULT_PTQ`; :func:`ptq_measurement`):
  ``rtn`` / ``rtn+bn`` (:func:`dnq.quant.quantize`, min-max, BatchNorm folded, first/last layer
  at 8 bits, 256 calibration images from the training split; ``rtn+bn`` re-estimates the
  BatchNorm statistics on them through the quantized model before folding) and ``adaround`` /
  ``brecq`` / ``qdrop`` (:func:`dnq.recon.reconstruct`: MSE initial ranges, 1,024 calibration
  images from the training split, ``recon_iters`` steps per block);
* ``trace`` (with its standard error), ``eigen`` (top eigenvalues), ``density`` (SLQ),
  ``blocks`` (per-layer traces);
* ``noise`` per bit-width: ``Tr(H Sigma)`` with ``Sigma`` the per-channel variance of the
  model's own weight quantization error ``Q(W) - W`` (symmetric per-channel min-max, first/last
  at 8 bits, BatchNorm not folded so that the error lives in the parameters ``H`` is taken in),
  the second-order prediction ``g.mu + 1/2 (mu^T H mu + Tr(H Sigma))`` of the loss increase,
  and the measured increase ``L(Q(W)) - L(W)`` on the same images (weights only);
* ``surface``: a 2-D filter-normalized surface; ``slice``: the loss along ``Q(W) - W`` (alpha =
  1 is the weight-quantized model) at each bit-width.
* with ``instruments.replicates`` N >= 2: ``sampling``, the trace and the top eigenvalue again on N
  disjoint subsets of ``hessian_samples`` training images (the first being the study's own), each
  subset's value, estimator error and engines, and their spread (:meth:`Measure.sampling`; the
  report's sampling-error section, :mod:`landscape.report_sampling`).
* with ``mixed`` (:data:`DEFAULT_MIXED`): ``sensitivity:<range>``, every layer's ``predicted``,
  ``hawq`` and ``measured`` sensitivity at the candidate bits (:mod:`landscape.sensitivity_run`);
  ``mixed+<method>:W<b>A<a>``, the uniform line where the study's own PTQ results lack it; and
  ``mixed+<method>:avg-bits=<budget>:<objective>``, the accuracy with the bits
  :func:`dnq.mixed.plan` chose (the allocation recorded with it).

Every measurement runs in full float32 precision (:func:`landscape.precision.full_precision`:
no TF32, no autocast), whatever the process's settings, which training keeps.

Under ``torchrun``, training is data-parallel (``dnq train``) and the curvature products are
sharded across ranks (:class:`landscape.HessianOperator`); rank 0 writes the records.

Reliability: :meth:`Study.run` checks everything it can before it writes anything (the
configuration, every run's training settings with :func:`dnq.train.validate`, that the dataset
loads, that each batch size fits its training split, that the model runs on the images, the
device, and the output folder), and raises :class:`StudyError` naming the run and the fix.
While it runs, rank 0 holds the folder's lock (:func:`dnq.rundir.folder_lock`, ``out/.dnq.lock``):
a second study on the same folder is refused with the first one's pid and command. A corrupt
``study.json`` is an error naming the file (it is the study's configuration: restore it or use
another ``--out``); a corrupt ``models/<run>.json`` is moved aside to
``models/<run>.json.corrupt-<timestamp>`` (never deleted), with a warning, and that model's
measurements are taken again (its training is kept). A NaN or Inf loss in a measurement stops
the study with the model named (:class:`landscape.errors.NonFiniteError`); what was measured
before stays recorded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import tomllib
import typing
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from dnq.recon import PTQ_METHODS, RECON_METHODS

from . import directions as _dirs
from .density import spectral_density
from .eigen import top_eigenvalues
from .errors import NonFiniteError
from .hessian import HessianOperator
from .precision import full_precision
from .sensitivity_run import mean_loss, training_batches
from .surface import surface_1d, surface_2d
from .trace import block_traces, hessian_trace, predicted_loss_increase

STUDY_VERSION = 3  # 3: measurement keys are MeasurementKey classes (records of 2 are measured again)

# The PTQ every model of a study gets (the same for every training method): recorded in study.json
# and stated in the report's header. PTQ methods ("variants", or a plain list `ptq = [...]`):
# "rtn" (round to nearest with min-max ranges, BatchNorm folded with the model's statistics),
# "rtn+bn" (the same, with BatchNorm statistics re-estimated on the calibration images through the
# quantized model before folding), and the reconstruction methods "adaround", "brecq", "qdrop"
# (dnq.recon.reconstruct: BatchNorm folded, initial ranges "recon_range", "recon_iters" steps per
# block (null: 20,000 on a GPU, 500 on a CPU), batch "recon_batch_size", "recon_calib_size" images).
DEFAULT_PTQ = {"variants": ["rtn", "rtn+bn"], "weight_mode": "symmetric", "weight_granularity": "per output channel",
               "act": "asymmetric per tensor", "range": "minmax", "first_last_bits": 8, "calib_size": 256,
               "calib_split": "train (validation images excluded)", "fold_bn": True, "recon_iters": None,
               "recon_calib_size": 1024, "recon_batch_size": 32, "recon_range": "mse"}
VARIANT_SUFFIX = {"rtn": "", "rtn+bn": "_bn", **{m: f"_{m}" for m in RECON_METHODS}}

# Mixed precision (`mixed` in a study; null: none). Per model: the per-layer sensitivity (predicted, hawq, measured;
# landscape.sensitivity_run) on the curvature images at the candidate "bits", then for every PTQ method of "methods",
# budget (average weight bits of the allocated layers; first and last layer at ptq.first_last_bits) and objective
# an allocation (dnq.mixed.plan) and its accuracy; and the uniform line at "uniform_bits" (activations at "abits").
DEFAULT_MIXED = {"budgets": [2.5, 3.0], "objectives": ["predicted", "hawq", "measured"], "methods": ["rtn+bn"],
                 "abits": 4, "bits": [2, 3, 4, 8], "uniform_bits": [2, 3, 4], "matvecs": 64, "kind": "avg-bits",
                 "tie_shared_inputs": False}


def ptq_column(stem: str, bits: str, variant: str = "rtn") -> str:
    """The summary column of a PTQ quantity: ``ptq_acc_W4A4`` (``rtn``), ``ptq_acc_W4A4_bn`` (``rtn+bn``),
    ``ptq_acc_W4A4_qdrop`` (``qdrop``)."""
    return f"{stem}_{bits}{VARIANT_SUFFIX[variant]}"


def ptq_measurement(bits: str, variant: str = "rtn") -> str:
    """The measurement name of a PTQ result: ``ptq:W4A4`` (``rtn``), ``ptq+bn:W4A4``, ``ptq+qdrop:W4A4``."""
    return f"ptq:{bits}" if variant == "rtn" else f"ptq+{'bn' if variant == 'rtn+bn' else variant}:{bits}"


def mixed_measurement(method: str, budget: float, objective: str, kind: str = "avg-bits") -> str:
    """The measurement name of a mixed-precision result: ``mixed+rtn+bn:avg-bits=2.5:predicted``."""
    return f"mixed+{method}:{kind}={float(budget):g}:{objective}"


def uniform_measurement(study_bits: list, ptq_methods: list, method: str, bits: str) -> str:
    """The measurement that holds uniform ``bits`` with ``method`` for the mixed-precision section:
    the study's own PTQ result when it has that setting (``bits`` in ``study_bits`` and ``method`` in
    ``ptq_methods``), else ``mixed+<method>:<bits>``."""
    if bits in study_bits and method in ptq_methods:
        return ptq_measurement(bits, method)
    return f"mixed+{method}:{bits}"


def sensitivity_range(ptq: dict, method: str) -> str:
    """The weight range method a PTQ method starts from (``ptq``: the study's PTQ settings), and so
    the one its sensitivity is taken with."""
    return ptq["recon_range"] if method in RECON_METHODS else ptq["range"]


class StudyError(ValueError):
    """A bad study configuration or output directory (the message names the fix)."""


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")[0].split()) or type(e).__name__


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path, what: str, fix: str):
    """The JSON in ``path``, or :class:`StudyError` naming the file and ``fix`` when it does not parse."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise StudyError(f"{path} is corrupt: {what} is not valid JSON ({_first_line(e)}); {fix}") from None


def read_study_json(path: str | os.PathLike) -> dict:
    """The contents of a study's ``study.json`` (``path`` is the file).

    Raises:
        StudyError: the file does not parse, or holds no configuration (the message names the file).
    """
    path = Path(path)
    fix = ("restore it from a copy, or start the study in another --out (the records in models/ and the runs "
           "in runs/ are left as they are)")
    meta = _read_json(path, "the study's configuration", fix)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise StudyError(f"{path} is corrupt: it holds no study configuration (no 'config' mapping); {fix}")
    return meta


def _check_record(rec, path: Path) -> str | None:
    """Why ``rec`` (read from ``path``) is not a model record, or None."""
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not a mapping"
    for key, kind in (("id", str), ("settings", dict), ("measurements", dict)):
        if not isinstance(rec.get(key), kind):
            return f"no {key!r} {kind.__name__}"
    if rec["id"] != path.stem:
        return f"its id {rec['id']!r} is not its file name"
    bad = sorted(k for k, v in rec["measurements"].items() if not isinstance(v, dict) or "value" not in v)
    if bad:
        return f"measurements {bad[:3]} hold no value"
    return None


_SETTING_TYPES: dict | None = None


def _setting_types() -> dict:
    """The allowed types of every :class:`dnq.train.TrainConfig` field."""
    global _SETTING_TYPES
    if _SETTING_TYPES is None:
        from dnq.train import TrainConfig

        hints = typing.get_type_hints(TrainConfig)
        _SETTING_TYPES = {k: typing.get_args(v) or (v,) for k, v in hints.items()}
    return _SETTING_TYPES


def _check_setting(key: str, value, where: str) -> None:
    """A training setting of the type its :class:`dnq.train.TrainConfig` field declares."""
    allowed = _setting_types().get(key)
    if allowed is None:
        return
    ok = ((value is None and type(None) in allowed) or (isinstance(value, bool) and bool in allowed)
          or (_is_int(value) and (int in allowed or float in allowed))
          or (isinstance(value, float) and float in allowed) or (isinstance(value, str) and str in allowed))
    if isinstance(value, float) and ok and not math.isfinite(value):
        raise StudyError(f"{where}: {key} must be a finite number, got {value!r}")
    if not ok:
        names = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}
        want = " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in allowed)
        raise StudyError(f"{where}: {key} must be {want}, got {value!r}")


@dataclasses.dataclass
class Instruments:
    """Budgets of the measurements. Each field is a field of the key (:class:`MeasurementKey`) of
    every measurement that reads it, and only of those.

    ``replicates`` (default 1: none) > 1 adds the ``sampling`` measurement: the trace and the top
    eigenvalue again on that many disjoint subsets of ``hessian_samples`` training images (the
    first is the study's own curvature images), to show how much the curvature moves with the
    images it is taken on (:func:`training_subsets`, :func:`spread`).
    """

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
    replicates: int = 1


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
    mixed: dict | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["instruments"]["slice_span"] = list(d["instruments"]["slice_span"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        """A validated study from a mapping of its keys (a JSON / TOML file's contents).

        Raises:
            StudyError: an unknown key, a value of the wrong type or out of range (the message
                names the key and the valid values).
        """
        if not isinstance(d, dict):
            raise StudyError(f"a study configuration is a mapping of keys (name, data, model, runs, ...), got "
                             f"{type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StudyError(f"unknown study keys {unknown}; valid: {sorted(known)}")
        inst = d.pop("instruments", None)
        inst = {} if inst is None else inst
        if not isinstance(inst, dict):
            raise StudyError(f"instruments must be a mapping of budgets (e.g. {{\"trace_matvecs\": 48}}), got {inst!r}")
        inst = dict(inst)
        known_i = {f.name for f in dataclasses.fields(Instruments)}
        bad = sorted(set(inst) - known_i)
        if bad:
            raise StudyError(f"unknown instrument keys {bad}; valid: {sorted(known_i)}")
        if "slice_span" in inst:
            span = inst["slice_span"]
            if not isinstance(span, (list, tuple)) or len(span) != 2:
                raise StudyError(f"instruments.slice_span must be a pair [low, high], got {span!r}")
            inst["slice_span"] = tuple(span)
        ptq = d.pop("ptq", None)
        ptq = {} if ptq is None else ptq
        if isinstance(ptq, list):  # ptq = ["rtn", "rtn+bn", "qdrop"]: the methods
            ptq = {"variants": ptq}
        if not isinstance(ptq, dict):
            raise StudyError(f"ptq must be a list of PTQ methods (e.g. [\"rtn\", \"qdrop\"]) or a mapping (e.g. "
                             f"{{\"calib_size\": 256}}), got {ptq!r}")
        if "methods" in ptq:  # an alias of "variants"
            if "variants" in ptq and ptq["variants"] != ptq["methods"]:
                raise StudyError("ptq gives both 'methods' and 'variants' (the same key); keep one")
            ptq = {k: v for k, v in ptq.items() if k != "methods"} | {"variants": ptq["methods"]}
        mixed = d.pop("mixed", None)
        if mixed is not None:
            if not isinstance(mixed, dict):
                raise StudyError(f"mixed must be a mapping such as {{\"budgets\": [2.5, 3.0]}} or null, got {mixed!r}")
            unknown = sorted(set(mixed) - set(DEFAULT_MIXED))
            if unknown:
                raise StudyError(f"mixed: unknown keys {unknown}; valid: {sorted(DEFAULT_MIXED)}")
            mixed = {**DEFAULT_MIXED, **mixed}
        cfg = cls(**d, instruments=Instruments(**inst), ptq={**DEFAULT_PTQ, **ptq}, mixed=mixed)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every key's type and range (:meth:`from_dict` calls it).

        Raises:
            StudyError: naming the key, what it must be, and what it is.
        """
        from dnq.quant import MAX_BITS, MIN_BITS, parse_bits
        from dnq.train import TrainConfig

        if not isinstance(self.name, str) or not self.name.strip():
            raise StudyError(f"name must be a non-empty string, got {self.name!r}")
        if isinstance(self.model, list):
            raise StudyError(f"the study lists several models {self.model}; run one study per model with "
                             "--set model=NAME (or a config file with 'model')")
        for key in ("data", "model", "train_bits"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise StudyError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise StudyError(f"data_root must be a path (a string) or null, got {self.data_root!r}")
        if not isinstance(self.runs, list) or not all(isinstance(r, dict) for r in self.runs):
            raise StudyError(f"runs must be a list of mappings such as {{\"method\": \"sgd\"}}, got {self.runs!r}")
        if not isinstance(self.train, dict):
            raise StudyError(f"train must be a mapping of training settings (e.g. {{\"epochs\": 2}}), got "
                             f"{self.train!r}")
        if not self.runs:
            raise StudyError("the study has no runs; give at least one {'method': ...}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for i, r in enumerate(self.runs):
            if "method" not in r:
                raise StudyError(f"run {i} has no 'method' (one of sgd, dnq, dnq-w, dnq-a, gaussian, sam)")
            bad = sorted(set(r) - fields - {"name"})
            if bad:
                raise StudyError(f"run {i}: unknown training settings {bad}")
            if "seed" in r or "out" in r:
                raise StudyError(f"run {i}: {'seed' if 'seed' in r else 'out'} has no effect in a run (the study's "
                                 "seeds and folder set it); remove it")
            empty = sorted(k for k, v in r.items() if isinstance(v, list) and not v)
            if empty:
                raise StudyError(f"run {i}: {empty} sweep an empty list; give at least one value")
            if not isinstance(r.get("name", ""), (str, int, float)):
                raise StudyError(f"run {i}: name must be a string, got {r['name']!r}")
        bad = sorted(set(self.train) - fields)
        if bad:
            raise StudyError(f"train: unknown training settings {bad}")
        overridden = {"method": "every run sets its own method (in runs)", "seed": "the study's seeds set it",
                      "out": "the study puts each run in out/runs/"}
        for key in sorted(set(self.train) & set(overridden)):
            raise StudyError(f"train.{key} has no effect: {overridden[key]}; remove it")
        for key, value in self.train.items():
            _check_setting(key, value, "train")
        if not isinstance(self.seeds, list) or not self.seeds or not all(_is_int(s) for s in self.seeds):
            raise StudyError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        if not isinstance(self.bits, list) or not self.bits or not all(isinstance(b, str) for b in self.bits):
            raise StudyError(f"bits must be a non-empty list of bit-widths such as [\"W4A4\", \"W3A3\"], got "
                             f"{self.bits!r}")
        try:
            for b in [*self.bits, self.train_bits]:
                parse_bits(b)
        except ValueError as e:
            raise StudyError(f"bad bit-width: {e}") from None
        if len(set(self.bits)) != len(self.bits):
            raise StudyError(f"bits lists a bit-width twice: {self.bits}")
        unknown = sorted(set(self.ptq) - set(DEFAULT_PTQ))
        if unknown:
            raise StudyError(f"ptq: unknown keys {unknown}; valid: {sorted(DEFAULT_PTQ)}")
        variants = self.ptq.get("variants")
        bad = [v for v in variants if v not in PTQ_METHODS] if isinstance(variants, list) else [variants]
        if bad or not variants:
            raise StudyError(f"ptq.variants must be a non-empty list of PTQ methods ({', '.join(PTQ_METHODS)}), "
                             f"got {self.ptq.get('variants')!r}")
        if len(set(variants)) != len(variants):
            raise StudyError(f"ptq.variants lists a method twice: {variants}")
        from dnq.quant import RANGE_METHODS

        ri = self.ptq["recon_iters"]
        if ri is not None and not (_is_int(ri) and ri >= 1):
            raise StudyError(f"ptq.recon_iters must be an integer >= 1 (steps per block) or null (20000 on a GPU, "
                             f"500 on a CPU), got {ri!r}")
        for k in ("recon_calib_size", "recon_batch_size"):
            if not _is_int(self.ptq[k]) or self.ptq[k] < 1:
                raise StudyError(f"ptq.{k} must be an integer >= 1, got {self.ptq[k]!r}")
        if self.ptq["recon_range"] not in RANGE_METHODS:
            raise StudyError(f"ptq.recon_range must be one of {', '.join(RANGE_METHODS)}, got "
                             f"{self.ptq['recon_range']!r}")
        fixed = {k: DEFAULT_PTQ[k] for k in ("weight_mode", "weight_granularity", "act", "range", "calib_split",
                                             "fold_bn")}
        changed = {k: self.ptq[k] for k in fixed if k in self.ptq and self.ptq[k] != fixed[k]}
        if changed:
            raise StudyError(f"ptq: {changed} cannot be changed in a study (it is the simple PTQ of the toolkit: "
                             f"{fixed}); use `dnq ptq` for other quantizers")
        flb = self.ptq["first_last_bits"]
        if flb is not None and not (_is_int(flb) and MIN_BITS <= flb <= MAX_BITS):
            raise StudyError(f"ptq.first_last_bits must be an integer in {MIN_BITS}..{MAX_BITS} or null, got {flb!r}")
        if not _is_int(self.ptq["calib_size"]) or self.ptq["calib_size"] < 1:
            raise StudyError(f"ptq.calib_size must be an integer >= 1, got {self.ptq['calib_size']!r}")
        if self.mixed is not None:
            self._validate_mixed()
        i = self.instruments
        if i.trace_method not in ("hutchinson", "hutch++"):
            raise StudyError(f"instruments.trace_method must be 'hutchinson' or 'hutch++', got {i.trace_method!r}")
        minimum = {"trace_matvecs": 6 if i.trace_method == "hutch++" else 2, "block_matvecs": 2, "noise_matvecs": 2}
        for k in ("hessian_samples", "hessian_batch", "trace_matvecs", "eig_k", "density_runs", "density_steps",
                  "block_matvecs", "noise_matvecs", "surface_steps", "slice_steps", "replicates"):
            low = minimum.get(k, 1)
            if not _is_int(getattr(i, k)) or getattr(i, k) < low:
                why = {"trace_matvecs": f" ({i.trace_method})",
                       "replicates": " (1: no sampling-error measurement; N >= 2: the trace and top eigenvalue "
                                     "again on N disjoint subsets of hessian_samples images)"}.get(k, "")
                raise StudyError(f"instruments.{k} must be an integer >= {low}{why}, got {getattr(i, k)!r}")
        if not _is_number(i.eig_tol) or not i.eig_tol > 0:
            raise StudyError(f"instruments.eig_tol must be a number > 0, got {i.eig_tol!r}")
        if not _is_number(i.surface_span) or not i.surface_span > 0:
            raise StudyError(f"instruments.surface_span must be a number > 0, got {i.surface_span!r}")
        span = tuple(i.slice_span) if isinstance(i.slice_span, (list, tuple)) else None
        if span is None or len(span) != 2 or not all(_is_number(v) for v in span) or not span[0] < span[1]:
            raise StudyError(f"instruments.slice_span must be [low, high] with low < high, got {i.slice_span!r}")
        if not _is_int(i.seed):
            raise StudyError(f"instruments.seed must be an integer, got {i.seed!r}")
        for r in self.expand():  # every model's settings, sweeps expanded (duplicates refused there)
            for key, value in r["settings"].items():
                _check_setting(key, value, f"run {r['name']!r}")

    def _validate_mixed(self) -> None:
        from dnq.mixed import BUDGET_KINDS, OBJECTIVES
        from dnq.quant import MAX_BITS, MIN_BITS

        m = self.mixed

        def bit_list(key):
            v = m[key]
            if not isinstance(v, list) or not v or not all(_is_int(b) and MIN_BITS <= b <= MAX_BITS for b in v) \
                    or len(set(v)) != len(v):
                raise StudyError(f"mixed.{key} must be a non-empty list of distinct integers in "
                                 f"{MIN_BITS}..{MAX_BITS}, got {v!r}")
        bit_list("bits")
        bit_list("uniform_bits")
        if m["kind"] not in BUDGET_KINDS:
            raise StudyError(f"mixed.kind must be one of {', '.join(BUDGET_KINDS)}, got {m['kind']!r}")
        b = m["budgets"]
        if not isinstance(b, list) or not b or not all(_is_number(v) and v > 0 for v in b):
            raise StudyError(f"mixed.budgets must be a non-empty list of positive numbers (e.g. [2.5, 3.0]), got {b!r}")
        if m["kind"] == "avg-bits":
            bad = [v for v in b if not min(m["bits"]) <= v]
            if bad:
                raise StudyError(f"mixed.budgets {bad} are below the smallest candidate bit-width "
                                 f"{min(m['bits'])}: no allocation fits; raise them or add smaller mixed.bits")
        o = m["objectives"]
        if not isinstance(o, list) or not o or any(x not in OBJECTIVES for x in o):
            raise StudyError(f"mixed.objectives must be a non-empty list of {', '.join(OBJECTIVES)}, got {o!r}")
        meth = m["methods"]
        if not isinstance(meth, list) or not meth or any(x not in PTQ_METHODS for x in meth):
            raise StudyError(f"mixed.methods must be a non-empty list of PTQ methods ({', '.join(PTQ_METHODS)}), "
                             f"got {meth!r}")
        if not (_is_int(m["abits"]) and MIN_BITS <= m["abits"] <= MAX_BITS):
            raise StudyError(f"mixed.abits must be an integer in {MIN_BITS}..{MAX_BITS}, got {m['abits']!r}")
        if not _is_int(m["matvecs"]) or m["matvecs"] < 2:
            raise StudyError(f"mixed.matvecs must be an integer >= 2, got {m['matvecs']!r}")
        if not isinstance(m["tie_shared_inputs"], bool):
            raise StudyError(f"mixed.tie_shared_inputs must be true or false, got {m['tie_shared_inputs']!r}")

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
        # 512 curvature images: the smallest size whose trace and top eigenvalue move at most 2.5% between disjoint
        # image subsets, and the most the demo's time allows (BENCHMARKS.md, sampling error, issue 13)
        "instruments": {"hessian_samples": 512, "trace_matvecs": 48, "eig_k": 3, "density_runs": 2,
                        "density_steps": 32, "block_matvecs": 16, "noise_matvecs": 32, "surface_steps": 11,
                        "slice_steps": 21},
        "mixed": {"budgets": [2.5, 3.0], "methods": ["rtn+bn"]},
    },
    "cifar10-subset": {
        # the seeded 10,000-image subset of torchvision's CIFAR-10 under data_root (dnq.data, "cifar10-subset"; fetch
        # CIFAR-10 once with `dnq train --data cifar10 --download ...`), or --set data=npz:PATH for a file of it
        "name": "cifar10-subset", "data": "cifar10-subset", "model": "resnet20",
        # one strength per method, each method's published CIFAR default (DNQ lambda 1, SAM rho 0.05; gaussian
        # at lambda 1 is the variance of DNQ's measured weight error), not tuned: see the README's caveats
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [1.0]}, {"method": "gaussian", "lambda_max": [1.0]},
                 {"method": "sam", "sam_rho": [0.05]}],
        "seeds": [0, 1], "bits": ["W4A4", "W3A3", "W2A4"], "train_bits": "W3A3",
        "train": {"epochs": 12, "batch_size": 128, "lr": 0.1},
        # sized for a 2-core CPU: training, instrument and QDrop times per model in BENCHMARKS.md (cifar10-subset);
        # 512 curvature images: at 256 the trace moved 3.6-4.7% between disjoint image subsets, at 512 2.7-3.5%
        # (BENCHMARKS.md, sampling error, issue 13)
        "instruments": {"hessian_samples": 512, "trace_matvecs": 24, "eig_k": 2, "density_runs": 1,
                        "density_steps": 16, "block_matvecs": 4, "noise_matvecs": 8, "surface_steps": 7,
                        "slice_steps": 11},
        # QDrop at 500 steps per block (the papers: 20,000), 1,024 calibration images (time: BENCHMARKS.md)
        "ptq": {"variants": ["rtn", "rtn+bn", "qdrop"], "recon_iters": 500, "recon_calib_size": 1024},
        # mixed precision at 2.5 and 3 average weight bits (A4) under rtn+bn, every objective (BENCHMARKS.md: time)
        "mixed": {"budgets": [2.5, 3.0], "methods": ["rtn+bn"]},
    },
    "cifar100": {
        "name": "cifar100", "data": "cifar100", "model": ["resnet20", "resnet56", "resnet18", "mobilenetv2"],
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [1.0]}, {"method": "gaussian", "lambda_max": [1.0]},
                 {"method": "sam", "sam_rho": [0.05]}],
        "seeds": [0, 1], "bits": ["W4A4", "W2A4", "W2A2"], "train_bits": "W4A4",
        "train": {"epochs": 120, "batch_size": 128, "lr": 0.1},
        "instruments": {"hessian_samples": 4096, "hessian_batch": 512, "trace_matvecs": 96, "eig_k": 5,
                        "density_runs": 4, "density_steps": 64, "block_matvecs": 32, "noise_matvecs": 64,
                        "surface_steps": 21, "slice_steps": 41},
        # the papers' reconstruction: 20,000 steps per block, batch 32, 1,024 calibration images (README: wall time)
        "ptq": {"variants": ["rtn", "rtn+bn", "adaround", "brecq", "qdrop"], "recon_iters": 20000,
                "recon_calib_size": 1024},
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
        if not isinstance(preset, str) or preset not in PRESETS:
            raise StudyError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        d = copy.deepcopy(PRESETS[preset])
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise StudyError(f"study config {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            text = path.read_text()
            extra = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            kind = "TOML" if path.suffix == ".toml" else "JSON (name it .toml for TOML)"
            raise StudyError(f"cannot parse {path} as {kind}: {_first_line(e)}") from None
        if not isinstance(extra, dict):
            raise StudyError(f"{path} must hold a mapping of study keys (name, runs, ...), not a "
                             f"{type(extra).__name__}")
        d = _merge(d, _relative_to(extra, path.parent))
    d = _merge(d, overrides)
    if isinstance(d.get("model"), list):  # a list of architectures: one sub-study each is the user's job here
        from_preset = preset is not None and d["model"] == PRESETS[preset].get("model")
        where = f"preset {preset!r}" if from_preset else "the study"
        raise StudyError(f"{where} lists several models {d['model']}; run one study per model with "
                         "--set model=NAME (or a config file with 'model')")
    return StudyConfig.from_dict(d)


def _relative_to(extra: dict, folder: Path) -> dict:
    """A config file's own relative paths (``data = "npz:PATH"``, ``data_root``) made absolute
    against the file's folder, so that a study file means the same from any working directory."""
    out = dict(extra)
    data = out.get("data")
    if isinstance(data, str) and data.startswith("npz:"):
        p = Path(os.path.expanduser(data[4:]))
        out["data"] = f"npz:{p if p.is_absolute() else (folder / p).resolve()}"
    root = out.get("data_root")
    if isinstance(root, str) and root:
        p = Path(os.path.expanduser(root))
        out["data_root"] = str(p if p.is_absolute() else (folder / p).resolve())
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- the runner -------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    from dnq.io import atomic_write_json

    atomic_write_json(path, obj)


def check_device(device: str) -> None:
    """Refuse a device this process cannot use, before anything starts.

    Raises:
        StudyError: an unknown device name, CUDA asked for where there is none, or a GPU index
            past the last one.
    """
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise StudyError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise StudyError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    if ":" in device:
        if int(device.split(":")[1]) >= torch.cuda.device_count():
            raise StudyError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise StudyError(f"--device {device} under torchrun: every process takes the GPU of its LOCAL_RANK; pass "
                             "--device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")


class Study:
    """Runs a :class:`StudyConfig` into ``out`` (see the module doc).

    Args:
        config: the study.
        out: its directory; an existing directory must hold the same study (same name), or be
            empty.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        progress: progress bars (``False`` for quiet runs).

    Raises:
        StudyError: a device that is not available here (checked before anything starts).
    """

    def __init__(self, config: StudyConfig, out: str | os.PathLike, device: str = "auto", progress: bool = True):
        from dnq.train import init_distributed, resolve_device

        if not isinstance(config, StudyConfig):
            raise TypeError(f"config must be a StudyConfig (see load_config), got {type(config).__name__}")
        if str(out) == "":
            raise StudyError("the study folder is an empty path; give --out a folder")
        check_device(device)
        self.cfg, self.out, self.progress = config, Path(out), progress
        kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device.split(":")[0]
        # under torchrun: join the process group (training is data-parallel, products sharded)
        self.rank, self.world, local_rank, self.own_pg = init_distributed(kind)
        self.device = resolve_device(device, local_rank)
        self._datasets: dict = {}  # loaded once per study, not once per model

    # -- checks before anything is written ---------------------------------------------------
    def check(self) -> None:
        """Everything that can go wrong before the first write: the output folder
        (:meth:`check_out`) and every run's training configuration (:func:`dnq.train.validate`),
        its dataset (loaded here, and kept for the measurements), its batch size against the
        training split, and its model on the dataset's images (one forward pass of two images).

        Raises:
            StudyError: naming the run (or the folder) and the fix.
        """
        from dnq.data import DataError, load_dataset
        from dnq.train import ConfigError, validate

        self.check_out()
        fix = "fix it in the study's runs or train settings (the config file, or --set train.KEY=VALUE)"
        loaded, models = {}, {}
        for r in self.cfg.expand():
            where = f"run {r['name']!r}"
            try:
                tc = self.train_config(r["settings"], self.out / "runs" / r["id"])
                validate(tc)
            except (ConfigError, TypeError, ValueError) as e:
                raise StudyError(f"{where}: {_first_line(e)}; {fix}") from None
            key = (tc.data, repr(tc.val_size), tc.val_seed)
            if key not in loaded:
                try:
                    loaded[key] = load_dataset(tc.data, tc.data_root, tc.download, val_size=tc.val_size,
                                               val_seed=tc.val_seed)
                except DataError as e:
                    raise StudyError(f"{where}: cannot load dataset {tc.data!r}: {_first_line(e)}") from None
            ds = loaded[key]
            n = len(ds.x_train)
            if tc.batch_size > n:
                raise StudyError(f"{where}: batch_size {tc.batch_size} is larger than the {n} training images of "
                                 f"{tc.data} ({ds.val_size} more are held out for validation); use a smaller "
                                 "batch size in the study's runs or train settings (e.g. --set train.batch_size=64)")
            if tc.batch_size % self.world:
                raise StudyError(f"{where}: batch_size {tc.batch_size} is not divisible by the {self.world} processes")
            inst = self.cfg.instruments
            if inst.replicates > 1 and inst.replicates * inst.hessian_samples > n:
                raise StudyError(f"{where}: instruments.replicates {inst.replicates} disjoint subsets of "
                                 f"instruments.hessian_samples {inst.hessian_samples} images need "
                                 f"{inst.replicates * inst.hessian_samples} training images, but {tc.data} has {n}; "
                                 f"lower replicates to at most {max(1, n // inst.hessian_samples)} or hessian_samples "
                                 f"to at most {n // inst.replicates}")
            mkey = (tc.model, tc.data)
            if mkey not in models:
                models[mkey] = self._check_model(tc.model, ds, where)
            if self.cfg.instruments.eig_k > models[mkey]:
                raise StudyError(f"instruments.eig_k is {self.cfg.instruments.eig_k}, more than the "
                                 f"{models[mkey]} parameters of {tc.model}")
        for ds in loaded.values():  # the measurements reuse them (keyed as Measure looks them up)
            self._datasets.setdefault((ds.name, ds.val_size, ds.val_seed or 0), ds.to(self.device))

    @staticmethod
    def _check_model(name: str, ds, where: str) -> int:
        """Build ``name`` for ``ds`` and run two of its images through it; returns its number of
        trainable parameters."""
        from dnq.models import build_model

        try:
            model = build_model(name, ds.num_classes, ds.in_channels, ds.image_size).eval()
            with torch.no_grad():
                out = model(ds.normalize(ds.x_train[:2].cpu()))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            shape = tuple(ds.x_train.shape[1:])
            raise StudyError(f"{where}: model {name!r} does not run on {ds.name} images of shape {shape}: "
                             f"{_first_line(e)}; choose another model or dataset") from None
        if out.dim() != 2 or out.shape[1] != ds.num_classes:
            raise StudyError(f"{where}: model {name!r} gives outputs of shape {tuple(out.shape)} on {ds.name}, not "
                             f"(batch, {ds.num_classes} classes)")
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def check_out(self) -> None:
        """The output folder can hold this study: it is a folder (or can be created) that this
        process can write, and it holds this study (same name) or nothing. Writes nothing.

        Raises:
            StudyError: naming the folder and the fix.
        """
        from dnq.rundir import LOCK_NAME

        out = self.out
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise StudyError(f"{out} is not a folder (a file, or a broken link); choose another --out")
            if not os.access(out, os.W_OK | os.X_OK):
                raise StudyError(f"{out} is not writable by this user; choose another --out or fix its permissions")
            meta = out / "study.json"
            if meta.is_file():
                old = read_study_json(meta)
                if old["config"].get("name") != self.cfg.name:
                    raise StudyError(f"{out} holds study {old['config'].get('name')!r}, not {self.cfg.name!r}; "
                                     "choose another --out")
            elif any(p.name != LOCK_NAME for p in out.iterdir()):
                raise StudyError(f"{out} exists, is not empty and holds no study.json; choose another --out")
            return
        parent = out.parent
        while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise StudyError(f"cannot create {out}: {parent} is not a folder (a file, or a broken link); "
                             "choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StudyError(f"cannot create {out}: {parent} is not writable by this user; choose another --out")

    # -- directory --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the output folder (:meth:`check_out`), then create ``models/``, ``runs/`` and
        write ``study.json`` (rank 0)."""
        self.check_out()
        self._barrier()  # every rank has checked before rank 0 writes
        if self.rank == 0:
            meta = self.out / "study.json"
            old = read_study_json(meta) if meta.is_file() else {}
            (self.out / "models").mkdir(parents=True, exist_ok=True)
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            new = {"version": STUDY_VERSION, "config": self.cfg.to_dict(), "hash": self.cfg.hash(),
                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if "splits" in old and old.get("hash") == new["hash"]:
                new["splits"] = old["splits"]
            _write_json(meta, new)
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective: every rank must call it)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @contextlib.contextmanager
    def _locked(self):
        """Rank 0 holds the folder's lock (:func:`dnq.rundir.folder_lock`) for the block; a
        folder locked by another process is refused on every rank."""
        from dnq.rundir import LockedError, folder_lock

        lock, err = None, None
        if self.rank == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                lock = folder_lock(self.out, "landscape study")
                lock.__enter__()
            except (LockedError, OSError) as e:
                lock, err = None, e
        if not self._all_ok(err is None):
            if err is not None:
                raise err
            raise StudyError(f"{self.out}: rank 0 could not lock the study folder (its error says why)")
        try:
            yield
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)

    # -- one model ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Check everything (:meth:`check`), then, holding the folder's lock, train and measure
        every model; returns the records.

        Raises:
            StudyError: a bad configuration, folder, training or measurement (naming the run and
                the fix); :class:`dnq.rundir.LockedError`: another process runs in the folder.
        """
        try:
            self.check()
            fresh = not self.out.exists(), not (self.out / "study.json").exists()
            try:
                with self._locked():
                    self.prepare()
                    runs = self.cfg.expand()
                    records = []
                    bar = tqdm(runs, desc=f"study {self.cfg.name}", disable=not self.progress or self.rank != 0)
                    for r in bar:
                        bar.set_postfix_str(r["id"])
                        records.append(self.run_one(r))
                    return records
            except BaseException:
                if self.rank == 0:
                    self._remove_if_empty(*fresh)
                raise
        finally:
            if self.own_pg:
                dist.destroy_process_group()

    def _remove_if_empty(self, created_folder: bool, created_meta: bool) -> None:
        """After a study that failed before it kept anything (no model record, no run folder):
        remove what this invocation created (``study.json``, the empty ``models/`` and ``runs/``,
        and the study folder itself when it made it), so that nothing half-made is left behind."""
        if not created_meta:
            return
        models, runs = self.out / "models", self.out / "runs"
        if any(models.iterdir() if models.is_dir() else ()) or any(runs.iterdir() if runs.is_dir() else ()):
            return
        for d in (models, runs):
            if d.is_dir():
                d.rmdir()
        (self.out / "study.json").unlink(missing_ok=True)
        if created_folder and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _record_path(self, rid: str) -> Path:
        return self.out / "models" / f"{rid}.json"

    def _load_record(self, rid: str) -> dict | None:
        """The model's record, or None: missing, or corrupt (then moved aside to
        ``<name>.json.corrupt-<timestamp>`` by rank 0, with a warning, and measured again)."""
        p = self._record_path(rid)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
            why = _check_record(rec, p)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            why = f"not valid JSON ({_first_line(e)})"
        except FileNotFoundError:  # moved aside by rank 0 meanwhile
            return None
        if why is None:
            return rec
        if self.rank == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = p.with_name(f"{p.name}.corrupt-{stamp}")
            k = 1
            while aside.exists():
                k += 1
                aside = p.with_name(f"{p.name}.corrupt-{stamp}-{k}")
            p.rename(aside)
            print(f"landscape study: warning: {p} was corrupt ({why}); moved it to {aside.name} and measuring "
                  f"model {rid} again (its training is kept)", file=sys.stderr)
        return None

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
        from dnq.train import NonFiniteLossError, load_model, train

        cfg_train = self.train_config(r["settings"], Path("."))
        tkey = _hash({k: v for k, v in cfg_train.to_dict().items() if k not in ("out", "device", "data_root")})
        run_dir = self.out / "runs" / f"{r['id']}-{tkey[:8]}"
        where = f"run {r['name']!r} ({run_dir})"
        rec = self._load_record(r["id"])
        if rec is None or rec.get("train_key") != tkey:
            rec = {"id": r["id"], "name": r["name"], "config": r["config"], "settings": r["settings"],
                   "train_key": tkey, "run_dir": str(run_dir.relative_to(self.out)), "measurements": {}}
        if not (run_dir / "model.pt").is_file():
            t0 = time.perf_counter()
            resume = (run_dir / "checkpoint.pt").is_file()
            cfg_train = self.train_config(r["settings"], run_dir)
            try:
                result = train(cfg_train, resume=resume, overwrite=not resume and run_dir.exists(), quiet=True)
            except (ValueError, NonFiniteLossError) as e:  # ConfigError, DataError, CheckpointError, LockedError
                raise StudyError(f"{where}: training failed: {_first_line(e)}") from None
            rec["train"] = {**result, "time_s": time.perf_counter() - t0}
            self._save(rec)
            self._barrier()  # model.pt is written by rank 0
        elif "train" not in rec and (run_dir / "result.json").is_file():
            rec["train"] = _read_json(run_dir / "result.json", "the training's result",
                                      f"delete the folder {run_dir} to train that model again")
        try:
            model, meta = load_model(run_dir, self.device)
        except (ValueError, OSError) as e:  # CheckpointError, a missing or unreadable model.pt
            raise StudyError(f"{where}: cannot load the trained model: {_first_line(e)}; delete the folder "
                             f"{run_dir} to train it again") from None
        m = Measure(self, rec, model, meta)
        self._record_splits(m.ds)
        m.all()
        return rec

    def _record_splits(self, ds) -> None:
        """Write the split sizes into study.json once (the report states them)."""
        if self.rank != 0:
            return
        path = self.out / "study.json"
        meta = read_study_json(path)
        splits = {"train": len(ds.x_train), "val": ds.val_size, "test": len(ds.x_test),
                  "calibration": min(self.cfg.ptq["calib_size"], len(ds.x_train)),
                  "hessian": min(self.cfg.instruments.hessian_samples, len(ds.x_train))}
        if meta.get("splits") != splits:
            _write_json(path, {**meta, "splits": splits})


# -- measurement keys -----------------------------------------------------------------------------
def _frozen(v):
    """``v`` with lists made tuples and dicts made sorted ``(key, value)`` tuples (hashable, and
    JSON-stable through :func:`dataclasses.asdict`)."""
    if isinstance(v, dict):
        return tuple((k, _frozen(v[k])) for k in sorted(v))
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


@dataclasses.dataclass(frozen=True)
class MeasurementKey:
    """What a measurement's number depends on besides the trained model (one subclass per kind).

    The key stored with a measurement (:meth:`digest`) is the hash of the trained model's training
    key, the measurement's name, the class name and :func:`dataclasses.asdict` of every field: an
    input the measurement reads is a field of its key class, so nothing can be left out of the
    hash by hand. A stored measurement is reused only when its key is the same.

    Records written before these classes (``study.json`` version 2 and older: hand-written dicts
    with one-letter fields, and a ``ptq`` key without the calibration seed) never match, so
    rerunning a study on such a folder measures every model again (trainings are kept).
    """

    def digest(self, train_key: str, name: str) -> str:
        """The stored key: a hash of ``train_key``, ``name``, the class name and every field."""
        return _hash({"train": train_key, "name": name, "kind": type(self).__name__,
                      "fields": dataclasses.asdict(self)})


@dataclasses.dataclass(frozen=True)
class AccuracyKey(MeasurementKey):
    """``fp``: accuracy and loss of the float model on ``splits`` (the run's own validation and
    test splits; the model's training key fixes the data and the split)."""

    splits: tuple


@dataclasses.dataclass(frozen=True)
class RoundingPTQKey(MeasurementKey):
    """``ptq:<bits>`` / ``ptq+bn:<bits>`` (and the mixed-precision PTQ with ``rtn`` / ``rtn+bn``):
    :func:`dnq.quant.quantize` at ``bits`` with ``method``, ``calib_size`` calibration images drawn
    with ``seed``, ``first_last_bits``, the weight ``range`` method and, for mixed precision, the
    weight bits per layer (``bits_by_layer``, else None)."""

    bits: str
    method: str
    seed: int
    calib_size: int
    first_last_bits: int | None
    range: str
    bits_by_layer: tuple | None


@dataclasses.dataclass(frozen=True)
class ReconPTQKey(MeasurementKey):
    """``ptq+<method>:<bits>`` for a reconstruction method (:func:`dnq.recon.reconstruct`): the
    steps per block (resolved for the device), calibration size and batch, initial ranges, the
    seed of the calibration images and of the reconstruction, ``first_last_bits`` and the weight
    bits per layer of mixed precision (else None)."""

    bits: str
    method: str
    seed: int
    calib_size: int
    batch_size: int
    iters: int
    first_last_bits: int | None
    range: str
    bits_by_layer: tuple | None


@dataclasses.dataclass(frozen=True)
class CurvatureKey(MeasurementKey):
    """The curvature images: ``samples`` training images chosen with ``seed`` (which also seeds
    the instrument's probes or directions), in batches of ``batch``."""

    samples: int
    batch: int
    seed: int


@dataclasses.dataclass(frozen=True)
class TraceKey(CurvatureKey):
    """``trace``: :func:`landscape.hessian_trace` with ``method`` and ``matvecs``."""

    method: str
    matvecs: int


@dataclasses.dataclass(frozen=True)
class EigenKey(CurvatureKey):
    """``eigen``: the top ``k`` eigenvalues to tolerance ``tol``."""

    k: int
    tol: float


@dataclasses.dataclass(frozen=True)
class DensityKey(CurvatureKey):
    """``density``: SLQ with ``runs`` runs of ``steps`` Lanczos steps."""

    runs: int
    steps: int


@dataclasses.dataclass(frozen=True)
class BlockTraceKey(CurvatureKey):
    """``blocks``: per-layer traces with ``matvecs`` probes."""

    matvecs: int


@dataclasses.dataclass(frozen=True)
class NoiseKey(CurvatureKey):
    """``noise:<bits>``: ``Tr(H Sigma)`` and the predicted and measured loss increase of the
    weight quantization at ``bits`` (``first_last_bits`` for the first and last layer), with
    ``matvecs`` probes."""

    bits: str
    first_last_bits: int | None
    matvecs: int


@dataclasses.dataclass(frozen=True)
class SurfaceKey(CurvatureKey):
    """``surface``: the 2-D surface on ``steps`` x ``steps`` points over ``[-span, span]``."""

    steps: int
    span: float


@dataclasses.dataclass(frozen=True)
class SliceKey(CurvatureKey):
    """``slice:<bits>``: the loss along ``Q(W) - W`` at ``bits`` (``first_last_bits`` for the
    first and last layer) on ``steps`` points over ``span``."""

    bits: str
    first_last_bits: int | None
    steps: int
    span: tuple


@dataclasses.dataclass(frozen=True)
class SensitivityKey(CurvatureKey):
    """``sensitivity:<range>``: every layer's sensitivity at the candidate ``bits`` with
    ``matvecs`` probes and the weight ``range`` method."""

    bits: tuple
    matvecs: int
    range: str


@dataclasses.dataclass(frozen=True)
class MixedKey(MeasurementKey):
    """``mixed+<method>:<kind>=<budget>:<objective>``: the PTQ of the allocation (``ptq``, whose
    ``bits_by_layer`` is the allocation), and what chose it: the sensitivity measurement's key,
    the budget, its kind, the objective and the tied layer groups."""

    ptq: RoundingPTQKey | ReconPTQKey
    sensitivity: str
    budget: float
    kind: str
    objective: str
    tied: tuple


@dataclasses.dataclass(frozen=True)
class SamplingKey(CurvatureKey):
    """``sampling``: the trace (``trace_method``, ``trace_matvecs``) and the top eigenvalue (the
    study's ``eig_k`` and ``eig_tol``) on ``replicates`` disjoint subsets of ``samples`` images."""

    replicates: int
    trace_method: str
    trace_matvecs: int
    eig_k: int
    eig_tol: float


def ptq_key(cfg: "StudyConfig", bits: str, method: str, device, bits_by_layer: dict | None = None
            ) -> RoundingPTQKey | ReconPTQKey:
    """The key of the study's PTQ at ``bits`` with ``method`` on ``device`` (``recon_iters``
    resolved for it), optionally with mixed-precision ``bits_by_layer``."""
    from dnq.recon import default_iters

    p, seed = cfg.ptq, cfg.instruments.seed
    per_layer = None if bits_by_layer is None else _frozen(bits_by_layer)
    if method in RECON_METHODS:
        iters = default_iters(device) if p["recon_iters"] is None else p["recon_iters"]
        return ReconPTQKey(bits=bits, method=method, seed=seed, calib_size=p["recon_calib_size"],
                           batch_size=p["recon_batch_size"], iters=iters, first_last_bits=p["first_last_bits"],
                           range=p["recon_range"], bits_by_layer=per_layer)
    return RoundingPTQKey(bits=bits, method=method, seed=seed, calib_size=p["calib_size"],
                          first_last_bits=p["first_last_bits"], range=p["range"], bits_by_layer=per_layer)


def measurement_keys(cfg: "StudyConfig", device="cpu") -> dict[str, MeasurementKey]:
    """The key of every measurement of a model of ``cfg`` except the mixed-precision ones (whose
    keys depend on the sensitivity measured), by measurement name, in the order they are taken."""
    i, flb = cfg.instruments, cfg.ptq["first_last_bits"]
    keys: dict[str, MeasurementKey] = {"fp": AccuracyKey(splits=("val", "test"))}
    for method in cfg.ptq["variants"]:
        for bits in cfg.bits:
            keys[ptq_measurement(bits, method)] = ptq_key(cfg, bits, method, device)
    hd = {"samples": i.hessian_samples, "batch": i.hessian_batch, "seed": i.seed}
    keys["trace"] = TraceKey(**hd, method=i.trace_method, matvecs=i.trace_matvecs)
    keys["eigen"] = EigenKey(**hd, k=i.eig_k, tol=i.eig_tol)
    if i.replicates > 1:
        keys["sampling"] = SamplingKey(**hd, replicates=i.replicates, trace_method=i.trace_method,
                                       trace_matvecs=i.trace_matvecs, eig_k=i.eig_k, eig_tol=i.eig_tol)
    keys["density"] = DensityKey(**hd, runs=i.density_runs, steps=i.density_steps)
    keys["blocks"] = BlockTraceKey(**hd, matvecs=i.block_matvecs)
    for bits in cfg.bits:
        keys[f"noise:{bits}"] = NoiseKey(**hd, bits=bits, first_last_bits=flb, matvecs=i.noise_matvecs)
    keys["surface"] = SurfaceKey(**hd, steps=i.surface_steps, span=i.surface_span)
    for bits in cfg.bits:
        keys[f"slice:{bits}"] = SliceKey(**hd, bits=bits, first_last_bits=flb, steps=i.slice_steps,
                                         span=tuple(i.slice_span))
    return keys


# -- sampling error of the curvature ----------------------------------------------------------------
def training_subsets(ds, samples: int, replicates: int, seed: int, batch: int
                     ) -> list[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """``replicates`` disjoint sets of ``samples`` normalized, non-augmented training images
    (validation excluded), each as ``(indices into ds.x_train, batches)``.

    They are consecutive slices of the seeded permutation of
    :func:`landscape.sensitivity_run.training_batches`, so subset 0 holds exactly the study's
    curvature images (same seed, same batches).

    Raises:
        ValueError: ``samples * replicates`` is more than the training images (the message says
            how many there are).
    """
    n_train = len(ds.x_train)
    if not (_is_int(samples) and samples >= 1 and _is_int(replicates) and replicates >= 1):
        raise ValueError(f"samples and replicates must be integers >= 1, got {samples!r} and {replicates!r}")
    if samples * replicates > n_train:
        raise ValueError(f"{replicates} disjoint subsets of {samples} images need {samples * replicates} training "
                         f"images, but {ds.name} has {n_train}; lower the number of subsets or the images per subset "
                         f"(at most {n_train // samples} subsets of {samples})")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_train, generator=g)
    out = []
    for r in range(replicates):
        idx = perm[r * samples:(r + 1) * samples]
        dev_idx = idx.to(ds.x_train.device)
        x, y = ds.normalize(ds.x_train[dev_idx]), ds.y_train[dev_idx]
        out.append((idx, [(x[j:j + batch], y[j:j + batch]) for j in range(0, samples, batch)]))
    return out


def spread(values: list[float], errors: list[float | None]) -> dict:
    """The between-subset spread of ``values`` (one per subset) next to the estimator's own error.

    Returns:
        ``n``, ``mean``, ``std`` (sample standard deviation over subsets, None for one),
        ``relative_spread`` (``std / |mean|``), ``min_max_ratio`` (``min / max``; None unless every
        value is positive), ``mean_estimator_error`` (mean of ``errors``, None without any) and
        ``spread_to_error`` (``std / mean_estimator_error``: about 1 when the subsets differ no
        more than the estimator's noise, well above 1 when the images matter).
    """
    import statistics

    vals = [float(v) for v in values]
    errs = [float(e) for e in errors if e is not None and math.isfinite(e)]
    mean = statistics.fmean(vals) if vals else None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    err = statistics.fmean(errs) if errs else None
    return {"n": len(vals), "mean": mean, "std": std,
            "relative_spread": None if std is None or not mean else std / abs(mean),
            "min_max_ratio": min(vals) / max(vals) if vals and min(vals) > 0 else None,
            "mean_estimator_error": err,
            "spread_to_error": None if std is None or not err else std / err}


class Measure:
    """The measurements of one trained model (each skipped when its key is already recorded).

    Every measurement method takes its key (:class:`MeasurementKey`) and reads its settings from
    it, so what a stored number depends on and what its key holds are the same thing.
    """

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
        self.hdata = training_batches(self.ds, self.inst.hessian_samples, self.inst.seed, self.inst.hessian_batch)
        self.loss_fn = nn.functional.cross_entropy
        self._op = None

    def _shard(self, batches: list) -> list:
        """This rank's share of ``batches`` (products are sharded across ranks)."""
        rank, world = self.s.rank, self.s.world
        return batches[rank::world] if world > 1 else batches

    def op(self) -> HessianOperator:
        if self._op is None:
            self._op = HessianOperator(self.model, self.loss_fn, self._shard(self.hdata))
        return self._op

    def _do(self, name: str, key: MeasurementKey, fn) -> None:
        """Take measurement ``name`` as ``fn()`` unless it is recorded with the same ``key``.

        Raises:
            TypeError: ``key`` is not a :class:`MeasurementKey` (a hand-written dict can forget an
                input; write a key class instead).
        """
        if not isinstance(key, MeasurementKey):
            raise TypeError(f"measurement {name!r}: its key must be a MeasurementKey (a frozen dataclass of every "
                            f"input of the measurement), got {type(key).__name__}; add a key class for it")
        digest = key.digest(self.rec["train_key"], name)
        have = self.rec["measurements"].get(name)
        if have is not None and have.get("key") == digest:
            return
        t0 = time.perf_counter()
        try:
            with full_precision():  # the user's TF32 / autocast settings stay for training, not for measurements
                value = fn()
        except NonFiniteError as e:
            rid = self.rec["id"]
            raise StudyError(f"model {rid}, measurement {name!r}: {_first_line(e)}. The measurements finished so far "
                             f"are kept in models/{rid}.json; train that model again (delete "
                             f"{self.rec.get('run_dir', 'its run folder')}) or remove its run from the study") from None
        self.rec["measurements"][name] = {"key": digest, "value": value, "time_s": time.perf_counter() - t0,
                                          "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.s._save(self.rec)

    def all(self) -> None:
        how = {AccuracyKey: self.fp, RoundingPTQKey: self.ptq, ReconPTQKey: self.ptq, TraceKey: self.trace,
               EigenKey: self.eigen, SamplingKey: self.sampling, DensityKey: self.density,
               BlockTraceKey: self.blocks, NoiseKey: self.noise, SurfaceKey: self.surface, SliceKey: self.slice}
        for name, key in measurement_keys(self.s.cfg, self.s.device).items():
            fn = how[type(key)]
            self._do(name, key, lambda fn=fn, key=key: fn(key))
        if self.s.cfg.mixed is not None:
            self.mixed_all()

    def mixed_all(self) -> None:
        """The sensitivity of each range method the mixed PTQ methods need, the uniform line, and
        every (method, budget, objective) allocation with its accuracy."""
        from dnq.mixed import plan, shared_input_groups

        m, cfg, i = self.s.cfg.mixed, self.s.cfg, self.inst
        tied = shared_input_groups(self.model, self.hdata[0][0][:2]) if m["tie_shared_inputs"] else None
        for method in m["methods"]:
            rng = sensitivity_range(cfg.ptq, method)
            sname = f"sensitivity:{rng}"
            skey = SensitivityKey(samples=i.hessian_samples, batch=i.hessian_batch, seed=i.seed,
                                  bits=tuple(m["bits"]), matvecs=m["matvecs"], range=rng)
            self._do(sname, skey, lambda skey=skey: self.sensitivity(skey))
            sens = self.rec["measurements"][sname]
            for b in m["uniform_bits"]:
                bits = f"W{b}A{m['abits']}"
                name = uniform_measurement(cfg.bits, cfg.ptq["variants"], method, bits)
                if name.startswith("mixed+"):
                    pkey = ptq_key(cfg, bits, method, self.s.device)
                    self._do(name, pkey, lambda pkey=pkey: self.ptq(pkey))
            for budget in m["budgets"]:
                for obj in m["objectives"]:
                    alloc = plan(sens["value"], obj, budget, kind=m["kind"],
                                 first_last_bits=self.ptq_cfg["first_last_bits"], abits=m["abits"], tied=tied)
                    key = MixedKey(ptq=ptq_key(cfg, f"W{max(m['bits'])}A{m['abits']}", method, self.s.device,
                                               bits_by_layer=alloc.bits),
                                   sensitivity=sens["key"], budget=float(budget), kind=m["kind"], objective=obj,
                                   tied=_frozen(tied or []))
                    self._do(mixed_measurement(method, budget, obj, m["kind"]), key,
                             lambda key=key, alloc=alloc: self.mixed(key, alloc))

    def sensitivity(self, key: SensitivityKey) -> dict:
        from .sensitivity_run import measure_sensitivity

        return measure_sensitivity(self.model, self.hdata, list(key.bits), range_method=key.range,
                                   num_matvecs=key.matvecs, seed=key.seed, progress=self.s.progress)

    def mixed(self, key: MixedKey, alloc) -> dict:
        out = self.ptq(key.ptq)
        return {**out, "objective": key.objective, "allocation": alloc.to_dict()}

    # -- the measurements -------------------------------------------------------------------
    def _accuracy(self, model: nn.Module, splits=("val", "test")) -> dict:
        """Accuracy and loss on the validation split (None without one) and on the test split."""
        from dnq.data import BatchLoader
        from dnq.train import evaluate

        out = {}
        for split in splits:
            if split == "val" and not self.ds.val_size:
                out["val_loss"] = out["val_acc"] = None
                continue
            out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(model, BatchLoader(self.ds, 1024, False, split=split))
        return out

    def fp(self, key: AccuracyKey) -> dict:
        return self._accuracy(self.model, key.splits)

    def ptq(self, key: RoundingPTQKey | ReconPTQKey) -> dict:
        """The study's PTQ (:data:`DEFAULT_PTQ`) at ``key.bits`` with one method: ``rtn``,
        ``rtn+bn`` (BatchNorm statistics re-estimated on the calibration images through the
        quantized model) or a reconstruction method (:func:`dnq.recon.reconstruct`, seeded with the
        instruments' seed); ``key.bits_by_layer``: mixed-precision weight bits."""
        from dnq.quant import parse_bits, quantize
        from dnq.recon import reconstruct

        (w, a), = parse_bits(key.bits)
        per_layer = None if key.bits_by_layer is None else dict(key.bits_by_layer)
        calib = self.ds.calibration_inputs(key.calib_size, key.seed)
        if isinstance(key, ReconPTQKey):
            q = reconstruct(self.model, w, a, calib, key.method, iters=key.iters, batch_size=key.batch_size,
                            first_last_bits=key.first_last_bits, range_method=key.range, seed=key.seed,
                            progress=self.s.progress, bits_by_layer=per_layer)
            units = [{k: u[k] for k in ("unit", "stage", "loss_before", "loss_after", "time_s")}
                     for u in q.ptq_recon["units"]]
            return {**self._accuracy(q), "variant": key.method, "calib_size": len(calib), "recon_iters": key.iters,
                    "recon_time_s": q.ptq_recon["time_s"], "recon_units": units}
        q = quantize(self.model, w, a, calib, range_method=key.range, first_last_bits=key.first_last_bits,
                     bn_reestimate=key.method == "rtn+bn", bits_by_layer=per_layer)
        return {**self._accuracy(q), "variant": key.method}

    def trace(self, key: TraceKey) -> dict:
        return hessian_trace(self.op(), key.matvecs, key.method, seed=key.seed, progress=self.s.progress).to_dict()

    def eigen(self, key: EigenKey) -> dict:
        res = top_eigenvalues(self.op(), k=key.k, tol=key.tol, seed=key.seed, progress=self.s.progress)
        d = res.to_dict()
        d.pop("eigenvectors", None)
        return d

    def density(self, key: DensityKey) -> dict:
        return spectral_density(self.op(), key.runs, key.steps, seed=key.seed, progress=self.s.progress).to_dict()

    def blocks(self, key: BlockTraceKey) -> dict:
        return block_traces(self.op(), key.matvecs, seed=key.seed, progress=self.s.progress).to_dict()

    def sampling(self, key: SamplingKey) -> dict:
        """The trace and the top eigenvalue on ``key.replicates`` disjoint subsets of
        ``key.samples`` training images (:func:`training_subsets`; subset 0 is the study's own
        curvature images, whose ``trace`` and ``eigen`` measurements are reused when recorded with
        the same settings). Subset ``r`` uses probe and start-vector seed ``key.seed + r``, so the
        between-subset spread holds both the images' and the estimator's variation, and is
        compared with the estimator's own error (:func:`spread`): the trace's standard error, and
        the Lanczos residual norm of the top eigenpair (a bound on the distance of the reported
        value to an eigenvalue of that subset's Hessian).

        Returns:
            ``replicates``: per subset its ``images`` (count), ``trace`` (``value``,
            ``std_error``, ``num_matvecs``, ``seed``, ``engines``: the operator's engines as
            ``{name: products}``), ``top_eigenvalue`` (``value``, ``residual_norm``,
            ``converged``, ``num_matvecs``, ``seed``, ``engines``) and ``reused`` (the
            measurements taken from the study's own); then ``trace`` and ``top_eigenvalue``:
            their :func:`spread`.
        """
        train_key = self.rec["train_key"]
        m = self.rec["measurements"]
        trace_key = TraceKey(samples=key.samples, batch=key.batch, seed=key.seed, method=key.trace_method,
                             matvecs=key.trace_matvecs)
        eigen_key = EigenKey(samples=key.samples, batch=key.batch, seed=key.seed, k=key.eig_k, tol=key.eig_tol)
        subsets = training_subsets(self.ds, key.samples, key.replicates, key.seed, key.batch)
        reps = []
        for r, (idx, batches) in enumerate(subsets):
            seed = key.seed + r
            rep = {"replicate": r, "images": len(idx), "reused": []}
            have_t = m.get("trace") if r == 0 else None
            have_e = m.get("eigen") if r == 0 else None
            op = None
            if have_t is not None and have_t.get("key") == trace_key.digest(train_key, "trace"):
                t, engines = have_t["value"], have_t["value"].get("engines", {})
                rep["reused"].append("trace")
            else:
                op = HessianOperator(self.model, self.loss_fn, self._shard(batches))
                res = hessian_trace(op, key.trace_matvecs, key.trace_method, seed=seed, progress=self.s.progress)
                t, engines = res.to_dict(), getattr(res, "engines", {})
            rep["trace"] = {"value": t["value"], "std_error": t["std_error"], "num_matvecs": t["num_matvecs"],
                            "seed": t["seed"], "engines": dict(engines or {})}
            if have_e is not None and have_e.get("key") == eigen_key.digest(train_key, "eigen"):
                e, engines = have_e["value"], have_e["value"].get("engines", {})
                rep["reused"].append("eigen")
            else:
                op = op or HessianOperator(self.model, self.loss_fn, self._shard(batches))
                res = top_eigenvalues(op, k=key.eig_k, tol=key.eig_tol, seed=seed, progress=self.s.progress)
                e, engines = res.to_dict(), getattr(res, "engines", {})
            rep["top_eigenvalue"] = {"value": e["eigenvalues"][0], "residual_norm": e["residual_norms"][0],
                                     "converged": e["converged"], "num_matvecs": e["num_matvecs"], "seed": e["seed"],
                                     "engines": dict(engines or {})}
            reps.append(rep)
        return {"replicates": reps,
                "trace": spread([p["trace"]["value"] for p in reps], [p["trace"]["std_error"] for p in reps]),
                "top_eigenvalue": spread([p["top_eigenvalue"]["value"] for p in reps],
                                         [p["top_eigenvalue"]["residual_norm"] for p in reps])}

    def _weight_bits(self, bits: str, first_last_bits: int | None) -> dict[str, int]:
        """Weight bits per Conv/Linear layer as PTQ gives them (first/last in execution order at
        ``first_last_bits``: :func:`dnq.quant.layer_bits`)."""
        from dnq.quant import execution_order, layer_bits, parse_bits

        (w, a), = parse_bits(bits)
        if self._order is None:
            self._order = execution_order(self.model, self.hdata[0][0])
        return {n: wb for n, (wb, _) in layer_bits(self._order, w, a, first_last_bits).items()}

    def _weight_quantized(self, bits: str, first_last_bits: int | None) -> nn.Module:
        """A copy with every Conv/Linear weight replaced by Q(W) (no BatchNorm folding): the
        quantizer of :func:`dnq.quant.weight_error` (symmetric per-channel min-max), at the bits
        PTQ gives each layer."""
        from dnq.quant import weight_quantized

        return weight_quantized(self.model, self._weight_bits(bits, first_last_bits))

    def _loss(self, model: nn.Module) -> float:
        return mean_loss(model, self.hdata, self.loss_fn)

    def noise(self, key: NoiseKey) -> dict:
        from dnq.quant import parse_bits, weight_error_moments

        (w, _), = parse_bits(key.bits)
        q = self._weight_quantized(key.bits, key.first_last_bits)
        mean, var = weight_error_moments(self.model, self._weight_bits(key.bits, key.first_last_bits))
        op = self.op()
        pred = predicted_loss_increase(op, var, mean=mean, num_matvecs=key.matvecs, seed=key.seed,
                                       progress=self.s.progress)
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

    def surface(self, key: SurfaceKey) -> dict:
        dirs = _dirs.random_directions(self.model, 2, "filter", seed=key.seed)
        s = surface_2d(self.model, self.loss_fn, self.hdata, dirs, span=(-key.span, key.span), steps=key.steps,
                       progress=self.s.progress)
        return s.to_dict()

    def slice(self, key: SliceKey) -> dict:
        d = _dirs.quantization_direction(self.model, self._weight_quantized(key.bits, key.first_last_bits))
        s = surface_1d(self.model, self.loss_fn, self.hdata, d, span=tuple(key.span), steps=key.steps,
                       progress=self.s.progress)
        out = s.to_dict()
        out["ptq_alpha"] = 1.0
        return out


def load_records(path: str | os.PathLike, include_other: bool = False) -> list[dict]:
    """The model records of a study directory, in the run order of its current configuration
    (models still being measured included). Records of runs the configuration no longer lists
    (left by an earlier version of the study) are kept on disk and returned only with
    ``include_other=True``."""
    path = Path(path)
    if not path.is_dir():
        raise StudyError(f"{path} is not a folder" + ("" if path.exists() else " (it does not exist)")
                         + "; give the folder of a study (the --out of `landscape study`)")
    if not (path / "study.json").is_file():
        raise StudyError(f"{path} holds no study.json; run `landscape study --out {path}` first")
    meta = read_study_json(path / "study.json")
    try:
        order = [r["id"] for r in StudyConfig.from_dict(meta["config"]).expand()]
    except StudyError as e:
        raise StudyError(f"{path / 'study.json'} holds an invalid configuration ({e}); restore the file, or run "
                         "the study again with a valid configuration") from None
    recs = {}
    for p in sorted((path / "models").glob("*.json")):
        fix = (f"run `landscape study --out {path}` again with the same configuration: it moves the file aside "
               "and measures that model again")
        rec = _read_json(p, "a model record", fix)
        why = _check_record(rec, p)
        if why is not None:
            raise StudyError(f"{p} is corrupt: not a model record ({why}); {fix}")
        recs[p.stem] = rec
    mine = [recs[k] for k in order if k in recs]
    return mine + [v for k, v in recs.items() if k not in order] if include_other else mine


def summary_rows(records: list[dict], bits: list[str] | None = None) -> list[dict]:
    """One flat row per model: the columns the regression and the report use.

    Columns: ``model``, ``config`` (the training configuration, shared by its seeds: the cluster
    of the report's bootstrap), ``method``, ``lambda_max``, ``sam_rho``, ``seed``, ``fp_val_acc``,
    ``fp_val_loss`` (validation split), ``fp_acc``, ``fp_loss`` (test split), the flatness
    measures, and per bit-width ``b`` and PTQ method (:func:`ptq_column`: no suffix for ``rtn``,
    ``_bn`` for ``rtn+bn``, ``_qdrop`` for ``qdrop``, ...) ``ptq_acc``, ``ptq_val_acc``, ``acc_drop`` (test), and
    ``ptq_loss_increase`` (test); ``trace_h_sigma_b``, ``predicted_b``, ``measured_b``.
    Missing measurements are ``None`` (a study still running).
    """
    rows = []
    for rec in records:
        m = rec.get("measurements", {})

        def val(name, *path):
            v = m.get(name, {}).get("value")  # noqa: B023 - val is only called within this iteration
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
            for variant in PTQ_METHODS:
                key = ptq_measurement(b, variant)
                if variant != "rtn" and key not in m:
                    continue  # a study without the method (or an older one)
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
