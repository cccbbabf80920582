"""The checks of a study configuration, one function per section: the names and types of the
top-level keys, ``runs``, ``train``, ``seeds`` and ``bits``, ``ptq``, ``mixed`` and
``instruments``; and the parsing of the sections a file may write in a short form (``ptq`` as a
list of methods, ``slice_span`` as a list, ``mixed`` as a partial mapping).

:meth:`landscape.study.StudyConfig.validate` calls them in this order; each raises
:class:`~landscape.records.StudyError` naming the key, what it must be and what it is.

Example:
    >>> parse_ptq(["rtn", "qdrop"])
    {'variants': ['rtn', 'qdrop']}
    >>> try:
    ...     check_mixed({"budgets": [2.5], "objectives": ["hawq"], "methods": ["rtn"], "abits": 4, "bits": [9],
    ...                  "uniform_bits": [2], "matvecs": 8, "kind": "avg-bits", "tie_shared_inputs": False})
    ... except StudyError as e:
    ...     print(e)
    mixed.bits must be a non-empty list of distinct integers in 2..8, got [9]
"""

from __future__ import annotations

import dataclasses
import math
import typing

from dnq.convention import CONVENTIONS, check_convention
from dnq.mixed import BUDGET_KINDS, OBJECTIVES
from dnq.quant import MAX_BITS, MIN_BITS, RANGE_METHODS, parse_bits
from dnq.recon import PTQ_METHODS
from dnq.train import TrainConfig

from ..records import StudyError
from .presets import DEFAULT_MIXED, DEFAULT_PTQ

__all__ = ["LR_RULES", "RUN_KEYS", "check_bits", "check_instruments", "check_mixed", "check_ptq", "check_runs",
           "check_setting", "check_top_level", "check_train", "parse_instruments", "parse_mixed", "parse_ptq"]

#: the fields of a training configuration (a run's or ``train``'s settings)
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
#: the keys a run may hold besides the training fields: a label, and the bit-width the run's model is trained for
#: (``train_bits``, a bit-width or a list of them that sweeps; default the study's ``train_bits``)
RUN_KEYS = frozenset({"name", "train_bits"})
#: the reconstruction's learning-rate rules (``ptq.recon_lr_rule``; null: the convention's own)
LR_RULES = ("paper", "scaled")
#: the allowed types of every :class:`dnq.train.TrainConfig` field
SETTING_TYPES = {k: typing.get_args(v) or (v,) for k, v in typing.get_type_hints(TrainConfig).items()}
_TYPE_NAMES = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- parsing ---------------------------------------------------------------------------------------
def parse_instruments(inst, known: set) -> dict:
    """The ``instruments`` mapping (None: every default) with ``slice_span`` as a tuple; ``known``
    are the field names of :class:`landscape.study.Instruments`."""
    inst = {} if inst is None else inst
    if not isinstance(inst, dict):
        raise StudyError(f"instruments must be a mapping of budgets (e.g. {{\"trace_matvecs\": 48}}), got {inst!r}")
    inst = dict(inst)
    bad = sorted(set(inst) - known)
    if bad:
        raise StudyError(f"unknown instrument keys {bad}; valid: {sorted(known)}")
    if "slice_span" in inst:
        span = inst["slice_span"]
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            raise StudyError(f"instruments.slice_span must be a pair [low, high], got {span!r}")
        inst["slice_span"] = tuple(span)
    return inst


def parse_ptq(ptq) -> dict:
    """The ``ptq`` section as a mapping (None: every default; a list: the PTQ methods; the key
    ``methods`` is an alias of the on-disk key ``variants``), before the defaults are added."""
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
    return ptq


def parse_mixed(mixed) -> dict | None:
    """The ``mixed`` section with its defaults (:data:`DEFAULT_MIXED`), or None (no mixed precision)."""
    if mixed is None:
        return None
    if not isinstance(mixed, dict):
        raise StudyError(f"mixed must be a mapping such as {{\"budgets\": [2.5, 3.0]}} or null, got {mixed!r}")
    unknown = sorted(set(mixed) - set(DEFAULT_MIXED))
    if unknown:
        raise StudyError(f"mixed: unknown keys {unknown}; valid: {sorted(DEFAULT_MIXED)}")
    return {**DEFAULT_MIXED, **mixed}


# -- checks ----------------------------------------------------------------------------------------
def check_setting(key: str, value, where: str) -> None:
    """A training setting of the type its :class:`dnq.train.TrainConfig` field declares."""
    allowed = SETTING_TYPES.get(key)
    if allowed is None:
        return
    ok = ((value is None and type(None) in allowed) or (isinstance(value, bool) and bool in allowed)
          or (_is_int(value) and (int in allowed or float in allowed))
          or (isinstance(value, float) and float in allowed) or (isinstance(value, str) and str in allowed))
    if isinstance(value, float) and ok and not math.isfinite(value):
        raise StudyError(f"{where}: {key} must be a finite number, got {value!r}")
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in allowed)
        raise StudyError(f"{where}: {key} must be {want}, got {value!r}")


def check_top_level(cfg) -> None:
    """``name``, ``data``, ``model``, ``train_bits``, ``data_root``, and the types of ``runs`` and
    ``train`` (``cfg``: a :class:`landscape.study.StudyConfig`)."""
    if not isinstance(cfg.name, str) or not cfg.name.strip():
        raise StudyError(f"name must be a non-empty string, got {cfg.name!r}")
    if isinstance(cfg.model, list):
        raise StudyError(f"the study lists several models {cfg.model}; run one study per model with "
                         "--set model=NAME (or a config file with 'model')")
    for key in ("data", "model", "train_bits"):
        if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
            raise StudyError(f"{key} must be a non-empty string, got {getattr(cfg, key)!r}")
    if cfg.data_root is not None and not isinstance(cfg.data_root, str):
        raise StudyError(f"data_root must be a path (a string) or null, got {cfg.data_root!r}")
    if not isinstance(cfg.runs, list) or not all(isinstance(r, dict) for r in cfg.runs):
        raise StudyError(f"runs must be a list of mappings such as {{\"method\": \"sgd\"}}, got {cfg.runs!r}")
    if not isinstance(cfg.train, dict):
        raise StudyError(f"train must be a mapping of training settings (e.g. {{\"epochs\": 2}}), got "
                         f"{cfg.train!r}")


def check_runs(runs: list) -> None:
    """Each run specification: a ``method``, known training settings, no ``seed`` or ``out``, no
    empty sweep, a string ``name``."""
    if not runs:
        raise StudyError("the study has no runs; give at least one {'method': ...}")
    for i, r in enumerate(runs):
        if "method" not in r:
            raise StudyError(f"run {i} has no 'method' (one of sgd, dnq, dnq-w, dnq-a, gaussian, sam)")
        bad = sorted(set(r) - TRAIN_FIELDS - RUN_KEYS)
        if bad:
            raise StudyError(f"run {i}: unknown training settings {bad}")
        _check_run_bits(i, r)
        if "seed" in r or "out" in r:
            raise StudyError(f"run {i}: {'seed' if 'seed' in r else 'out'} has no effect in a run (the study's "
                             "seeds and folder set it); remove it")
        empty = sorted(k for k, v in r.items() if isinstance(v, list) and not v)
        if empty:
            raise StudyError(f"run {i}: {empty} sweep an empty list; give at least one value")
        if not isinstance(r.get("name", ""), (str, int, float)):
            raise StudyError(f"run {i}: name must be a string, got {r['name']!r}")


def _check_run_bits(i: int, r: dict) -> None:
    """A run's ``train_bits``: one bit-width (or a list) of one weight and one activation width, and
    not together with ``wbits`` / ``abits``, which it sets."""
    if "train_bits" not in r:
        return
    both = sorted({"wbits", "abits"} & set(r))
    if both:
        raise StudyError(f"run {i}: train_bits sets the target bits; remove {both} from the run (or train_bits)")
    values = r["train_bits"] if isinstance(r["train_bits"], list) else [r["train_bits"]]
    for v in values:
        try:
            ok = isinstance(v, str) and len(parse_bits(v)) == 1
        except ValueError:
            ok = False
        if not ok:
            raise StudyError(f"run {i}: train_bits must be a bit-width such as \"W4A4\" or a list of them (one "
                             f"model per bit-width), got {v!r}")


def check_train(train: dict) -> None:
    """The ``train`` settings every run shares: known, not set by the study, of the right type."""
    bad = sorted(set(train) - TRAIN_FIELDS)
    if bad:
        raise StudyError(f"train: unknown training settings {bad}")
    overridden = {"method": "every run sets its own method (in runs)", "seed": "the study's seeds set it",
                  "out": "the study puts each run in out/runs/"}
    for key in sorted(set(train) & set(overridden)):
        raise StudyError(f"train.{key} has no effect: {overridden[key]}; remove it")
    for key, value in train.items():
        check_setting(key, value, "train")


def check_bits(seeds, bits, train_bits: str) -> None:
    """``seeds`` (integers), ``bits`` (distinct bit-widths) and ``train_bits``."""
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise StudyError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if not isinstance(bits, list) or not bits or not all(isinstance(b, str) for b in bits):
        raise StudyError(f"bits must be a non-empty list of bit-widths such as [\"W4A4\", \"W3A3\"], got {bits!r}")
    try:
        for b in [*bits, train_bits]:
            parse_bits(b)
    except ValueError as e:
        raise StudyError(f"bad bit-width: {e}") from None
    if len(set(bits)) != len(bits):
        raise StudyError(f"bits lists a bit-width twice: {bits}")


def _check_ptq_methods(ptq: dict) -> None:
    """``ptq.variants`` (the on-disk key of the PTQ methods): a non-empty list of distinct methods."""
    methods = ptq.get("variants")
    bad = [m for m in methods if m not in PTQ_METHODS] if isinstance(methods, list) else [methods]
    if bad or not methods:
        raise StudyError(f"ptq.variants must be a non-empty list of PTQ methods ({', '.join(PTQ_METHODS)}), "
                         f"got {ptq.get('variants')!r}")
    if len(set(methods)) != len(methods):
        raise StudyError(f"ptq.variants lists a method twice: {methods}")


def _check_recon(ptq: dict) -> None:
    """The reconstruction settings of ``ptq``: steps per block, calibration size and batch, range."""
    ri = ptq["recon_iters"]
    if ri is not None and not (_is_int(ri) and ri >= 1):
        raise StudyError(f"ptq.recon_iters must be an integer >= 1 (steps per block) or null (20000 on a GPU, "
                         f"500 on a CPU), got {ri!r}")
    for k in ("recon_calib_size", "recon_batch_size"):
        if not _is_int(ptq[k]) or ptq[k] < 1:
            raise StudyError(f"ptq.{k} must be an integer >= 1, got {ptq[k]!r}")
    if ptq["recon_range"] not in RANGE_METHODS:
        raise StudyError(f"ptq.recon_range must be one of {', '.join(RANGE_METHODS)}, got {ptq['recon_range']!r}")


def _check_convention(ptq: dict) -> None:
    """``ptq.convention`` (:data:`dnq.convention.CONVENTIONS`) and ``ptq.recon_lr_rule``."""
    try:
        check_convention(ptq["convention"])
    except ValueError:
        raise StudyError(f"ptq.convention must be one of {', '.join(CONVENTIONS)} (dnq: this toolkit's own; paper: "
                         f"the BRECQ / QDrop reference code's), got {ptq['convention']!r}") from None
    rule = ptq["recon_lr_rule"]
    if rule is not None and rule not in LR_RULES:
        raise StudyError(f"ptq.recon_lr_rule must be null (the convention's own), {' or '.join(map(repr, LR_RULES))} "
                         f"(the papers' fixed learning rates, or scaled by 20000 / recon_iters), got {rule!r}")


def check_ptq(ptq: dict) -> None:
    """The ``ptq`` section (with its defaults): known keys, the methods, the reconstruction
    settings, the quantization convention and learning-rate rule, the fixed quantizer,
    ``first_last_bits`` and ``calib_size``."""
    unknown = sorted(set(ptq) - set(DEFAULT_PTQ))
    if unknown:
        raise StudyError(f"ptq: unknown keys {unknown}; valid: {sorted(DEFAULT_PTQ)}")
    _check_ptq_methods(ptq)
    _check_recon(ptq)
    _check_convention(ptq)
    fixed = {k: DEFAULT_PTQ[k] for k in ("weight_mode", "weight_granularity", "act", "range", "calib_split",
                                         "fold_bn")}
    changed = {k: ptq[k] for k in fixed if k in ptq and ptq[k] != fixed[k]}
    if changed:
        raise StudyError(f"ptq: {changed} cannot be changed in a study (it is the simple PTQ of the toolkit: "
                         f"{fixed}); use `dnq ptq` for other quantizers")
    flb = ptq["first_last_bits"]
    if flb is not None and not (_is_int(flb) and MIN_BITS <= flb <= MAX_BITS):
        raise StudyError(f"ptq.first_last_bits must be an integer in {MIN_BITS}..{MAX_BITS} or null, got {flb!r}")
    if not _is_int(ptq["calib_size"]) or ptq["calib_size"] < 1:
        raise StudyError(f"ptq.calib_size must be an integer >= 1, got {ptq['calib_size']!r}")


def _check_bit_list(m: dict, key: str) -> None:
    v = m[key]
    if not isinstance(v, list) or not v or not all(_is_int(b) and MIN_BITS <= b <= MAX_BITS for b in v) \
            or len(set(v)) != len(v):
        raise StudyError(f"mixed.{key} must be a non-empty list of distinct integers in {MIN_BITS}..{MAX_BITS}, "
                         f"got {v!r}")


def _check_budgets(m: dict) -> None:
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


def check_mixed(m: dict) -> None:
    """The ``mixed`` section (with its defaults)."""
    _check_bit_list(m, "bits")
    _check_bit_list(m, "uniform_bits")
    _check_budgets(m)
    o = m["objectives"]
    if not isinstance(o, list) or not o or any(x not in OBJECTIVES for x in o):
        raise StudyError(f"mixed.objectives must be a non-empty list of {', '.join(OBJECTIVES)}, got {o!r}")
    methods = m["methods"]
    if not isinstance(methods, list) or not methods or any(x not in PTQ_METHODS for x in methods):
        raise StudyError(f"mixed.methods must be a non-empty list of PTQ methods ({', '.join(PTQ_METHODS)}), "
                         f"got {methods!r}")
    if not (_is_int(m["abits"]) and MIN_BITS <= m["abits"] <= MAX_BITS):
        raise StudyError(f"mixed.abits must be an integer in {MIN_BITS}..{MAX_BITS}, got {m['abits']!r}")
    if not _is_int(m["matvecs"]) or m["matvecs"] < 2:
        raise StudyError(f"mixed.matvecs must be an integer >= 2, got {m['matvecs']!r}")
    if not isinstance(m["tie_shared_inputs"], bool):
        raise StudyError(f"mixed.tie_shared_inputs must be true or false, got {m['tie_shared_inputs']!r}")


def check_instruments(i) -> None:
    """The budgets of the instruments (``i``: a :class:`landscape.study.Instruments`)."""
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
