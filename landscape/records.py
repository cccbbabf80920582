"""The on-disk record format of a study (``landscape study``): its version, the names of its
measurements and summary columns, and the readers of ``study.json`` and ``models/<run>.json``.

This module imports only the standard library and the leaf layer, so that the figures
(:mod:`landscape.plot`), the report and any script can read a study folder without the trainer
(:mod:`dnq`) or the study's runner (:mod:`landscape.study`), which writes what is read here.

A study folder::

    study.json                 {"version": STUDY_VERSION, "config": {...}, "hash": ..., "splits": {...}}
    models/<run>.json          {"id": <run>, "settings": {...}, "measurements": {<name>: {"key", "value", ...}}}

Measurement names: ``ptq:<bits>`` (rtn), ``ptq+bn:<bits>`` (rtn+bn), ``ptq+<method>:<bits>``
(:func:`ptq_measurement`); ``mixed+<method>:<kind>=<budget>:<objective>``
(:func:`mixed_measurement`); summary columns ``<stem>_<bits><suffix>`` (:func:`ptq_column`,
:func:`method_suffix`).

Example:
    >>> ptq_measurement("W4A4", "rtn+bn"), ptq_column("ptq_acc", "W4A4", "qdrop")
    ('ptq+bn:W4A4', 'ptq_acc_W4A4_qdrop')
    >>> mixed_measurement("rtn+bn", 2.5, "hawq")
    'mixed+rtn+bn:avg-bits=2.5:hawq'
    >>> check_record({"id": "sgd-s0", "settings": {}, "measurements": {"fp": {}}}, "models/sgd-s0.json")
    "measurements ['fp'] hold no value"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dnq_landscape_common.cli import first_line  # how the study quotes an error inside its own message

__all__ = ["STUDY_VERSION", "StudyError", "check_record", "first_line", "method_suffix", "mixed_measurement",
           "ptq_column", "ptq_measurement", "read_json", "read_record", "read_study_json", "uniform_measurement"]

STUDY_VERSION = 3  # 3: measurement keys are MeasurementKey classes (records of 2 are measured again)


class StudyError(ValueError):
    """A bad study configuration or output directory (the message names the fix)."""


# -- names -----------------------------------------------------------------------------------------
def method_suffix(method: str) -> str:
    """The summary-column suffix of a PTQ method: ``""`` for ``rtn``, ``"_bn"`` for ``rtn+bn``,
    ``"_<method>"`` for any other (``"_qdrop"``)."""
    return {"rtn": "", "rtn+bn": "_bn"}.get(method, f"_{method}")


def ptq_column(stem: str, bits: str, method: str = "rtn") -> str:
    """The summary column of a PTQ quantity: ``ptq_acc_W4A4`` (``rtn``), ``ptq_acc_W4A4_bn`` (``rtn+bn``),
    ``ptq_acc_W4A4_qdrop`` (``qdrop``)."""
    return f"{stem}_{bits}{method_suffix(method)}"


def ptq_measurement(bits: str, method: str = "rtn") -> str:
    """The measurement name of a PTQ result: ``ptq:W4A4`` (``rtn``), ``ptq+bn:W4A4``, ``ptq+qdrop:W4A4``."""
    return f"ptq:{bits}" if method == "rtn" else f"ptq+{'bn' if method == 'rtn+bn' else method}:{bits}"


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


# -- reading -----------------------------------------------------------------------------------------
def read_json(path: Path, what: str, fix: str):
    """The JSON in ``path``, or :class:`StudyError` naming the file, ``what`` it holds and ``fix``
    when it does not parse."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise StudyError(f"{path} is corrupt: {what} is not valid JSON ({first_line(e)}); {fix}") from None


def read_study_json(path: str | os.PathLike) -> dict:
    """The contents of a study's ``study.json`` (``path`` is the file).

    Raises:
        StudyError: the file does not parse, or holds no configuration (the message names the file).
    """
    path = Path(path)
    fix = ("restore it from a copy, or start the study in another --out (the records in models/ and the runs "
           "in runs/ are left as they are)")
    meta = read_json(path, "the study's configuration", fix)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise StudyError(f"{path} is corrupt: it holds no study configuration (no 'config' mapping); {fix}")
    return meta


def check_record(rec, path: str | os.PathLike) -> str | None:
    """Why ``rec`` (read from ``path``) is not a model record, or None."""
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not a mapping"
    for key, kind in (("id", str), ("settings", dict), ("measurements", dict)):
        if not isinstance(rec.get(key), kind):
            return f"no {key!r} {kind.__name__}"
    if rec["id"] != Path(path).stem:
        return f"its id {rec['id']!r} is not its file name"
    bad = sorted(k for k, v in rec["measurements"].items() if not isinstance(v, dict) or "value" not in v)
    if bad:
        return f"measurements {bad[:3]} hold no value"
    return None


def read_record(path: str | os.PathLike, fix: str) -> dict:
    """The model record in ``path`` (``models/<run>.json``).

    Raises:
        StudyError: the file does not parse or is not a model record (naming the file, why, and ``fix``).
    """
    path = Path(path)
    rec = read_json(path, "a model record", fix)
    why = check_record(rec, path)
    if why is not None:
        raise StudyError(f"{path} is corrupt: not a model record ({why}); {fix}")
    return rec
