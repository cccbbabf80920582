"""Taking a trained model's measurements: :data:`MEASUREMENTS`, the one table from key class to
measurement function, and :class:`Measure`, which takes each measurement of a model unless it
is recorded with the same key, records it at once, and runs the mixed-precision loop.

Example:
    >>> from landscape.study.keys import measurement_keys
    >>> from landscape.study.config import load_config
    >>> keys = measurement_keys(load_config("digits"))
    >>> sorted({MEASUREMENTS[type(k)].__name__ for k in keys.values()})  # doctest: +NORMALIZE_WHITESPACE
    ['blocks', 'density', 'eigen', 'fp', 'loss_slice', 'ptq', 'surface', 'trace', 'weight_quantization_loss']
"""

from __future__ import annotations

import time

import torch.nn as nn

from dnq.data import training_batches
from dnq.mixed import allocations, shared_input_groups
from dnq_landscape_common.errors import NonFiniteError
from dnq_landscape_common.precision import full_precision

from ..records import StudyError, first_line, mixed_measurement, uniform_measurement
from . import measure_curvature, measure_quant, measure_sampling, measure_surfaces
from .context import MeasureContext
from .keys import (
    AccuracyKey,
    BlockTraceKey,
    DensityKey,
    EigenKey,
    MeasurementKey,
    MixedKey,
    NoiseKey,
    ReconPTQKey,
    RoundingPTQKey,
    SamplingKey,
    SensitivityKey,
    SliceKey,
    SurfaceKey,
    TraceKey,
    frozen,
    measurement_keys,
    ptq_key,
    sensitivity_range,
)

__all__ = ["MEASUREMENTS", "Measure"]

#: the function that takes each kind of measurement, ``f(ctx, key) -> value`` (the
#: mixed-precision allocations, which also need the allocation, are taken by :meth:`Measure.mixed_all`)
MEASUREMENTS = {
    AccuracyKey: measure_quant.fp, RoundingPTQKey: measure_quant.ptq, ReconPTQKey: measure_quant.ptq,
    SensitivityKey: measure_quant.sensitivity,
    TraceKey: measure_curvature.trace, EigenKey: measure_curvature.eigen, DensityKey: measure_curvature.density,
    BlockTraceKey: measure_curvature.blocks, NoiseKey: measure_curvature.weight_quantization_loss,
    SamplingKey: measure_sampling.sampling,
    SurfaceKey: measure_surfaces.surface, SliceKey: measure_surfaces.loss_slice,
}


class Measure:
    """The measurements of one trained model (each skipped when its key is already recorded).

    Every measurement function takes its key (:class:`~landscape.study.keys.MeasurementKey`) and
    reads its settings from it, so what a stored number depends on and what its key holds are the
    same thing.

    Args:
        study: the :class:`landscape.study.Study` (its configuration, device, ranks, records).
        rec: the model's record (its ``measurements`` are updated and saved as they are taken).
        model: the trained model.
        meta: the model's training metadata (its dataset and validation split).
    """

    def __init__(self, study, rec: dict, model: nn.Module, meta: dict):
        self.s, self.rec, self.model = study, rec, model
        self.inst = study.cfg.instruments
        self.ds = study.dataset(meta)
        hdata = training_batches(self.ds, self.inst.hessian_samples, self.inst.seed, self.inst.hessian_batch)
        self.ctx = MeasureContext(model, self.ds, hdata, progress=study.progress, rank=study.rank, world=study.world,
                                  recorded=rec["measurements"], train_key=rec["train_key"])

    def measure(self, key: MeasurementKey):
        """The value of the measurement of ``key`` (taken now, not recorded: see :meth:`_do`)."""
        return MEASUREMENTS[type(key)](self.ctx, key)

    def _do(self, name: str, key: MeasurementKey, fn) -> None:
        """Take measurement ``name`` as ``fn()`` unless it is recorded with the same ``key``.

        Raises:
            TypeError: ``key`` is not a :class:`MeasurementKey` (a hand-written dict can forget an
                input; write a key class instead).
            StudyError: a NaN or Inf met while measuring (naming the model and the measurement).
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
            raise StudyError(f"model {rid}, measurement {name!r}: {first_line(e)}. The measurements finished so far "
                             f"are kept in models/{rid}.json; train that model again (delete "
                             f"{self.rec.get('run_dir', 'its run folder')}) or remove its run from the study") from None
        self.rec["measurements"][name] = {"key": digest, "value": value, "time_s": time.perf_counter() - t0,
                                          "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.s._save(self.rec)

    def all(self) -> None:
        """Every measurement of :func:`~landscape.study.keys.measurement_keys`, then the mixed
        precision (:meth:`mixed_all`) when the study has it."""
        for name, key in measurement_keys(self.s.cfg, self.s.device).items():
            self._do(name, key, lambda key=key: self.measure(key))
        if self.s.cfg.mixed is not None:
            self.mixed_all()

    def mixed_all(self) -> None:
        """The sensitivity of each range method the mixed PTQ methods need, the uniform line, and
        every (method, budget, objective) allocation (:func:`dnq.mixed.allocations`) with its accuracy."""
        m = self.s.cfg.mixed
        tied = shared_input_groups(self.model, self.ctx.hdata[0][0][:2]) if m["tie_shared_inputs"] else None
        for method in m["methods"]:
            sens = self._sensitivity(method)
            self._uniform(method)
            budgets = [(m["kind"], b) for b in m["budgets"]]
            for kind, budget, objective, alloc in allocations(
                    sens["value"], budgets, m["objectives"], first_last_bits=self.s.cfg.ptq["first_last_bits"],
                    abits=m["abits"], tied=tied):
                key = MixedKey(ptq=ptq_key(self.s.cfg, f"W{max(m['bits'])}A{m['abits']}", method, self.s.device,
                                           bits_by_layer=alloc.bits),
                               sensitivity=sens["key"], budget=float(budget), kind=kind, objective=objective,
                               tied=frozen(tied or []))
                self._do(mixed_measurement(method, budget, objective, kind), key,
                         lambda key=key, alloc=alloc: measure_quant.mixed(self.ctx, key, alloc))

    def _sensitivity(self, method: str) -> dict:
        """The recorded sensitivity (measured now unless recorded) of the range ``method`` starts from."""
        m, i = self.s.cfg.mixed, self.inst
        rng = sensitivity_range(self.s.cfg.ptq, method)
        name = f"sensitivity:{rng}"
        key = SensitivityKey(samples=i.hessian_samples, batch=i.hessian_batch, seed=i.seed, bits=tuple(m["bits"]),
                             matvecs=m["matvecs"], range=rng)
        self._do(name, key, lambda: self.measure(key))
        return self.rec["measurements"][name]

    def _uniform(self, method: str) -> None:
        """The uniform line of ``method`` where the study's own PTQ results lack it."""
        m, cfg = self.s.cfg.mixed, self.s.cfg
        for b in m["uniform_bits"]:
            bits = f"W{b}A{m['abits']}"
            name = uniform_measurement(cfg.bits, cfg.ptq["variants"], method, bits)
            if name.startswith("mixed+"):
                key = ptq_key(cfg, bits, method, self.s.device)
                self._do(name, key, lambda key=key: self.measure(key))
