"""The run folder of ``dnq train``: creating it without clobbering anything, the per-epoch
checkpoint (save and resume), the metrics log and the final model.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt``
(state dicts only, loaded with ``torch.load(..., weights_only=True)``), ``model.pt`` (the final
weights and what is needed to rebuild the model) and ``result.json``. Every file is written
atomically (temp file + rename): a killed run leaves the previous version, never half a file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .io import atomic_torch_save, atomic_write_json, atomic_write_text, safe_load


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber anything: an existing non-empty folder needs ``--resume`` or ``--overwrite``,
    and ``--overwrite`` only replaces a folder that holds a ``config.json`` (a run folder)."""
    from .train import ConfigError

    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; pick one")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise ConfigError(f"cannot resume: no checkpoint.pt in {out}; start the run without --resume")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {out} already exists and is not empty; pass --resume to continue it "
                              "or --overwrite to replace it")
        if not (out / "config.json").is_file():
            raise ConfigError(f"refusing to --overwrite {out}: it has no config.json, so it does not look like a run "
                              "folder; pick another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


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
    state = {"epoch": epoch, "config": config, "world_size": world_size, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "swa": swa.state_dict() if swa is not None else None, "method": method.state_dict(),
             "rng": rng_state(device)}
    atomic_torch_save(state, Path(out) / "checkpoint.pt")


def load_checkpoint(out: Path) -> dict:
    """Read ``checkpoint.pt`` with ``weights_only=True``."""
    return safe_load(Path(out) / "checkpoint.pt")


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
    atomic_write_json(Path(out) / "config.json", config)
