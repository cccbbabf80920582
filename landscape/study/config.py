"""A study's configuration: :class:`StudyConfig` (what to train and measure), :class:`Instruments`
(the budgets of the measurements), and :func:`load_config` (a preset and/or a JSON or TOML file,
then overrides).

A configuration is checked section by section (:mod:`landscape.study.config_checks`) when it is
made; its :meth:`~StudyConfig.hash` (written into ``study.json``) and the run ids of
:meth:`~StudyConfig.expand` (the names of ``models/<run>.json`` and ``runs/<run>-<hash>/``) are
part of the on-disk format.

Example:
    >>> cfg = StudyConfig.from_dict({"name": "demo", "runs": [{"method": "dnq", "lambda_max": [0.5, 1.0]}],
    ...                              "seeds": [0, 1]})
    >>> [r["id"] for r in cfg.expand()]
    ['dnq-lam0.5-s0', 'dnq-lam0.5-s1', 'dnq-lam1-s0', 'dnq-lam1-s1']
    >>> bits = StudyConfig.from_dict({"name": "demo", "runs": [{"method": "dnq", "train_bits": ["W4A4", "W2A2"]}]})
    >>> [(r["id"], r["config"]) for r in bits.expand()]
    [('dnq-W4A4-s0', 'dnq-W4A4'), ('dnq-W2A2-s0', 'dnq-W2A2')]
    >>> try:
    ...     StudyConfig.from_dict({"name": "demo", "seeds": []})
    ... except StudyError as e:
    ...     print(e)
    seeds must be a non-empty list of integers, got []
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import tomllib
from pathlib import Path

from dnq.methods import NOISE_METHODS

from ..records import StudyError, first_line
from .config_checks import (
    check_bits,
    check_instruments,
    check_mixed,
    check_ptq,
    check_runs,
    check_setting,
    check_top_level,
    check_train,
    parse_instruments,
    parse_mixed,
    parse_ptq,
)
from .keys import stable_hash
from .presets import DEFAULT_PTQ, PRESETS, PTQ_KEYS_OMITTED_AT_DEFAULT

__all__ = ["Instruments", "StudyConfig", "StudyError", "load_config"]


@dataclasses.dataclass
class Instruments:
    """Budgets of the measurements. Each field is a field of the key
    (:class:`landscape.study.keys.MeasurementKey`) of every measurement that reads it, and only
    of those.

    ``replicates`` (default 1: none) > 1 adds the ``sampling`` measurement: the trace and the top
    eigenvalue again on that many disjoint subsets of ``hessian_samples`` training images (the
    first is the study's own curvature images), to show how much the curvature moves with the
    images it is taken on (:func:`dnq.data.training_subsets`,
    :func:`landscape.study.measure_sampling.spread`).
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
    sweeps it; an optional ``name`` labels the run in the report; an optional ``train_bits`` (a
    bit-width, or a list that sweeps) is the target the run's models are trained for, instead of
    the study's ``train_bits``. Every run is trained with each of ``seeds``. ``ptq["variants"]``
    lists the PTQ methods (the key keeps the name it has in users' files and in the config hash;
    ``methods`` is accepted as its alias); ``ptq["convention"]`` is the quantization convention
    (:mod:`dnq.convention`) and ``ptq["recon_lr_rule"]`` the reconstruction's learning-rate rule."""

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
    def from_dict(cls, d: dict) -> StudyConfig:
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
        inst = parse_instruments(d.pop("instruments", None), {f.name for f in dataclasses.fields(Instruments)})
        ptq = parse_ptq(d.pop("ptq", None))
        mixed = parse_mixed(d.pop("mixed", None))
        cfg = cls(**d, instruments=Instruments(**inst), ptq={**DEFAULT_PTQ, **ptq}, mixed=mixed)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every key's type and range (:meth:`from_dict` calls it), section by section
        (:mod:`landscape.study.config_checks`).

        Raises:
            StudyError: naming the key, what it must be, and what it is.
        """
        check_top_level(self)
        check_runs(self.runs)
        check_train(self.train)
        check_bits(self.seeds, self.bits, self.train_bits)
        check_ptq(self.ptq)
        if self.mixed is not None:
            check_mixed(self.mixed)
            if self.ptq["convention"] != "dnq":
                raise StudyError(f"mixed precision is defined under the dnq convention only, and ptq.convention is "
                                 f"{self.ptq['convention']!r}; set mixed to null (--set mixed=null) or "
                                 "ptq.convention to \"dnq\"")
        check_instruments(self.instruments)
        for r in self.expand():  # every model's settings, sweeps expanded (duplicates refused there)
            for key, value in r["settings"].items():
                check_setting(key, value, f"run {r['name']!r}")

    def hash(self) -> str:
        """The hash of the configuration (``study.json``, the report's header); the ``ptq`` keys
        added after studies were stored (:data:`~landscape.study.presets.PTQ_KEYS_OMITTED_AT_DEFAULT`:
        the quantization convention and the learning-rate rule) count only away from their default,
        so an earlier study keeps its hash."""
        d = self.to_dict()
        d["ptq"] = {k: v for k, v in d["ptq"].items()
                    if not (k in PTQ_KEYS_OMITTED_AT_DEFAULT and v == PTQ_KEYS_OMITTED_AT_DEFAULT[k])}
        return stable_hash(d)

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
    parts = [s["method"]]
    if s["method"] in NOISE_METHODS and "lambda_max" in s:
        parts.append(f"lam{_fmt(s['lambda_max'])}")
    if s["method"] == "sam" and "sam_rho" in s:
        parts.append(f"rho{_fmt(s['sam_rho'])}")
    if "train_bits" in s:  # the run's own target bit-width (a run key, not a training field)
        parts.append(str(s["train_bits"]))
    for k in sorted(s):
        if k not in ("method", "lambda_max", "sam_rho", "seed", "train_bits"):
            parts.append(f"{k}{_fmt(s[k])}")
    if seed:
        parts.append(f"s{s['seed']}")
    return _safe("-".join(parts))


def _safe(text: str) -> str:
    """A file-name-safe id (the label itself is kept, escaped, in the report)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)).strip(".")
    return out[:120] or "run"


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
            raise StudyError(f"cannot parse {path} as {kind}: {first_line(e)}") from None
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


