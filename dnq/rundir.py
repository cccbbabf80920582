"""The run folder of ``dnq train``: creating it without clobbering anything, the per-epoch
checkpoint (save and resume), the metrics log and the final model.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt``
(state dicts only, loaded with ``torch.load(..., weights_only=True)``), ``model.pt`` (the final
weights and what is needed to rebuild the model) and ``result.json``. Every file is written
atomically (temp file + rename): a killed run leaves the previous version, never half a file.

Example:
    >>> import shutil, tempfile, torch
    >>> from pathlib import Path
    >>> from dnq.rundir import RunDir, is_toolkit_run, save_final, write_config
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> run = RunDir(out, resume=False, overwrite=False)
    >>> run.check(); run.open()  # create and lock the folder
    >>> write_config(out, {"epochs": 1}); save_final(out, torch.nn.Linear(2, 2), meta={}, result={"acc": 0.5})
    >>> run.commit(); run.close()
    >>> sorted(p.name for p in out.iterdir()), is_toolkit_run(out)
    (['config.json', 'model.pt', 'result.json'], True)
    >>> RunDir(out, resume=False, overwrite=False).check()  # a second run refuses to clobber it
    Traceback (most recent call last):
    ...
    dnq.errors.ConfigError: run folder ... already exists and is not empty; pass --resume to continue it ...
    >>> shutil.rmtree(out.parent)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError, LockedError
from .io import atomic_torch_save, atomic_write_json, atomic_write_text, safe_load

RUN_FORMAT, RUN_FORMAT_VERSION = "dnq-run", 1
# what the toolkit writes in a run folder: --overwrite removes these and nothing else
KNOWN_FILES = frozenset({"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "result.json", "ptq.json",
                         "bench_ptq.json"})
LOCK_NAME, REPLACED = ".dnq.lock", ".replaced"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str):
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``path/.dnq.lock`` for the block.

    The lock file records the holder (pid, host, command, what it does, since when); a second
    writer gets :class:`LockedError` naming it. The kernel releases the lock when its process
    dies, so a lock file left by a dead process is taken over (with a warning naming the dead
    pid). The file is removed when the block ends.

    Args:
        path: an existing folder.
        what: what the holder does there (``"dnq train"``, ``"landscape study"``...).
    """
    import fcntl  # noqa: PLC0415 - POSIX only: the rest of the module (and dnq) imports on any OS

    path = Path(path)
    lock = path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(lock)
            raise LockedError(f"{path} is in use by {holder}; "
                              "wait for it to finish (or stop it) and try again") from None
        old = _read_holder_json(lock)
        if old and old.get("host") == socket.gethostname() and isinstance(old.get("pid"), int) \
                and old["pid"] != os.getpid():
            warnings.warn(f"{path}: taking over the lock left by {old.get('what', 'a process')} (pid {old['pid']}, "
                          f"{'dead' if not _pid_alive(old['pid']) else 'not holding it'})", stacklevel=3)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "command": " ".join(sys.argv),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder_json(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text() or "null")
    except (OSError, ValueError):
        return None


def _read_holder(lock: Path) -> str:
    h = _read_holder_json(lock)
    if not isinstance(h, dict):
        return "another process"
    return f"{h.get('what', 'another process')} (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')})"


def is_toolkit_run(out: Path) -> bool:
    """Whether ``out/config.json`` was written by ``dnq train``: it carries the format marker, or
    (runs of versions before the marker) the trainer's ``environment.dnq`` entry."""
    try:
        cfg = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    return cfg.get("format") == RUN_FORMAT or isinstance((cfg.get("environment") or {}).get("dnq"), str)


def _foreign_entries(out: Path) -> list[str]:
    """Entries of a run folder the toolkit did not write (temp files of atomic writes are ours)."""
    return sorted(p.name for p in out.iterdir() if p.name not in KNOWN_FILES and p.name not in (LOCK_NAME, REPLACED)
                  and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def check_out_path(out) -> Path:
    """``--out`` as a path, refusing the empty string (an unset shell variable)."""
    if out is None or str(out).strip() == "":
        raise ConfigError("--out is empty (an unset shell variable?); give the run folder's path")
    return Path(out)


class RunDir:
    """The run folder's life: checks (nothing written), then :meth:`open` (create, lock, move a
    replaced run aside), then :meth:`commit` on success or :meth:`rollback` on failure, and
    :meth:`close`.

    ``--overwrite`` replaces only a folder the toolkit wrote (:func:`is_toolkit_run`) holding
    nothing but the toolkit's files, never the current directory, its parents, ``/`` or
    ``$HOME``. The old run's files are moved into ``out/.replaced/`` (renames) and deleted only
    when the new run has finished; if the new run fails before its first checkpoint they are put
    back, and if it fails later (say a NaN stop) they stay in ``.replaced/`` next to the new
    run's checkpoint, so nothing is lost either way.
    """

    def __init__(self, out, resume: bool, overwrite: bool):
        self.out = check_out_path(out)
        self.resume, self.overwrite = resume, overwrite
        self.created = False
        self.moved: list[str] = []
        self._lock = None

    def check(self) -> None:
        """Every check of the folder; raises :class:`ConfigError` naming the fix; writes nothing."""
        out = self.out
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other; pick one")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
        for parent in out.absolute().parents:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a folder; pick another --out")
        if self.resume:
            if not (out / "checkpoint.pt").is_file():
                raise ConfigError(f"cannot resume: no checkpoint.pt in {out}; start the run without --resume")
            return
        if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
            return
        if not self.overwrite:
            raise ConfigError(f"run folder {out} already exists and is not empty; pass --resume to continue it "
                              "or --overwrite to replace it")
        real = out.resolve()
        protected = {Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve(), *Path.cwd().resolve().parents}
        if real in protected:
            raise ConfigError(f"refusing to --overwrite {out} ({real}): it is the current folder, one of its parents, "
                              "/ or $HOME; give the run folder itself")
        if not is_toolkit_run(out):
            raise ConfigError(f"refusing to --overwrite {out}: its config.json was not written by dnq train "
                              "(or there is none), so it does not look like a run folder; pick another --out")
        foreign = _foreign_entries(out)
        if foreign:
            raise ConfigError(f"refusing to --overwrite {out}: it holds files dnq train did not write "
                              f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); move them away or "
                              "pick another --out")

    def open(self) -> None:
        """Create (if needed) and lock the folder; move a replaced run's files aside."""
        out = self.out
        if not out.is_dir():
            try:
                out.mkdir(parents=True)
            except FileExistsError:
                raise ConfigError(f"--out {out} exists and is not a folder") from None
            self.created = True
        self._lock = folder_lock(out, "dnq train")
        try:
            self._lock.__enter__()
        except BaseException:
            self._lock = None
            self._remove_if_created()
            raise
        if self.overwrite and not self.resume:
            self.check()  # again, under the lock: the folder may have changed since
            names = [n for n in KNOWN_FILES if (out / n).exists()]
            if names:
                (out / REPLACED).mkdir(exist_ok=True)
                for n in names:
                    os.replace(out / n, out / REPLACED / n)
                    self.moved.append(n)

    def commit(self) -> None:
        """The new run is complete: delete the replaced run's files (only those we moved)."""
        rep = self.out / REPLACED
        if rep.is_dir():
            for n in KNOWN_FILES:
                (rep / n).unlink(missing_ok=True)
            try:
                rep.rmdir()
            except OSError:
                pass
        self.moved = []

    def rollback(self) -> None:
        """The new run failed: before its first checkpoint, put the replaced run back (and remove
        a folder this run created); after it, keep both (the new run resumable, the old one in
        ``.replaced/``)."""
        out = self.out
        if self.resume:
            return
        if (out / "checkpoint.pt").is_file():
            if self.moved:
                warnings.warn(f"the run replaced by --overwrite is kept in {out / REPLACED}", stacklevel=2)
            return
        for n in KNOWN_FILES:
            (out / n).unlink(missing_ok=True)  # this run's own files (the replaced ones are in .replaced/)
        for n in self.moved:
            os.replace(out / REPLACED / n, out / n)
        if self.moved:
            try:
                (out / REPLACED).rmdir()
            except OSError:
                pass
        self.moved = []

    def close(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        """A folder this run created and left empty (a failed start) is removed."""
        if self.created:
            try:
                self.out.rmdir()
            except OSError:
                pass


def rng_state(device: torch.device) -> dict:
    """The global random state a resumed run must continue from."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out: Path, *, epoch: int, config: dict, world_size: int, model, optimizer, scheduler, swa,
                    method, device: torch.device) -> None:
    """Write ``checkpoint.pt`` after ``epoch``: tensors, numbers and strings only."""
    state = {"epoch": epoch, "config": dict(config), "world_size": world_size, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "swa": swa.state_dict() if swa is not None else None, "method": method.state_dict(),
             "rng": rng_state(device)}
    atomic_torch_save(state, Path(out) / "checkpoint.pt")


def load_checkpoint(out: Path, name: str = "checkpoint.pt") -> dict:
    """Read ``out/name`` with ``weights_only=True``; an unreadable or unsafe file raises
    :class:`CheckpointError` naming the file, the reason and the way out."""
    return load_file(Path(out) / name, "delete it to restart the run from scratch, or start over with --overwrite")


def load_file(path: Path, fix: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one clear error for a missing, truncated,
    corrupt or unsafe file. Never suggests ``weights_only=False``: a file that holds arbitrary
    objects is refused, whoever made it."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes; a disk that filled up?); {fix}")
        return safe_load(path, map_location=map_location)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} holds objects other than tensors and numbers (unsafe to unpickle); it was "
                                  f"not loaded, and should not be: {fix}") from None
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}); {fix}") from None
    except PermissionError:
        raise CheckpointError(f"{path} cannot be read: permission denied; make it readable (chmod u+r {path}) or run "
                              "as its owner") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError, OSError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {reason}); "
                              f"it may be truncated; {fix}") from None


def restore(ckpt: dict, *, model, optimizer, scheduler, swa, method, device: torch.device) -> int:
    """Load a checkpoint into the run's objects; returns the first epoch still to train."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if swa is not None and ckpt["swa"] is not None:
        swa.load_state_dict(ckpt["swa"])
    method.load_state_dict(ckpt["method"])
    set_rng_state(ckpt["rng"], device)
    return int(ckpt["epoch"]) + 1


class MetricsLog:
    """``metrics.jsonl``: one JSON line per finished epoch, rewritten atomically each epoch.

    On resume the lines of epochs after the checkpoint (written by a run killed between the two
    writes) and a ``"final"`` line are dropped, so the log always matches the checkpoint.
    """

    def __init__(self, out: Path, upto_epoch: int):
        self.path = Path(out) / "metrics.jsonl"
        self.lines: list[str] = []
        if self.path.is_file():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            recs = [json.loads(ln) for ln in lines]
            self.lines = [ln for ln, r in zip(lines, recs) if r["epoch"] <= upto_epoch and not r.get("final")]

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


def save_final(out: Path, model, meta: dict, result: dict) -> None:
    """Write ``model.pt`` (CPU, contiguous weights + metadata + result) and ``result.json``."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "meta": meta, "result": result}, Path(out) / "model.pt")
    atomic_write_json(Path(out) / "result.json", result)


def write_config(out: Path, config: dict) -> None:
    """``config.json`` with the toolkit's format marker (what ``--overwrite`` checks)."""
    atomic_write_json(Path(out) / "config.json", {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **config})
