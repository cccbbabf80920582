"""A study: train (or reuse) a set of models, quantize each, measure its flatness, and keep
everything in one directory, so that :mod:`landscape.regress` and :mod:`landscape.report` can
tie flatness to PTQ accuracy.

A study is a declarative configuration (:class:`StudyConfig`): the data, the architecture, a
list of run specifications (method and noise strength ``lambda_max`` or SAM radius ``sam_rho``;
a list of values sweeps them), seeds, the PTQ bit-widths, and the budgets of the instruments.
Presets: ``digits`` (the default, sized for a 2-core CPU), ``cifar10-subset`` (resnet20 on the
CIFAR-10 subset in an ``.npz`` file: sgd, dnq, gaussian and sam, 2 seeds, PTQ rtn, rtn+bn and qdrop
at 500 steps per block), ``cifar100`` (the DNQ paper's setting for a GPU: 120 epochs, W4A4 /
W2A4 / W2A2, every PTQ method at the papers' 20,000 steps) and ``paper`` (the seed's table:
resnet18 on CIFAR-100, sgd and dnq trained for each bit-width, 3 seeds, PTQ under the papers'
quantization convention, ``ptq.convention = "paper"``); their measured wall times are in
BENCHMARKS.md, and :func:`~landscape.study.plan.make_plan` (``landscape study --plan``) estimates
a study's before it runs. Custom studies come from a JSON or TOML file with the same keys.

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
  ``rtn`` / ``rtn+bn`` (:func:`dnq.ptq.apply_ptq`, that is :func:`dnq.quant.quantize`, min-max,
  BatchNorm folded, first/last layer at 8 bits, 256 calibration images from the training split;
  ``rtn+bn`` re-estimates the BatchNorm statistics on them through the quantized model before
  folding) and ``adaround`` / ``brecq`` / ``qdrop`` (:func:`dnq.recon.reconstruct`: MSE initial
  ranges, 1,024 calibration images from the training split, ``recon_iters`` steps per block);
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
  subset's value, estimator error and engines, and their spread
  (:func:`landscape.study.measure_sampling.sampling`; the report's sampling-error section).
* with ``mixed`` (:data:`DEFAULT_MIXED`): ``sensitivity:<range>``, every layer's ``predicted``,
  ``hawq`` and ``measured`` sensitivity at the candidate bits (:mod:`landscape.sensitivity_run`);
  ``mixed+<method>:W<b>A<a>``, the uniform line where the study's own PTQ results lack it; and
  ``mixed+<method>:avg-bits=<budget>:<objective>``, the accuracy with the bits
  :func:`dnq.mixed.plan` chose (the allocation recorded with it).

Every measurement runs in full float32 precision (:func:`dnq_landscape_common.precision.full_precision`:
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
the study with the model named (any :class:`dnq_landscape_common.errors.NonFiniteError`); what
was measured before stays recorded.

The package, by job (each module imports only those above it in this list, and
:mod:`landscape.records`, the on-disk format, imports nothing of it):

* :mod:`~landscape.study.presets`: :data:`PRESETS`, :data:`DEFAULT_PTQ`, :data:`DEFAULT_MIXED`;
* :mod:`~landscape.study.keys`: :class:`MeasurementKey` and its subclasses, :func:`measurement_keys`;
* :mod:`~landscape.study.config_checks`, :mod:`~landscape.study.config`: :class:`StudyConfig`,
  :class:`Instruments`, :func:`load_config` (checked section by section);
* :mod:`~landscape.study.summary`: :func:`summary_rows`;
* :mod:`~landscape.study.context`: :class:`~landscape.study.context.MeasureContext`, what every
  measurement reads;
* :mod:`~landscape.study.measure_quant` (``fp``, ``ptq``, ``sensitivity``, ``mixed``),
  :mod:`~landscape.study.measure_curvature` (``trace``, ``eigen``, ``density``, ``blocks``,
  ``noise``), :mod:`~landscape.study.measure_surfaces` (``surface``, ``slice``),
  :mod:`~landscape.study.measure_sampling` (``sampling``, :func:`spread`): one function per
  measurement, ``f(ctx, key)``;
* :mod:`~landscape.study.measure`: :data:`~landscape.study.measure.MEASUREMENTS` (key class to
  function) and :class:`Measure` (skip what is recorded, record the rest at once, the
  mixed-precision loop);
* :mod:`~landscape.study.runner`: :class:`Study` (checks, lock, training, records) and
  :func:`load_records`;
* :mod:`~landscape.study.plan_timing`, :mod:`~landscape.study.plan`: the plan of a study (unit costs
  timed on synthetic data of the dataset's shape, times the study's counts; nothing trained or
  written), :func:`make_plan`, :func:`format_plan`.

This module only re-exports their names (``from landscape.study import X`` works for all of them).

Example:
    >>> cfg = load_config("digits", seeds=[0])
    >>> [r["id"] for r in cfg.expand()][:3]
    ['sgd-s0', 'dnq-lam0.5-s0', 'dnq-lam1-s0']
    >>> list(measurement_keys(cfg))[:4]
    ['fp', 'ptq:W4A4', 'ptq:W3A3', 'ptq:W2A4']
"""

from dnq.data import training_batches, training_subsets
from dnq_landscape_common.device import check_device

from ..records import (
    STUDY_VERSION,
    StudyError,
    check_record,
    first_line,
    method_suffix,
    mixed_measurement,
    ptq_column,
    ptq_measurement,
    read_json,
    read_record,
    read_study_json,
    uniform_measurement,
)
from . import config, config_checks, keys
from .config import Instruments, StudyConfig, load_config
from .config_checks import check_setting
from .context import MeasureContext
from .keys import (
    AccuracyKey,
    BlockTraceKey,
    CurvatureKey,
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
    WeightQuantizationLossKey,
    measurement_keys,
    ptq_key,
    sensitivity_range,
)
from .measure import MEASUREMENTS, Measure
from .measure_sampling import spread
from .plan import Plan, format_plan, make_plan
from .presets import DEFAULT_MIXED, DEFAULT_PTQ, PRESETS
from .runner import Study, load_records
from .summary import METHOD_SUFFIX, VARIANT_SUFFIX, summary_rows

# private names of the single module this package was, kept so that old imports keep working
_first_line, _read_json, _check_record, _check_setting = first_line, read_json, check_record, check_setting
_fmt, _merge, _relative_to = config._fmt, config._merge, config._relative_to
_run_id, _safe = config._run_id, config._safe
_is_int, _is_number = config_checks._is_int, config_checks._is_number
_frozen, _hash = keys.frozen, keys.stable_hash

__all__ = [
    "DEFAULT_MIXED", "DEFAULT_PTQ", "MEASUREMENTS", "METHOD_SUFFIX", "PRESETS", "STUDY_VERSION", "VARIANT_SUFFIX",
    "AccuracyKey", "BlockTraceKey", "CurvatureKey", "DensityKey", "EigenKey", "Instruments", "Measure",
    "MeasureContext", "MeasurementKey", "MixedKey", "NoiseKey", "Plan", "ReconPTQKey", "RoundingPTQKey",
    "SamplingKey", "SensitivityKey", "SliceKey", "Study", "StudyConfig", "StudyError", "SurfaceKey", "TraceKey",
    "WeightQuantizationLossKey", "check_device", "check_record", "format_plan", "load_config", "load_records",
    "make_plan", "measurement_keys", "method_suffix", "mixed_measurement", "ptq_column", "ptq_key",
    "ptq_measurement", "read_record", "read_study_json", "sensitivity_range", "spread", "summary_rows",
    "training_batches", "training_subsets", "uniform_measurement",
]
