"""Running a study: :class:`Study` (check everything, then train and measure every model into
one folder, resumably) and :func:`load_records` (the model records of a study folder).

Layout of ``out/``::

    study.json                 the configuration and its hash
    runs/<run>-<hash>/         one `dnq train` run directory per model (config, checkpoints)
    models/<run>.json          one record per model: training result and every measurement

Rank 0 holds the folder's lock (:func:`dnq.rundir.folder_lock`) while the study runs and writes
every file (atomically); a corrupt ``models/<run>.json`` is moved aside and measured again.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from landscape.study.config import StudyConfig
    >>> out = Path(tempfile.mkdtemp()) / "s"
    >>> study = Study(StudyConfig.from_dict({"name": "demo"}), out, device="cpu", progress=False)
    >>> study.check_out()  # the folder can hold the study; nothing is written
    >>> out.exists()
    False
    >>> try:
    ...     load_records(out)
    ... except StudyError as e:
    ...     print(e)  # doctest: +ELLIPSIS
    /.../s is not a folder (it does not exist); give the folder of a study (the --out of `landscape study`)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dnq.convention import describe
from dnq.data import load_dataset
from dnq.errors import ConfigError, DataError, LockedError
from dnq.models import build_model
from dnq.quant import parse_bits
from dnq.rundir import LOCK_NAME, folder_lock
from dnq.train import TrainConfig, load_model, train, validate
from dnq_landscape_common.device import check_device, device_kind, resolve_device
from dnq_landscape_common.distributed import init_distributed
from dnq_landscape_common.errors import NonFiniteError
from dnq_landscape_common.io import atomic_write_json

from ..records import STUDY_VERSION, StudyError, check_record, first_line, read_json, read_record, read_study_json
from .config import StudyConfig
from .keys import stable_hash
from .measure import Measure

__all__ = ["Study", "load_records"]


class Study:
    """Runs a :class:`StudyConfig` into ``out`` (see the module doc).

    Args:
        config: the study.
        out: its directory; an existing directory must hold the same study (same name), or be
            empty.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        progress: progress bars (``False`` for quiet runs).

    Raises:
        StudyError: a device that is not available here (checked before anything starts).
    """

    def __init__(self, config: StudyConfig, out: str | os.PathLike, device: str = "auto", progress: bool = True):
        if not isinstance(config, StudyConfig):
            raise TypeError(f"config must be a StudyConfig (see load_config), got {type(config).__name__}")
        if str(out) == "":
            raise StudyError("the study folder is an empty path; give --out a folder")
        check_device(device, StudyError)
        self.cfg, self.out, self.progress = config, Path(out), progress
        # under torchrun: join the process group (training is data-parallel, products sharded)
        self.rank, self.world, local_rank, self.own_pg = init_distributed(device_kind(device))
        self.device = resolve_device(device, local_rank)
        self._datasets: dict = {}  # loaded once per study, not once per model

    # -- checks before anything is written ---------------------------------------------------
    def check(self) -> None:
        """Everything that can go wrong before the first write: the output folder
        (:meth:`check_out`) and every run's training configuration (:func:`dnq.train.validate`),
        its dataset (loaded here, and kept for the measurements), its batch size against the
        training split, and its model on the dataset's images (one forward pass of two images).

        Raises:
            StudyError: naming the run (or the folder) and the fix.
        """
        self.check_out()
        fix = "fix it in the study's runs or train settings (the config file, or --set train.KEY=VALUE)"
        loaded, models = {}, {}
        for r in self.cfg.expand():
            where = f"run {r['name']!r}"
            try:
                tc = self.train_config(r["settings"], self.out / "runs" / r["id"])
                validate(tc)
            except (ConfigError, TypeError, ValueError) as e:
                raise StudyError(f"{where}: {first_line(e)}; {fix}") from None
            key = (tc.data, repr(tc.val_size), tc.val_seed)
            if key not in loaded:
                try:
                    loaded[key] = load_dataset(tc.data, tc.data_root, tc.download, val_size=tc.val_size,
                                               val_seed=tc.val_seed)
                except DataError as e:
                    raise StudyError(f"{where}: cannot load dataset {tc.data!r}: {first_line(e)}"
                                     + _study_data_hint(tc.data)) from None
            ds = loaded[key]
            n = len(ds.x_train)
            if tc.batch_size > n:
                raise StudyError(f"{where}: batch_size {tc.batch_size} is larger than the {n} training images of "
                                 f"{tc.data} ({ds.val_size} more are held out for validation); use a smaller "
                                 "batch size in the study's runs or train settings (e.g. --set train.batch_size=64)")
            if tc.batch_size % self.world:
                raise StudyError(f"{where}: batch_size {tc.batch_size} is not divisible by the {self.world} processes")
            inst = self.cfg.instruments
            if inst.replicates > 1 and inst.replicates * inst.hessian_samples > n:
                raise StudyError(f"{where}: instruments.replicates {inst.replicates} disjoint subsets of "
                                 f"instruments.hessian_samples {inst.hessian_samples} images need "
                                 f"{inst.replicates * inst.hessian_samples} training images, but {tc.data} has {n}; "
                                 f"lower replicates to at most {max(1, n // inst.hessian_samples)} or hessian_samples "
                                 f"to at most {n // inst.replicates}")
            mkey = (tc.model, tc.data)
            if mkey not in models:
                models[mkey] = self._check_model(tc.model, ds, where)
            if self.cfg.instruments.eig_k > models[mkey]:
                raise StudyError(f"instruments.eig_k is {self.cfg.instruments.eig_k}, more than the "
                                 f"{models[mkey]} parameters of {tc.model}")
        for ds in loaded.values():  # the measurements reuse them (keyed as dataset() looks them up)
            self._datasets.setdefault((ds.name, ds.val_size, ds.val_seed or 0), ds.to(self.device))

    def dataset(self, meta: dict):
        """The dataset of a trained model (``meta``: its training metadata, which names the data and
        the model's own validation split), on the study's device, loaded once per study."""
        key = (meta["data"], meta.get("val_size", 0), meta.get("val_seed", 0))  # the run's own splits
        if key not in self._datasets:
            self._datasets[key] = load_dataset(meta["data"], self.cfg.data_root, val_size=key[1],
                                               val_seed=key[2]).to(self.device)
        return self._datasets[key]

    @staticmethod
    def _check_model(name: str, ds, where: str) -> int:
        """Build ``name`` for ``ds`` and run two of its images through it; returns its number of
        trainable parameters."""
        try:
            model = build_model(name, ds.num_classes, ds.in_channels, ds.image_size).eval()
            with torch.no_grad():
                out = model(ds.normalize(ds.x_train[:2].cpu()))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            shape = tuple(ds.x_train.shape[1:])
            raise StudyError(f"{where}: model {name!r} does not run on {ds.name} images of shape {shape}: "
                             f"{first_line(e)}; choose another model or dataset") from None
        if out.dim() != 2 or out.shape[1] != ds.num_classes:
            raise StudyError(f"{where}: model {name!r} gives outputs of shape {tuple(out.shape)} on {ds.name}, not "
                             f"(batch, {ds.num_classes} classes)")
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def check_out(self) -> None:
        """The output folder can hold this study: it is a folder (or can be created) that this
        process can write, and it holds this study (same name) or nothing. Writes nothing.

        Raises:
            StudyError: naming the folder and the fix.
        """
        out = self.out
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise StudyError(f"{out} is not a folder (a file, or a broken link); choose another --out")
            if not os.access(out, os.W_OK | os.X_OK):
                raise StudyError(f"{out} is not writable by this user; choose another --out or fix its permissions")
            meta = out / "study.json"
            if meta.is_file():
                old = read_study_json(meta)
                if old["config"].get("name") != self.cfg.name:
                    raise StudyError(f"{out} holds study {old['config'].get('name')!r}, not {self.cfg.name!r}; "
                                     "choose another --out")
            elif any(p.name != LOCK_NAME for p in out.iterdir()):
                raise StudyError(f"{out} exists, is not empty and holds no study.json; choose another --out")
            return
        parent = out.parent
        while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise StudyError(f"cannot create {out}: {parent} is not a folder (a file, or a broken link); "
                             "choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StudyError(f"cannot create {out}: {parent} is not writable by this user; choose another --out")

    # -- directory --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the output folder (:meth:`check_out`), then create ``models/``, ``runs/`` and
        write ``study.json`` (rank 0)."""
        self.check_out()
        self._barrier()  # every rank has checked before rank 0 writes
        if self.rank == 0:
            meta = self.out / "study.json"
            old = read_study_json(meta) if meta.is_file() else {}
            (self.out / "models").mkdir(parents=True, exist_ok=True)
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            new = {"version": STUDY_VERSION, "config": self.cfg.to_dict(), "hash": self.cfg.hash(),
                   "convention": describe(self.cfg.ptq["convention"]), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if "splits" in old and old.get("hash") == new["hash"]:
                new["splits"] = old["splits"]
            atomic_write_json(meta, new)
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective: every rank must call it)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @contextlib.contextmanager
    def _locked(self):
        """Rank 0 holds the folder's lock (:func:`dnq.rundir.folder_lock`) for the block; a
        folder locked by another process is refused on every rank."""
        lock, err = None, None
        if self.rank == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                lock = folder_lock(self.out, "landscape study")
                lock.__enter__()
            except (LockedError, OSError) as e:
                lock, err = None, e
        if not self._all_ok(err is None):
            if err is not None:
                raise err
            raise StudyError(f"{self.out}: rank 0 could not lock the study folder (its error says why)")
        try:
            yield
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)

    # -- one model ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Check everything (:meth:`check`), then, holding the folder's lock, train and measure
        every model; returns the records.

        Raises:
            StudyError: a bad configuration, folder, training or measurement (naming the run and
                the fix); :class:`dnq.rundir.LockedError`: another process runs in the folder.
        """
        try:
            self.check()
            fresh = not self.out.exists(), not (self.out / "study.json").exists()
            try:
                with self._locked():
                    self.prepare()
                    runs = self.cfg.expand()
                    records = []
                    bar = tqdm(runs, desc=f"study {self.cfg.name}", disable=not self.progress or self.rank != 0)
                    for r in bar:
                        bar.set_postfix_str(r["id"])
                        records.append(self.run_one(r))
                    return records
            except BaseException:
                if self.rank == 0:
                    self._remove_if_empty(*fresh)
                raise
        finally:
            if self.own_pg:
                dist.destroy_process_group()

    def _remove_if_empty(self, created_folder: bool, created_meta: bool) -> None:
        """After a study that failed before it kept anything (no model record, no run folder):
        remove what this invocation created (``study.json``, the empty ``models/`` and ``runs/``,
        and the study folder itself when it made it), so that nothing half-made is left behind."""
        if not created_meta:
            return
        models, runs = self.out / "models", self.out / "runs"
        if any(models.iterdir() if models.is_dir() else ()) or any(runs.iterdir() if runs.is_dir() else ()):
            return
        for d in (models, runs):
            if d.is_dir():
                d.rmdir()
        (self.out / "study.json").unlink(missing_ok=True)
        if created_folder and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _record_path(self, rid: str) -> Path:
        return self.out / "models" / f"{rid}.json"

    def _load_record(self, rid: str) -> dict | None:
        """The model's record, or None: missing, or corrupt (then moved aside to
        ``<name>.json.corrupt-<timestamp>`` by rank 0, with a warning, and measured again)."""
        p = self._record_path(rid)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
            why = check_record(rec, p)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            why = f"not valid JSON ({first_line(e)})"
        except FileNotFoundError:  # moved aside by rank 0 meanwhile
            return None
        if why is None:
            return rec
        if self.rank == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = p.with_name(f"{p.name}.corrupt-{stamp}")
            k = 1
            while aside.exists():
                k += 1
                aside = p.with_name(f"{p.name}.corrupt-{stamp}-{k}")
            p.rename(aside)
            print(f"landscape study: warning: {p} was corrupt ({why}); moved it to {aside.name} and measuring "
                  f"model {rid} again (its training is kept)", file=sys.stderr)
        return None

    def _save(self, rec: dict) -> None:
        if self.rank == 0:
            atomic_write_json(self._record_path(rec["id"]), rec)

    def train_config(self, settings: dict, out: Path):
        """The :class:`dnq.train.TrainConfig` of a model (``settings``: its expanded settings; a
        ``train_bits`` among them is the model's target bit-width, else the study's)."""
        settings = dict(settings)
        (w, a), = parse_bits(settings.pop("train_bits", self.cfg.train_bits))
        base = {"data": self.cfg.data, "model": self.cfg.model, "wbits": w, "abits": a,
                "data_root": self.cfg.data_root, "first_last_bits": self.cfg.ptq["first_last_bits"],
                "device": "cpu" if self.device.type == "cpu" else ("cuda" if self.world > 1 else str(self.device))}
        return TrainConfig(**{**base, **settings, "out": str(out)})

    def train_key(self, settings: dict) -> str:
        """A model's training key: the hash of its training configuration without the settings that
        do not change the model (its folder, device and data root)."""
        cfg_train = self.train_config(settings, Path("."))
        return stable_hash({k: v for k, v in cfg_train.to_dict().items() if k not in ("out", "device", "data_root")})

    def run_dir(self, r: dict, tkey: str) -> Path:
        """The run folder of model ``r`` (an item of :meth:`StudyConfig.expand`) with training key ``tkey``."""
        return self.out / "runs" / f"{r['id']}-{tkey[:8]}"

    def run_one(self, r: dict) -> dict:
        tkey = self.train_key(r["settings"])
        run_dir = self.run_dir(r, tkey)
        where = f"run {r['name']!r} ({run_dir})"
        rec = self._load_record(r["id"])
        if rec is None or rec.get("train_key") != tkey:
            rec = {"id": r["id"], "name": r["name"], "config": r["config"], "settings": r["settings"],
                   "train_key": tkey, "run_dir": str(run_dir.relative_to(self.out)), "measurements": {}}
        if not (run_dir / "model.pt").is_file():
            t0 = time.perf_counter()
            resume = (run_dir / "checkpoint.pt").is_file()
            cfg_train = self.train_config(r["settings"], run_dir)
            try:
                result = train(cfg_train, resume=resume, overwrite=not resume and run_dir.exists(), quiet=True)
            except (ValueError, NonFiniteError) as e:  # ConfigError, DataError, CheckpointError, LockedError
                raise StudyError(f"{where}: training failed: {first_line(e)}") from None
            rec["train"] = {**result, "time_s": time.perf_counter() - t0}
            self._save(rec)
            self._barrier()  # model.pt is written by rank 0
        elif "train" not in rec and (run_dir / "result.json").is_file():
            rec["train"] = read_json(run_dir / "result.json", "the training's result",
                                     f"delete the folder {run_dir} to train that model again")
        try:
            model, meta = load_model(run_dir, self.device)
        except (ValueError, OSError) as e:  # CheckpointError, a missing or unreadable model.pt
            raise StudyError(f"{where}: cannot load the trained model: {first_line(e)}; delete the folder "
                             f"{run_dir} to train it again") from None
        m = Measure(self, rec, model, meta)
        self._record_splits(m.ds)
        m.all()
        return rec

    def _record_splits(self, ds) -> None:
        """Write the split sizes into study.json once (the report states them)."""
        if self.rank != 0:
            return
        path = self.out / "study.json"
        meta = read_study_json(path)
        splits = {"train": len(ds.x_train), "val": ds.val_size, "test": len(ds.x_test),
                  "calibration": min(self.cfg.ptq["calib_size"], len(ds.x_train)),
                  "hessian": min(self.cfg.instruments.hessian_samples, len(ds.x_train))}
        if meta.get("splits") != splits:
            atomic_write_json(path, {**meta, "splits": splits})



def _study_data_hint(data: str) -> str:
    """What a study's user sets for a torchvision dataset that is missing (the flags the data
    layer names are ``dnq train``'s)."""
    if data not in ("cifar10", "cifar100", "cifar10-subset"):
        return ""
    name = "cifar10" if data == "cifar10-subset" else data
    return (f"; in a study: --set data_root=PATH for a folder that holds it (`dnq train --data {name} --download "
            f"--data-root PATH ...` fetches it there), or --set data=npz:PATH")


def load_records(path: str | os.PathLike, include_other: bool = False) -> list[dict]:
    """The model records of a study directory, in the run order of its current configuration
    (models still being measured included). Records of runs the configuration no longer lists
    (left by an earlier version of the study) are kept on disk and returned only with
    ``include_other=True``."""
    path = Path(path)
    if not path.is_dir():
        raise StudyError(f"{path} is not a folder" + ("" if path.exists() else " (it does not exist)")
                         + "; give the folder of a study (the --out of `landscape study`)")
    if not (path / "study.json").is_file():
        raise StudyError(f"{path} holds no study.json; run `landscape study --out {path}` first")
    meta = read_study_json(path / "study.json")
    try:
        order = [r["id"] for r in StudyConfig.from_dict(meta["config"]).expand()]
    except StudyError as e:
        raise StudyError(f"{path / 'study.json'} holds an invalid configuration ({e}); restore the file, or run "
                         "the study again with a valid configuration") from None
    recs = {}
    for p in sorted((path / "models").glob("*.json")):
        fix = (f"run `landscape study --out {path}` again with the same configuration: it moves the file aside "
               "and measures that model again")
        recs[p.stem] = read_record(p, fix)
    mine = [recs[k] for k in order if k in recs]
    return mine + [v for k, v in recs.items() if k not in order] if include_other else mine


