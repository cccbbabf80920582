"""The plan of a study (``landscape study --plan``): what it will run and how long that takes on
the device at hand, before anything is trained.

:func:`make_plan` times one unit of every kind of work on synthetic data of the dataset's shape
(:mod:`landscape.study.plan_timing`: a training step of each method as the trainer takes it, a
reconstruction step of every unit, a Hessian-vector product, a quadratic form, a loss on one
batch of the curvature images, the evaluations and the rounding PTQs) and multiplies each by the
study's counts: epochs x steps per epoch x models, reconstruction steps x units x bit-widths x
models, the instruments' products and forward evaluations x batches. When the study folder
exists, what is finished there (trained models, measurements recorded with the same key) is
counted as done and left out of the total. Nothing is written: the plan never creates the
study's folder or files (:func:`write_plan_json` writes the plan itself where asked).

What is estimated rather than timed, said in the plan's notes: the Lanczos steps of ``eigen``
(``4 k + 3`` products, or the mean of the study's own records), the report's figures (a constant
per figure), and distributed runs (the plan is for one process).

Example:
    >>> s = Stage("train sgd: steps", "step", 0.01)
    >>> s.add(100, "1 epoch x 100 steps", model="sgd-s0")
    >>> s.add(100, "1 epoch x 100 steps", done=True, model="sgd-s1")
    >>> s.count, s.done, round(s.seconds, 6), s.how
    (100, 100, 1.0, '1 model x 1 epoch x 100 steps; 1 model done')
    >>> format_duration(3725), format_duration(42.5), format_duration(0.0123)
    ('1 h 02 min', '42.5 s', '12.3 ms')
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dnq.data import resolve_val_size
from dnq.methods import NOISE_METHODS
from dnq.models import build_model
from dnq_landscape_common.io import atomic_write_text

from ..records import StudyError, ptq_measurement
from .config import StudyConfig
from .keys import ReconPTQKey, measurement_keys, ptq_key, sensitivity_range
from .plan_timing import (
    batch_factor,
    data_shape,
    read_json_or_none,
    time_curvature,
    time_evaluation,
    time_reconstruction,
    time_rounding,
    time_training,
)
from .runner import Study

__all__ = ["FIGURE_S", "Plan", "Stage", "check_plan_json", "format_duration", "format_plan", "make_plan",
           "write_plan_json"]

#: seconds per static figure of the report (PNG and PDF), not timed: BENCHMARKS.md's digits report
#: (28 s drawing 26 figures on a 2-core CPU)
FIGURE_S = 1.1


def format_duration(seconds: float) -> str:
    """A duration for the plan's table: ms, s, min or h."""
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"
    return f"{int(seconds // 3600)} h {int(round(seconds % 3600 / 60)):02d} min"


@dataclasses.dataclass
class Stage:
    """One line of the plan: ``count`` units of ``unit`` still to do (``done``: finished in the
    study folder), each ``unit_s`` seconds; ``how`` says how the count is made (per model, and
    for how many models). ``order`` sorts the lines (training, evaluation and PTQ, curvature,
    mixed precision, report)."""

    name: str
    unit: str
    unit_s: float
    order: float = 0
    count: float = 0
    done: float = 0
    per_model: str = ""
    study_wide: bool = False
    todo_models: set = dataclasses.field(default_factory=set)
    done_models: set = dataclasses.field(default_factory=set)

    def add(self, n: float, per_model: str, done: bool = False, model: str = "") -> None:
        """``n`` units of ``model`` (``done``: finished already); ``per_model`` says what one
        model's share is."""
        if done:
            self.done += n
            self.done_models.add(model)
        else:
            self.count += n
            self.todo_models.add(model)
        self.per_model = per_model

    @property
    def seconds(self) -> float:
        return self.count * self.unit_s

    @property
    def how(self) -> str:
        if self.study_wide:
            return self.per_model
        m, d = len(self.todo_models), len(self.done_models - self.todo_models)
        text = f"{m} model{'s' if m != 1 else ''} x {self.per_model}"
        return text + (f"; {d} model{'s' if d != 1 else ''} done" if d else "")

    def to_dict(self) -> dict:
        return {"stage": self.name, "unit": self.unit, "count": self.count, "done": self.done,
                "unit_s": self.unit_s, "seconds": self.seconds, "how": self.how}


def _plural(n, word: str) -> str:
    return f"{n:g} {word}{'' if n == 1 else 's'}"


@dataclasses.dataclass
class Plan:
    """A study's plan: its stages, the unit costs they were made from, and notes."""

    study: str
    device: str
    data: str
    model: str
    splits: dict
    models: int
    stages: list[Stage]
    costs: dict
    notes: list[str]
    planning_s: float = 0.0

    @property
    def total_s(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict:
        return {"study": self.study, "device": self.device, "data": self.data, "model": self.model,
                "splits": self.splits, "models": self.models, "total_s": self.total_s,
                "stages": [s.to_dict() for s in self.stages], "unit_costs": self.costs, "notes": self.notes,
                "planning_s": self.planning_s}


class _Planner:
    """Builds a :class:`Plan` (see :func:`make_plan`): the unit costs, once each, then every model's counts."""

    def __init__(self, cfg: StudyConfig, study: Study, folder: Path | None, progress: bool):
        self.cfg, self.study, self.folder, self.progress = cfg, study, folder, progress
        self.device = study.device
        self.shape = data_shape(cfg.data, cfg.data_root)
        self.stages: dict[str, Stage] = {}
        self.costs: dict = {}
        self.rid = ""
        self.t0 = time.perf_counter()
        self._train: dict = {}
        self._eval: dict = {}

    def say(self, text: str) -> None:
        """One line of progress on stderr (``progress``), through tqdm as the study's bars."""
        if self.progress:
            tqdm.write(f"landscape study --plan: {time.perf_counter() - self.t0:6.1f} s: {text}", file=sys.stderr)

    # -- unit costs, timed once each ------------------------------------------------------------
    def training(self, tc) -> dict:
        # what a step's cost depends on (not the target bits: the noise's cost is the same at every bit-width)
        key = (tc.method, tc.batch_size, tc.compile, tc.cuda_graph, tc.amp, tc.channels_last, tc.act_sampler)
        if key not in self._train:
            self.say(f"timing a {tc.method} training step (batch {tc.batch_size})")
            self._train[key] = time_training(tc, self.shape, self.device)
            self.costs[f"train {tc.method} batch {tc.batch_size}"] = self._train[key]
        return self._train[key]

    def fp_eval(self) -> float:
        if "fp" not in self._eval:
            self.say("timing an evaluation")
            model = build_model(self.cfg.model, self.shape.classes, self.shape.channels, self.shape.size)
            self._eval["fp"] = time_evaluation(model.to(self.device).eval(), self.shape, self.device)
            self.costs["evaluation per image"] = self._eval["fp"]
        return self._eval["fp"]

    def ptq_cost(self, method: str, bits: str, key) -> dict:
        if method not in self._eval:
            self.say(f"timing PTQ {method} at {bits}")
            if isinstance(key, ReconPTQKey):
                self._eval[method] = time_reconstruction(self.cfg, self.shape, self.device, method, bits, key.iters)
            else:
                self._eval[method] = time_rounding(self.cfg, self.shape, self.device, method, bits)
            self.costs[f"ptq {method}"] = self._eval[method]
        return self._eval[method]

    def curvature(self) -> dict:
        if "curvature" not in self._eval:
            self.say(f"timing the curvature products on a batch of {self.cfg.instruments.hessian_batch} images")
            self._eval["curvature"] = time_curvature(self.cfg, self.shape, self.device)
            self.costs["curvature (one batch)"] = self._eval["curvature"]
        return self._eval["curvature"]

    # -- one model ---------------------------------------------------------------------------------
    def put(self, order: float, name: str, unit: str, unit_s: float, n: float, per_model: str,
            done: bool = False) -> None:
        """The current model's ``n`` units of stage ``name`` (made at its first use, sorted by ``order``)."""
        if name not in self.stages:
            self.stages[name] = Stage(name, unit, unit_s, order)
        self.stages[name].add(n, per_model, done, self.rid)

    def model(self, r: dict, eig_products: float) -> None:
        st, cfg = self.study, self.cfg
        self.rid = r["id"]
        tkey = st.train_key(r["settings"])
        tc = st.train_config(r["settings"], Path("."))
        trained = self.folder is not None and (st.run_dir(r, tkey) / "model.pt").is_file()
        rec = read_json_or_none(self.folder / "models" / f"{r['id']}.json") if self.folder is not None else None
        recorded = (rec or {}).get("measurements", {}) if (rec or {}).get("train_key") == tkey else {}
        val = resolve_val_size(tc.val_size, cfg.data, self.shape.n_train)
        n_train, n_eval = self.shape.n_train - val, val + self.shape.n_test
        self.splits = {"train": n_train, "val": val, "test": self.shape.n_test}
        self._training(tc, n_train, val, trained)
        keys = measurement_keys(cfg, self.device)

        def done(name):
            have = recorded.get(name)
            return isinstance(have, dict) and have.get("key") == keys[name].digest(tkey, name)

        self.put(1, "fp evaluation (validation and test)", "model", n_eval * self.fp_eval(), 1, "1 evaluation",
                 done("fp"))
        for method in cfg.ptq["variants"]:
            for bits in cfg.bits:
                name = ptq_measurement(bits, method)
                self._ptq(method, bits, keys[name], n_eval, done(name))
        self._curvature(done, eig_products)
        if cfg.mixed is not None:
            self._mixed(n_eval)

    def _training(self, tc, n_train: int, val: int, trained: bool) -> None:
        c = self.training(tc)
        steps = n_train // tc.batch_size
        ev = self.fp_eval()
        m, e = tc.method, tc.epochs
        self.put(0, f"train {m}: steps", "step", c["step_s"], e * steps,
                 f"{_plural(e, 'epoch')} x {_plural(steps, 'step')}", trained)
        per_epoch = val * ev + c["checkpoint_s"] + (c["epoch_start_s"] if m in NOISE_METHODS else 0.0)
        what = "validation pass, checkpoint" + (", noise statistics" if m in NOISE_METHODS else "")
        self.put(0, f"train {m}: per epoch ({what})", "epoch", per_epoch, e, _plural(e, "epoch"), trained)
        end = steps * c["bn_batch_s"] + 2 * (val + self.shape.n_test) * ev
        self.put(0.5, "train: end (BatchNorm recompute, final evaluations)", "model", end, 1, "1 end", trained)

    def _ptq(self, method: str, bits: str, key, n_eval: int, done: bool) -> None:
        c = self.ptq_cost(method, bits, key)
        nb = _plural(len(self.cfg.bits), "bit-width")
        if isinstance(key, ReconPTQKey):
            self.put(1, f"ptq {method}: reconstruction steps", "step", c["step_s"], c["steps"],
                     f"{nb} x {c['steps']:,.0f} steps ({c['units']} unit-stages of {key.iters} steps; BRECQ's "
                     "activation stage a quarter)" if method == "brecq" else
                     f"{nb} x {c['steps']:,.0f} steps ({c['units']} unit-stages of {key.iters} steps)", done)
            self.put(1, f"ptq {method}: caches, ranges, evaluation", "reconstruction",
                     c["fixed_s"] + n_eval * c["eval_image_s"], 1, nb, done)
        else:
            self.put(1, f"ptq {method}: quantize and evaluate", "quantization",
                     c["ptq_s"] + n_eval * c["eval_image_s"], 1, nb, done)

    def _curvature(self, done, eig_products: float) -> None:
        i, c, bits = self.cfg.instruments, self.curvature(), self.cfg.bits
        nb = batch_factor(i.hessian_samples, i.hessian_batch, self.device)
        per, per_bits = f"{nb:g} batches of {c['batch']}", f"{_plural(len(bits), 'bit-width')} x {nb:g} batches"
        names = ["trace", "eigen", "density", "blocks", *(f"{k}:{b}" for k in ("noise", "slice") for b in bits)]
        self.put(2, "curvature: engine planning", "operator", c["setup_s"], 1, "1 operator",
                 all(done(n) for n in names))
        m = i.trace_matvecs
        s = min(m // 3, c["dim"]) if i.trace_method == "hutch++" else 0
        trace = nb * (s * c["block_s"] + (m - s) * c["form_s"])
        eigen = nb * eig_products * c["matvec_s"]
        self.put(2, f"trace ({i.trace_method}, {m} products)", "model", trace, 1, per, done("trace"))
        self.put(2, f"eigen (k {i.eig_k}, about {eig_products:.0f} products)", "model", eigen, 1, per, done("eigen"))
        if i.replicates > 1:
            self.put(2, f"sampling ({i.replicates - 1} more subsets: trace and eigen)", "subset",
                     c["setup_s"] + trace + eigen, i.replicates - 1, _plural(i.replicates - 1, "subset"),
                     done("sampling"))
        self.put(2, f"density ({i.density_runs} x {i.density_steps} products)", "model",
                 nb * i.density_runs * i.density_steps * c["matvec_s"], 1, per, done("density"))
        self.put(2, f"blocks ({i.block_matvecs} products)", "model", nb * i.block_matvecs * c["block_s"], 1, per,
                 done("blocks"))
        noise = nb * (c["grad_s"] + i.noise_matvecs * c["form_s"] + c["matvec_s"] + 2 * c["loss_s"])
        for b in bits:
            self.put(2, f"noise ({i.noise_matvecs} products, gradient, 2 losses)", "bit-width", noise, 1, per_bits,
                     done(f"noise:{b}"))
        self.put(2, f"surface ({i.surface_steps} x {i.surface_steps} losses)", "model",
                 nb * i.surface_steps ** 2 * c["loss_s"], 1, per, done("surface"))
        for b in bits:
            self.put(2, f"slice ({i.slice_steps} losses)", "bit-width", nb * i.slice_steps * c["loss_s"], 1, per_bits,
                     done(f"slice:{b}"))

    def _mixed(self, n_eval: int) -> None:
        mx, i, c = self.cfg.mixed, self.cfg.instruments, self.curvature()
        nb = batch_factor(i.hessian_samples, i.hessian_batch, self.device)
        forms = c["layers"] * len(mx["bits"])
        sens = nb * (4 * c["grad_s"] + mx["matvecs"] * c["block_s"] + forms * c["form_s"]
                     + (1 + 2 * forms) * c["loss_s"])
        ranges = {sensitivity_range(self.cfg.ptq, m) for m in mx["methods"]}
        self.put(3, "mixed: sensitivity (products, per-layer losses)", "range", sens, len(ranges),
                 _plural(len(ranges), "range method"))
        n_alloc = len(mx["budgets"]) * len(mx["objectives"])
        bits = f"W{max(mx['bits'])}A{mx['abits']}"
        for method in mx["methods"]:
            uniform = [b for b in mx["uniform_bits"] if not (f"W{b}A{mx['abits']}" in self.cfg.bits
                                                              and method in self.cfg.ptq["variants"])]
            cost = self.ptq_cost(method, bits, ptq_key(self.cfg, bits, method, self.device))
            one = cost["ptq_s"] if "ptq_s" in cost else cost["fixed_s"] + cost["steps"] * cost["step_s"]
            self.put(3, f"mixed: {method} allocations and uniform line", "quantization",
                     one + n_eval * cost["eval_image_s"], n_alloc + len(uniform),
                     f"({n_alloc} allocations + {len(uniform)} uniform settings)")

    def report(self, n_models: int) -> None:
        """The report's static figures: per bit-width, the prediction, per model, and with mixed
        precision per model and the Pareto figure."""
        figures = len(self.cfg.bits) + 1 + n_models + ((n_models + 1) if self.cfg.mixed is not None else 0)
        self.rid = "report"
        self.put(4, "report: static figures (PNG and PDF)", "figure", FIGURE_S, figures,
                 f"{len(self.cfg.bits)} per bit-width, 1 prediction, 1 per model" +
                 (", 1 per model and 1 Pareto for mixed precision" if self.cfg.mixed is not None else ""))
        self.stages["report: static figures (PNG and PDF)"].study_wide = True

    def sorted_stages(self) -> list[Stage]:
        return sorted(self.stages.values(), key=lambda st: st.order)


def _eig_products(cfg: StudyConfig, folder: Path | None) -> tuple[float, str]:
    """The Lanczos products of ``eigen`` per model: the mean of the study's own records when it has
    some with this ``eig_k``, else ``4 k + 3`` (BENCHMARKS.md: 6-9 products for k = 1, 15-17 for
    k = 3 at tolerance 1e-3 on the toolkit's models; 9 and 11 for k = 2 on the cifar10-subset
    resnet20s)."""
    k = cfg.instruments.eig_k
    seen = []
    for p in sorted((folder / "models").glob("*.json")) if folder is not None else []:
        v = ((read_json_or_none(p) or {}).get("measurements", {}).get("eigen") or {}).get("value") or {}
        if len(v.get("eigenvalues") or []) == k and isinstance(v.get("num_matvecs"), int):
            seen.append(v["num_matvecs"])
    if seen:
        return sum(seen) / len(seen), f"eigen: {sum(seen) / len(seen):.0f} products, the mean of {len(seen)} records"
    est = min(max(200, 20 * k), 4 * k + 3)
    return float(est), (f"eigen: {est} products estimated (4 k + 3; Lanczos stops at its tolerance, so the real "
                        "count depends on the spectrum)")


def make_plan(cfg: StudyConfig, out: str | os.PathLike | None = None, device: str = "auto",
              progress: bool = False) -> Plan:
    """The plan of ``cfg`` on ``device`` (resolved as the study resolves it), without training or
    loading data; ``out``: the study folder, whose finished work is counted as done (it is checked
    as the study checks it, and never written).

    Raises:
        StudyError: a bad device or folder, or a dataset whose shape cannot be told (an ``npz:``
            file that is missing).
    """
    t0 = time.perf_counter()
    study = Study(cfg, out if out is not None else "plan", device=device, progress=False)
    folder = None
    if out is not None:
        study.check_out()
        folder = Path(out) if (Path(out) / "study.json").is_file() else None
    pl = _Planner(cfg, study, folder, progress)
    eig, eig_note = _eig_products(cfg, folder)
    runs = cfg.expand()
    for r in runs:
        pl.model(r, eig)
    pl.report(len(runs))
    notes = [f"timed on {study.device} on synthetic data of {cfg.data}'s shape ({pl.shape.channels}x{pl.shape.size}x"
             f"{pl.shape.size}, {pl.shape.classes} classes): a warm-up, then the median of a few repetitions",
             eig_note, f"report figures: {FIGURE_S} s each (not timed)",
             "one process: a torchrun study shares the work between its processes"]
    if folder is not None:
        notes.append(f"finished work in {folder} (trained models, measurements with the same key) is left out")
    if torch.device(study.device).type == "cpu":
        notes.append("CPU: products over the curvature images cost samples / batch times one batch's")
    return Plan(cfg.name, str(study.device), cfg.data, cfg.model, pl.splits, len(runs), pl.sorted_stages(), pl.costs,
                notes, time.perf_counter() - t0)


def format_plan(plan: Plan) -> str:
    """The plan as a table: stage, count (with how it is made), time per unit, estimated time; the total."""
    sp = plan.splits
    head = (f"plan of study {plan.study!r} on {plan.device}: {plan.model} on {plan.data} ({sp['train']} training, "
            f"{sp['val']} validation, {sp['test']} test images), {plan.models} models")
    rows = [("stage", "count", "per unit", "estimated")]
    for s in plan.stages:
        count = f"{s.count:,.0f} {s.unit}{'s' if s.count != 1 else ''} ({s.how})"
        rows.append((s.name, count, format_duration(s.unit_s), format_duration(s.seconds)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head, ""]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}")
    lines.append(f"{'total':<{widths[0]}}  {'':<{widths[1]}}  {'':>{widths[2]}}  "
                 f"{format_duration(plan.total_s):>{widths[3]}}")
    lines += ["", "notes: " + "; ".join(plan.notes) + f"; planning took {plan.planning_s:.0f} s"]
    return "\n".join(lines)


def check_plan_json(path: str | os.PathLike) -> Path:
    """``path`` as the file a plan can be written to: not a folder, in an existing folder.

    Raises:
        StudyError: naming the path and the fix.
    """
    if str(path) == "" or Path(path).is_dir() or not Path(path).parent.is_dir():
        raise StudyError(f"--plan-json {path!s}: give a file name in an existing folder")
    return Path(path)


def write_plan_json(plan: Plan, path: str | os.PathLike) -> Path:
    """Write the plan as JSON to ``path`` (atomically; :func:`check_plan_json`)."""
    path = check_plan_json(path)
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")
    return path
