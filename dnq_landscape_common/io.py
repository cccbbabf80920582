"""Atomic file writes (temp file in the same folder, fsync, rename) and safe checkpoint loading.

Readers of a file written here see the old content or the new, never half of it, also when the
writer is killed: the bytes go to a temporary file beside the target, are fsynced, and replace
the target with one ``os.replace``. Checkpoints are read with ``weights_only=True`` (tensors,
containers and numbers; nothing is unpickled).

Example:
    >>> import json, tempfile, torch
    >>> from pathlib import Path
    >>> from dnq_landscape_common.io import atomic_torch_save, atomic_write_json, safe_load
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write_json(folder / "a.json", {"x": torch.tensor([1.5, 2.0]), "where": folder / "b"})
    >>> json.loads((folder / "a.json").read_text())["x"]
    [1.5, 2.0]
    >>> atomic_torch_save({"w": torch.ones(2)}, folder / "m.pt")
    >>> safe_load(folder / "m.pt")["w"]
    tensor([1., 1.])
    >>> sorted(p.name for p in folder.iterdir())  # no temporary file left behind
    ['a.json', 'm.pt']
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so others
        # sharing a results folder can read it as the process's umask allows
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    _atomic(path, lambda f: f.write(data))


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON (tensors as lists, paths as strings) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    _atomic(path, lambda f: torch.save(obj, f))


def safe_load(path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True``: tensors, containers and numbers only."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
