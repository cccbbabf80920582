"""Measurement keys: what each stored number depends on besides the trained model.

One frozen dataclass per kind of measurement (:class:`MeasurementKey` and its subclasses); its
fields are every input the measurement reads, and :meth:`MeasurementKey.digest` hashes them with
the model's training key, the measurement's name and the class name. A stored measurement is
reused only when its digest is the same, so a changed budget re-measures exactly what reads it.
:func:`measurement_keys` gives every key of a model of a study (the mixed-precision ones, which
depend on the measured sensitivity, are made where they are measured). The class names and
field names are part of the digest: renaming one re-measures every existing study folder
(:data:`WeightQuantizationLossKey` is another name bound to :class:`NoiseKey`, not a subclass).

Example:
    >>> key = TraceKey(samples=512, batch=256, seed=0, method="hutch++", matvecs=48)
    >>> key.digest("TRAINKEY", "trace") == TraceKey(512, 256, 0, "hutch++", 48).digest("TRAINKEY", "trace")
    True
    >>> key.digest("TRAINKEY", "trace") == key.digest("OTHER", "trace")
    False
    >>> frozen({"b": [1, 2], "a": 3})
    (('a', 3), ('b', (1, 2)))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import ClassVar

from dnq.convention import DEFAULT_CONVENTION
from dnq.recon import RECON_METHODS, default_iters

from ..records import ptq_measurement

__all__ = ["AccuracyKey", "BlockTraceKey", "CurvatureKey", "DensityKey", "EigenKey", "MeasurementKey", "MixedKey",
           "NoiseKey", "ReconPTQKey", "RoundingPTQKey", "SamplingKey", "SensitivityKey", "SliceKey", "SurfaceKey",
           "TraceKey", "WeightQuantizationLossKey", "frozen", "measurement_keys", "ptq_key", "sensitivity_range",
           "stable_hash"]


def stable_hash(obj) -> str:
    """The first 16 hex digits of the SHA-256 of ``obj`` as sorted JSON (a study's config hash,
    a model's training key, a measurement's digest)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def frozen(v):
    """``v`` with lists made tuples and dicts made sorted ``(key, value)`` tuples (hashable, and
    JSON-stable through :func:`dataclasses.asdict`)."""
    if isinstance(v, dict):
        return tuple((k, frozen(v[k])) for k in sorted(v))
    if isinstance(v, (list, tuple)):
        return tuple(frozen(x) for x in v)
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

    A field added to a key class after studies were stored with it is listed in
    :attr:`OMITTED_AT_DEFAULT` with the value every earlier measurement had: at that value it
    is left out of the digest, so the stored measurements keep their keys (the PTQ keys'
    ``convention``, issue 23), and any other value is hashed like every field.
    """

    #: fields left out of the digest at the value given here (see the class doc)
    OMITTED_AT_DEFAULT: ClassVar[dict] = {}

    def digest_fields(self) -> dict:
        """The fields the digest hashes: :func:`dataclasses.asdict` of the key without the
        :attr:`OMITTED_AT_DEFAULT` fields at their default (recursively, for a key inside a key)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in self.OMITTED_AT_DEFAULT and v == self.OMITTED_AT_DEFAULT[f.name]:
                continue
            if isinstance(v, MeasurementKey):
                out[f.name] = v.digest_fields()
            else:
                out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out

    def digest(self, train_key: str, name: str) -> str:
        """The stored key: a hash of ``train_key``, ``name``, the class name and every field
        (:meth:`digest_fields`)."""
        return stable_hash({"train": train_key, "name": name, "kind": type(self).__name__,
                            "fields": self.digest_fields()})


@dataclasses.dataclass(frozen=True)
class AccuracyKey(MeasurementKey):
    """``fp``: accuracy and loss of the float model on ``splits`` (the run's own validation and
    test splits; the model's training key fixes the data and the split)."""

    splits: tuple


@dataclasses.dataclass(frozen=True)
class RoundingPTQKey(MeasurementKey):
    """``ptq:<bits>`` / ``ptq+bn:<bits>`` (and the mixed-precision PTQ with ``rtn`` / ``rtn+bn``):
    :func:`dnq.quant.quantize` at ``bits`` with ``method``, ``calib_size`` calibration images drawn
    with ``seed``, ``first_last_bits``, the weight ``range`` method, for mixed precision the
    weight bits per layer (``bits_by_layer``, else None), and the quantization ``convention``
    (:mod:`dnq.convention`; left out of the digest at ``"dnq"``, the convention of every study
    stored before conventions had names)."""

    OMITTED_AT_DEFAULT: ClassVar[dict] = {"convention": DEFAULT_CONVENTION}

    bits: str
    method: str
    seed: int
    calib_size: int
    first_last_bits: int | None
    range: str
    bits_by_layer: tuple | None
    convention: str = DEFAULT_CONVENTION


@dataclasses.dataclass(frozen=True)
class ReconPTQKey(MeasurementKey):
    """``ptq+<method>:<bits>`` for a reconstruction method (:func:`dnq.recon.reconstruct`): the
    steps per block (resolved for the device), calibration size and batch, initial ranges, the
    seed of the calibration images and of the reconstruction, ``first_last_bits``, the weight
    bits per layer of mixed precision (else None), the quantization ``convention`` and the
    learning-rate rule ``lr_rule`` (None: the convention's own; :func:`dnq.ptq.apply_ptq`), both
    left out of the digest at their defaults (``"dnq"``, None)."""

    OMITTED_AT_DEFAULT: ClassVar[dict] = {"convention": DEFAULT_CONVENTION, "lr_rule": None}

    bits: str
    method: str
    seed: int
    calib_size: int
    batch_size: int
    iters: int
    first_last_bits: int | None
    range: str
    bits_by_layer: tuple | None
    convention: str = DEFAULT_CONVENTION
    lr_rule: str | None = None


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


#: The key of the weight-quantization loss measurement (``noise:<bits>``) under a name that says
#: what it measures. The same class: the digest holds the class name, ``"NoiseKey"``, as stored.
WeightQuantizationLossKey = NoiseKey


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


def ptq_key(cfg, bits: str, method: str, device, bits_by_layer: dict | None = None) -> RoundingPTQKey | ReconPTQKey:
    """The key of the study's PTQ (``cfg``: a :class:`landscape.study.StudyConfig`) at ``bits``
    with ``method`` on ``device`` (``recon_iters`` resolved for it), under the study's
    ``ptq.convention`` (and ``ptq.recon_lr_rule`` for a reconstruction), optionally with
    mixed-precision ``bits_by_layer``."""
    p, seed = cfg.ptq, cfg.instruments.seed
    per_layer = None if bits_by_layer is None else frozen(bits_by_layer)
    convention = p.get("convention", DEFAULT_CONVENTION)
    if method in RECON_METHODS:
        iters = default_iters(device) if p["recon_iters"] is None else p["recon_iters"]
        return ReconPTQKey(bits=bits, method=method, seed=seed, calib_size=p["recon_calib_size"],
                           batch_size=p["recon_batch_size"], iters=iters, first_last_bits=p["first_last_bits"],
                           range=p["recon_range"], bits_by_layer=per_layer, convention=convention,
                           lr_rule=p.get("recon_lr_rule"))
    return RoundingPTQKey(bits=bits, method=method, seed=seed, calib_size=p["calib_size"],
                          first_last_bits=p["first_last_bits"], range=p["range"], bits_by_layer=per_layer,
                          convention=convention)


def measurement_keys(cfg, device="cpu") -> dict[str, MeasurementKey]:
    """The key of every measurement of a model of ``cfg`` (a :class:`landscape.study.StudyConfig`)
    except the mixed-precision ones (whose keys depend on the sensitivity measured), by
    measurement name, in the order they are taken."""
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


def sensitivity_range(ptq: dict, method: str) -> str:
    """The weight range method a PTQ method starts from (``ptq``: the study's PTQ settings), and so
    the one its sensitivity is taken with."""
    return ptq["recon_range"] if method in RECON_METHODS else ptq["range"]
