"""The per-layer sensitivity file (``RUN/sensitivity.json``), owned by its reader, ``dnq ptq --mixed``.

The file is written by ``landscape sensitivity RUN`` (:func:`landscape.sensitivity_run.run_sensitivity`,
which measures the curvature) and read here, so that :mod:`dnq` reads it without importing the
instruments. It holds the model's hash (:func:`model_hash`) and one entry per setting (bits,
samples, probes, range method, seed: :func:`settings_key`); a file written for another model is
refused (:class:`dnq.errors.SensitivityFileError`), never overwritten.

When ``dnq ptq --mixed`` finds no entry for a range method, it asks the *sensitivity provider*
that a package registers under the entry-point group :data:`PROVIDER_GROUP` (``landscape``
registers :func:`landscape.sensitivity_run.run_sensitivity` in ``pyproject.toml``); without a
provider it refuses with the one command that makes the file (:func:`missing_entry_error`).

Example:
    >>> import torch.nn as nn
    >>> from dnq.sensitivity_file import model_hash, settings_key
    >>> len(model_hash(nn.Linear(2, 2)))
    16
    >>> settings_key({"bits": [2, 4], "samples": 512, "matvecs": 64, "range_method": "minmax", "seed": 0})
    'bits=2,4;samples=512;matvecs=64;range=minmax;seed=0'
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import entry_points
from pathlib import Path

import torch
import torch.nn as nn

from .errors import SensitivityFileError
from .quant import check_bits

__all__ = ["CANDIDATE_BITS", "FORMAT", "PROVIDER_GROUP", "SENSITIVITY_FILE", "TABLES", "VERSION", "find_entry",
           "format_sensitivity_table", "missing_entry_error", "model_hash", "new_document", "parse_bit_list",
           "read_sensitivity", "sensitivity_provider", "settings_key"]

SENSITIVITY_FILE = "sensitivity.json"
FORMAT = "landscape layer sensitivity"
VERSION = 1
CANDIDATE_BITS = (2, 3, 4, 8)  # the default candidate weight bit-widths of a sensitivity measurement
TABLES = ("predicted", "predicted_std_error", "hawq", "hawq_std_error", "measured", "measured_wa")
PROVIDER_GROUP = "dnq.sensitivity_providers"


def model_hash(model: nn.Module) -> str:
    """A SHA-256 (first 16 hex digits) of the model's state: every parameter's and buffer's name,
    dtype, shape and bytes. Two models with the same hash compute the same function."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def parse_bit_list(spec) -> list[int]:
    """``"2,3,4,8"`` (or a list) -> ``[2, 3, 4, 8]``, each in 2..8, sorted, without repeats.

    Example:
        >>> parse_bit_list("8, 2,4,2")
        [2, 4, 8]
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        out = sorted({check_bits(int(str(b).strip()) if not isinstance(b, int) else b, "bits") for b in items})
    except ValueError as e:
        raise ValueError(f"bad bit list {spec!r}: {e}; write e.g. 2,3,4,8") from None
    if not out:
        raise ValueError(f"bad bit list {spec!r}; write e.g. 2,3,4,8")
    return out


def settings_key(settings: dict) -> str:
    """The entry key of a setting: ``bits=2,3,4,8;samples=512;matvecs=64;range=minmax;seed=0``."""
    return (f"bits={','.join(str(b) for b in settings['bits'])};samples={settings['samples']};"
            f"matvecs={settings['matvecs']};range={settings['range_method']};seed={settings['seed']}")


def new_document(model_hash_: str, run: str, arch) -> dict:
    """An empty sensitivity file for the model of ``model_hash_``."""
    return {"format": FORMAT, "version": VERSION, "model_hash": model_hash_, "run": run, "arch": arch, "entries": {}}


def read_sensitivity(path, model_hash_: str | None = None) -> dict:
    """Read a sensitivity file; refuse a corrupt one, or one written for another model.

    Raises:
        SensitivityFileError: naming the file and the fix.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SensitivityFileError(f"{path} does not exist; run `landscape sensitivity RUN` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SensitivityFileError(f"{path} is not a readable sensitivity file ({type(e).__name__}); delete it and "
                                   "run `landscape sensitivity RUN` again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
        raise SensitivityFileError(f"{path} is not a sensitivity file written by `landscape sensitivity`; give "
                                   "another --sensitivity file, or move it away")
    if model_hash_ is not None and doc.get("model_hash") != model_hash_:
        raise SensitivityFileError(
            f"{path} was written for another model (hash {doc.get('model_hash')}, this model's is {model_hash_}); "
            "it is refused: run `landscape sensitivity` on this run (with --out elsewhere if the file must stay)")
    for entry in doc["entries"].values():
        _int_keys(entry)
    return doc


def _int_keys(entry: dict) -> dict:
    """JSON stores the bit-width keys as strings; back to ints (in place)."""
    for t in [*(entry.get(k) for k in TABLES), *entry.get("terms", {}).values()]:
        if isinstance(t, dict):
            for n, per in t.items():
                t[n] = {int(b): v for b, v in per.items()}
    return entry


def find_entry(doc: dict, range_method: str, bits: list[int] | None = None) -> dict | None:
    """The entry of ``doc`` with ``range_method`` (and every bit-width of ``bits``), the one with
    the most samples and probes if several; ``None`` if there is none."""
    ok = [e for e in doc["entries"].values()
          if e["settings"]["range_method"] == range_method
          and (bits is None or set(bits) <= set(e["settings"]["bits"]))]
    return max(ok, key=lambda e: (e["settings"]["samples"], e["settings"]["matvecs"])) if ok else None


def sensitivity_provider():
    """The function a package registered under :data:`PROVIDER_GROUP` to measure a missing
    sensitivity entry (called as ``provider(run_dir, range_method=..., device=..., out=...,
    quiet=..., data_root=..., lock=False)``, returning the entry), or ``None`` without one."""
    found = sorted(entry_points(group=PROVIDER_GROUP), key=lambda e: e.name)
    return found[0].load() if found else None


def missing_entry_error(run_dir, range_method: str, out=None) -> SensitivityFileError:
    """The error for a sensitivity entry that is missing and that nothing can measure here: it
    names the one command that makes it."""
    where = f" --out {out}" if out is not None else ""
    return SensitivityFileError(f"no sensitivity for range method {range_method!r} in "
                                f"{out or Path(run_dir) / SENSITIVITY_FILE}; make it with `landscape sensitivity "
                                f"{run_dir} --range {range_method}{where}`")


def format_sensitivity_table(entry: dict, objective: str = "predicted") -> str:
    """A plain-text table of one objective of a sensitivity entry: one row per layer, one column
    per bit-width (with the standard error where there is one)."""
    table = entry[objective]
    se = entry.get(f"{objective}_std_error")
    bits = entry["bits"]
    width = 22 if se else 12
    names = [d["name"] for d in entry["layers"]]
    w0 = max(8, *(len(n) for n in names)) + 2
    lines = [f"{objective} (loss increase with only that layer quantized)",
             f"{'layer':<{w0}}{'weights':>9}" + "".join(f"{f'W{b}':>{width}}" for b in bits)]
    for d in entry["layers"]:
        n = d["name"]
        cells = []
        for b in bits:
            v = table[n][b]
            if se:
                e = se[n][b]
                cells.append(f"{v:>12.4g} ± {e:<7.2g}")
            else:
                cells.append(f"{v:>{width}.4g}")
        lines.append(f"{n:<{w0}}{d['numel']:>9}" + "".join(cells))
    return "\n".join(lines)
