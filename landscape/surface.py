"""Loss and accuracy of a model on a 1-D line or a 2-D plane through its parameters.

``surface_1d`` evaluates ``theta + alpha * d`` and ``surface_2d`` ``theta + alpha * d1 + beta * d2``
on a grid, over the whole data (sample-weighted). The user's model is never written: every
engine works on a copy of it, or functionally. Four engines compute a grid point:

* ``"copy"``: one copy of the model (made once per surface, never per point) whose parameters
  are overwritten point by point, and a plain forward pass. The reference engine.
* ``"folded"``: a ``torch.fx`` trace of a copy in which every eval-mode BatchNorm that follows a
  convolution or linear layer is folded into it (an eval-mode BatchNorm is affine). The fold is
  redone at every point *after* the perturbation is applied to all parameters, BatchNorm weight
  and bias included (directions may move them); running statistics are buffers and never move.
  On the CPU, convolution models with 4-D inputs run in ``channels_last`` layout (parameters and
  inputs; oneDNN's convolutions and max-pooling are faster in it).
* ``"compiled"``: the folded graph through ``torch.compile`` of a function that takes the
  parameters as inputs (``torch.func.functional_call``), compiled once per surface and reused for
  every grid point (a new shape of input batch compiles once more; nothing compiles per point).
* ``"vmap"``: a chunk of points' parameters stacked and evaluated together by one
  ``torch.func.vmap`` of ``functional_call`` (pays where kernels are launch-bound, e.g. GPUs).

Which engine runs, and whether consecutive batches are merged into bigger ones, is decided by a
:class:`landscape.planner.Planner` (requested by the arguments, by a rule, or by timing a few
real grid points, whose values are kept when the timed engine wins) and recorded in
:attr:`SurfaceResult.engine`. Every number of a result comes from the one engine recorded there
(the few points that timed the losing batching keep their values: the batching changes only the
rounding of the sample-weighted sums).
The rules: with ``chunk_size="auto"`` the folded engine is used whenever the model can be
traced and folded (it does the work of the copy minus the BatchNorm layers; models with hooks,
tied parameters or untraceable code keep the copy), vmap is timed against it on accelerators
(on the CPU it is not: vmap turns convolutions into grouped ones), and ``compile="auto"``
compiles when the eager evaluation of the remaining grid, estimated from its first points, would
take at least ``_COMPILE_PAYS_S`` (300) seconds, then keeps the compiled engine only if it is
faster per point (compiling takes seconds; see BENCHMARKS.md, "Surface points (issue 13)").

Evaluations run in full float32 precision (no TF32, no autocast:
:func:`landscape.precision.full_precision`). NaN or Inf losses are NaN in the result (a surface
is expected to reach regions where the loss overflows); ``on_nonfinite="raise"`` raises
:class:`landscape.errors.NonFiniteError` instead, naming the first grid point and batch. Under
``torch.distributed`` the grid points are split across ranks (each rank evaluates its points on
the data it is given: pass every rank the whole evaluation set) and gathered, so every rank
returns the whole surface; every rank runs the engine rank 0 chose.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import random_directions, surface_2d
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    >>> s = surface_2d(model, nn.functional.cross_entropy, data, random_directions(model, 2), steps=5)
    >>> s.loss.shape
    (5, 5)
    >>> s.engine["surface"]["engine"]
    'folded'
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map

from . import _timing
from ._progress import bar as progress_bar
from .errors import NonFiniteError, check_policy
from .folded import Folded, to_channels_last
from .operator import as_batches, eval_mode, take, to_device
from .planner import Choice, Planner, distributed, short_error
from .precision import full_precision
from .results import Result

#: ``compile="auto"`` compiles when the eager evaluation of the rest of the grid is estimated at
#: this many seconds or more: compiling costs seconds (more in a fresh process) and, on the CPU,
#: saves only a fraction of each point over the folded graph (BENCHMARKS.md, issue 13).
_COMPILE_PAYS_S = 300.0
#: the ``torch.compile`` backend (a name or a callable; tests swap in a counting backend)
_COMPILE_BACKEND = "inductor"
#: grids of fewer points per process than this are not timed: their engines are chosen by rule
_MIN_TIMED_POINTS = 16
#: inputs converted to ``channels_last`` are kept for the whole surface up to this many bytes
_INPUT_CACHE_BYTES = 256 * 2 ** 20
#: time vmapped chunks on the CPU too (off: vmap turns convolutions into grouped ones there; tests turn it on)
_VMAP_ON_CPU = False


@dataclass(repr=False)
class SurfaceResult(Result):
    """A loss surface.

    Attributes:
        alphas: grid along the first direction.
        betas: grid along the second direction (2-D surfaces; ``None`` for 1-D).
        loss: loss at each grid point, shape (steps,) or (steps, steps) indexed [alpha, beta];
            NaN where the loss was not finite.
        accuracy: top-1 accuracy at each point (NaN when targets are not class labels).
        directions: the directions' metadata (kind, seed, normalization, norm).
        center_loss: the loss at the origin (the model itself).
        num_points, time_s: cost.
        engine: how the numbers were computed, :meth:`landscape.planner.Planner.to_dict`: by
            ``what``, ``"surface"`` (the engine that produced every number: ``"copy"``,
            ``"folded"``, ``"compiled"`` or ``"vmap"`` with its chunk in ``block``),
            ``"batching"`` (``"given"`` or ``"merged"`` batches) and ``"compile"`` (``"inductor"``
            or ``"none"``; its ``timings`` hold ``compile_s``, the one-time compile cost,
            ``graphs``, the number of graphs compiled, and ``eager_grid_s``, the estimate the
            ``"auto"`` rule used), each with how it was chosen
            (``"requested"``, ``"rule"`` or ``"timing"``), the timings (seconds per point) and
            the reason.
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    directions: list
    center_loss: float
    num_points: int
    time_s: float = 0.0
    engine: dict = field(default_factory=dict)


def _check_direction(model_params: dict, d: dict, i: int) -> None:
    unknown = [k for k in d if k not in model_params]
    if unknown:
        raise ValueError(f"direction {i} has entries that are not trainable parameters of the model: {unknown[:5]}")
    bad = [k for k in d if d[k].shape != model_params[k].shape]
    if bad:
        raise ValueError(f"direction {i}: shape mismatch for {bad[:5]}")


def _merge_batches(data, max_samples: int) -> list:
    """Concatenate consecutive tensor batches into batches of at most ``max_samples`` samples:
    a forward pass over bigger batches is cheaper per sample, and the result is the same
    (losses are sample-weighted)."""
    out, xs, ys, n = [], [], [], 0
    for b in data:
        x, y = b[0], b[1]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return list(data)
        if xs and (n + len(y) > max_samples or x.shape[1:] != xs[0].shape[1:]):
            out.append((torch.cat(xs), torch.cat(ys)))
            xs, ys, n = [], [], 0
        xs.append(x)
        ys.append(y)
        n += len(y)
    if xs:
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


class _Evaluator:
    """Evaluates loss and accuracy at ``theta + c @ dirs`` for rows ``c`` of a coordinate matrix,
    with any of the engines of the module docstring, on a list of batches."""

    def __init__(self, model, loss_fn, dirs, coords: torch.Tensor):
        self.model, self.loss_fn, self.coords = model, loss_fn, coords
        params = {n: p.detach() for n, p in model.named_parameters()}
        self.params = params
        self.moving = sorted({k for d in dirs for k in d})
        self.base = {k: params[k] for k in self.moving}
        self.fixed = {k: v for k, v in params.items() if k not in self.base}
        self.buffers = dict(model.named_buffers())
        self.dev = next(iter(params.values())).device
        self.dirs = [{k: v.to(self.base[k]) for k, v in d.items()} for d in dirs]
        self.classify = True
        self._copy = None
        self.folded: Folded | None = None
        self.fold_note = ""
        self._inputs: dict = {}

    # -- engines ------------------------------------------------------------------------------
    def prepare_folded(self, data: list) -> bool:
        """Build the folded graph (once) and check it against the model at the origin on a few
        samples; on failure, :attr:`fold_note` says why and the copy engine is the fallback."""
        if self.folded is not None:
            return True
        if self.fold_note:
            return False
        try:
            x0, y0 = data[0][0], data[0][1]
            x = to_device(take(x0, len(y0), min(16, len(y0))), self.dev)
            # channels_last: measured on the CPU only (accelerators keep their layout), for a 4-D tensor input
            cl = isinstance(x, torch.Tensor) and x.dim() == 4 and self.dev.type == "cpu"
            f = Folded(self.model, self.params, self.moving, channels_last=cl)
            with torch.inference_mode():
                ref = self.model(x)
                got = f.gm(to_channels_last(x) if f.channels_last else x)
            if not (isinstance(ref, torch.Tensor) and ref.shape == got.shape):
                raise ValueError("the traced graph's output differs in type or shape from the model's")
            tol = 1e-4 * float(ref.abs().max()) + 1e-6 if ref.numel() else 0.0
            if not bool(((got - ref).abs() <= tol).all() | ~torch.isfinite(ref).all()):
                raise ValueError("the folded graph's output differs from the model's at the origin")
        except Exception as e:  # noqa: BLE001 - any failure to trace or fold keeps the copy engine
            self.fold_note = f"no folding ({short_error(e)})"
            return False
        self.folded = f
        self.fold_note = (f"{len(f.pairs)} BatchNorm layer(s) folded"
                          + (", channels_last" if f.channels_last else ""))
        return True

    def _moved(self, c: torch.Tensor, base: dict, dirs: list) -> dict:
        out = {}
        for k in self.moving:
            t = base[k].clone()
            for j, d in enumerate(dirs):
                if k in d:
                    t.add_(d[k], alpha=float(c[j]))
            out[k] = t
        return out

    def _params_at(self, c: torch.Tensor) -> dict:
        out = {}
        for k in self.moving:
            t = self.base[k].unsqueeze(0).expand(len(c), *self.base[k].shape).clone()
            for j, d in enumerate(self.dirs):
                if k in d:
                    t += c[:, j].to(device=t.device, dtype=t.dtype).view(-1, *([1] * self.base[k].dim())) * d[k]
            out[k] = t
        return out

    def _xs(self, batches: list, cl: bool) -> list:
        key = (id(batches), cl)
        if key in self._inputs:
            return self._inputs[key][1]
        xs = [to_device(b[0], self.dev) for b in batches]  # any pytree of tensors
        if cl:
            xs = [tree_map(lambda t: to_channels_last(t) if isinstance(t, torch.Tensor) else t, x) for x in xs]
        size = sum(t.numel() * t.element_size() for x in xs for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor))
        if size <= _INPUT_CACHE_BYTES:
            self._inputs[key] = (batches, xs)  # the batches are kept alive with their key
        return xs

    def _accumulate(self, out, y, b, acc):
        loss = float(self.loss_fn(out, y))
        if acc[2] is None and not math.isfinite(loss):
            acc[2] = b
        acc[0] += len(y) * loss
        if self.classify and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
            acc[1] += float((out.argmax(-1) == y).sum())
        else:
            self.classify = False

    def evaluate(self, engine: str, rows, batches: list, chunk: int = 1, coords: torch.Tensor | None = None) -> dict:
        """``{row: [loss sum, correct, first non-finite batch or None]}`` for ``rows`` of the
        coordinates (``coords``, default: the surface's)."""
        coords = self.coords if coords is None else coords
        rows = list(rows)
        out = {r: [0.0, 0.0, None] for r in rows}
        ys = [b[1].to(self.dev) for b in batches]
        if engine == "vmap":
            self._evaluate_vmap(rows, batches, ys, chunk, coords, out)
        elif engine == "copy":
            self._evaluate_copy(rows, batches, ys, coords, out)
        else:
            self._evaluate_folded(engine, rows, batches, ys, coords, out)
        return out

    def _evaluate_vmap(self, rows, batches, ys, chunk, coords, out) -> None:
        """``chunk`` grid points at a time through ``torch.func.vmap`` of a functional call."""
        f = vmap(lambda p, x: functional_call(self.model, {**self.fixed, **self.buffers, **p}, (x,)),
                 in_dims=(0, None))
        xs = self._xs(batches, False)
        with torch.no_grad():
            for s in range(0, len(rows), chunk):
                part = rows[s:s + chunk]
                stacked = self._params_at(coords[part])
                for b, (x, y) in enumerate(zip(xs, ys)):
                    for r, o in zip(part, f(stacked, x)):
                        self._accumulate(o, y, b, out[r])

    def _evaluate_copy(self, rows, batches, ys, coords, out) -> None:
        """One copy of the model for the whole surface, its parameters written per grid point."""
        if self._copy is None:
            self._copy = copy.deepcopy(self.model).eval()  # one copy for the whole surface
            self._copy_params = dict(self._copy.named_parameters())
        xs = self._xs(batches, False)
        for r in rows:
            with torch.no_grad():
                for k, t in self._moved(coords[r], self.base, self.dirs).items():
                    self._copy_params[k].copy_(t)
            with torch.inference_mode():
                for b, (x, y) in enumerate(zip(xs, ys)):
                    self._accumulate(self._copy(x), y, b, out[r])

    def _evaluate_folded(self, engine, rows, batches, ys, coords, out) -> None:
        """The folded graph (BatchNorm folded, eval mode), eager or compiled."""
        f = self.folded
        if f is None:
            raise RuntimeError(f"the {engine} engine needs a folded graph: {self.fold_note}")
        if not hasattr(self, "_fbase"):
            self._fbase = {k: f.params[k] for k in self.moving}
            fmt = to_channels_last if f.channels_last else (lambda t: t)
            self._fdirs = [{k: fmt(v) for k, v in d.items()} for d in self.dirs]
        xs = self._xs(batches, f.channels_last)
        fwd = f.compiled(_COMPILE_BACKEND) if engine == "compiled" else None
        for r in rows:
            with torch.no_grad():
                values = f.values(self._moved(coords[r], self._fbase, self._fdirs))
                if fwd is None:
                    f.write(values)
            if fwd is None:
                with torch.inference_mode():
                    for b, (x, y) in enumerate(zip(xs, ys)):
                        self._accumulate(f.gm(x), y, b, out[r])
            else:
                with torch.no_grad():
                    for b, (x, y) in enumerate(zip(xs, ys)):
                        self._accumulate(fwd(values, x), y, b, out[r])


class _Plan:
    """The engine decisions of one surface and the grid points evaluated so far, by engine.

    A point evaluated by an engine keeps its value for that engine whatever the batching it was
    evaluated with (the batching changes only the rounding of the sample-weighted sums), except
    a non-finite one, which is evaluated again with the final batching so that the error names
    the batch as the result's batching counts them.
    """

    def __init__(self, ev: _Evaluator, planner: Planner, n: int):
        self.ev, self.planner, self.n = ev, planner, n
        # (engine, chunk) -> {row: [loss sum, correct, bad batch, id(batches)]}
        self.done: dict = {}
        self.compile_info: dict = {}  # compile_s, graphs (set by _compile)

    def run(self, engine: str, rows, batches: list, chunk: int = 1) -> float:
        """Evaluate ``rows`` (keeping the values) and return the seconds it took."""
        t0 = time.perf_counter()
        got = self.ev.evaluate(engine, rows, batches, chunk)
        dt = time.perf_counter() - t0
        self.done.setdefault((engine, chunk), {}).update({r: [*v, id(batches)] for r, v in got.items()})
        return dt

    def todo(self, engine: str, batches: list, chunk: int = 1) -> list:
        """The rows ``engine`` has not evaluated yet (non-finite ones: not with ``batches``)."""
        have = self.done.get((engine, chunk), {})
        return [r for r in range(self.n) if r not in have or (have[r][2] is not None and have[r][3] != id(batches))]

    def timed_rows(self, engine: str, batches: list, chunk: int = 1, count: int = 1) -> float:
        """Seconds per point of ``engine``: one untimed point (warm-up), then ``count`` points
        timed by :func:`landscape._timing.timed`; the rows are the next ones it has not done."""
        rows = self.todo(engine, batches, chunk)
        if len(rows) < count + 1:
            rows = rows + [r for r in range(self.n) if r not in rows]
        rows = (rows * (count + 1))[:count + 1]
        self.run(engine, rows[:1], batches, chunk)
        dt = _timing.timed(lambda: self.run(engine, rows[1:], batches, chunk), self.ev.dev)[1]
        return dt / max(1, len(rows) - 1)


def _choose(ev, plan, planner, data, chunk, compile, max_batch, per_rank, n_mine):
    """Make the batching and engine decisions; returns ``(engine, chunk, batches)``."""
    eager, requested = _engine_family(ev, data, chunk, compile)
    probe = eager if eager != "vmap" else "copy"  # the engine the batching is timed with
    batches, t_point = _batching(ev.dev, plan, planner, data, max_batch, per_rank, probe)
    if requested:
        return _requested_engine(ev, plan, planner, eager, chunk, compile, batches, t_point)
    return _automatic_engine(ev, plan, planner, eager, compile, batches, t_point, per_rank, n_mine)


def _engine_family(ev, data, chunk, compile) -> tuple[str, bool]:
    """The engine family, requested or the folded graph when the model folds: ``(engine, requested)``."""
    if chunk != "auto":
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk_size must be 'auto' or a positive integer, got {chunk!r}")
    if chunk != "auto" and chunk > 1:
        if compile is True:
            raise ValueError("compile=True evaluates one point per call: chunk_size must be 'auto' or 1")
        eager, requested = "vmap", True
    elif compile is True:
        eager = "folded" if ev.prepare_folded(data) else "copy"
        requested = True
    elif chunk == 1:
        eager, requested = "copy", True
    else:
        eager = "folded" if ev.prepare_folded(data) else "copy"
        requested = False
    return eager, requested


def _batching(dev, plan, planner, data, max_batch, per_rank, probe) -> tuple[list, float | None]:
    """The batches the surface is evaluated with, and the time of one point when it was timed."""
    batches, t_point = data, None
    if max_batch is None:
        merged = _merge_batches(data, 4096)
        if len(merged) >= len(data):
            planner.record(Choice("batching", "given", "rule", reason="no consecutive batches to merge"))
        elif per_rank < _MIN_TIMED_POINTS and dev.type != "cpu":
            batches = merged
            planner.record(Choice("batching", "merged", "rule", reason=f"accelerators: merged up to 4096 samples "
                                                                       f"(fewer than {_MIN_TIMED_POINTS} points per "
                                                                       "process: not timed)"))
        elif per_rank < _MIN_TIMED_POINTS:
            planner.record(Choice("batching", "given", "rule",
                                  reason=f"fewer than {_MIN_TIMED_POINTS} points per process: not timed"))
        else:
            # bigger batches are not always cheaper per sample: on the CPU activations that leave
            # the caches, page faults of large allocations, fewer, larger operations where the
            # cores are oversubscribed; on an accelerator the kernels' shapes: time one point each way
            c = planner.decide("batching", {"given": lambda: plan.timed_rows(probe, data),
                                            "merged": lambda: plan.timed_rows(probe, merged)}, catch=())
            batches = merged if c.engine == "merged" else data
            t_point = c.timings[c.engine]
    else:
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 0:
            raise ValueError(f"max_batch must be None or an integer >= 0, got {max_batch!r}")
        if max_batch:
            batches = _merge_batches(data, max_batch)
        planner.record(Choice("batching", "merged" if len(batches) < len(data) else "given", "requested",
                              reason=f"max_batch={max_batch}"))
    return batches, t_point


def _requested_engine(ev, plan, planner, eager, chunk, compile, batches, t_point):
    """The engine that ``chunk_size`` / ``compile=True`` asked for (compiled when it compiles)."""
    note = ev.fold_note
    if eager == "vmap":
        planner.record(Choice("compile", "none", "requested" if compile is False else "rule",
                              reason="vmapped chunks are not compiled"))
        planner.record(Choice("surface", "vmap", "requested", reason=f"chunk_size={chunk}", block=chunk))
        return "vmap", chunk, batches
    if compile is True:
        ok, err, t_c = _compile(plan, batches)
        planner.record(Choice("compile", "inductor" if ok else "none", "requested", dict(plan.compile_info),
                              {} if ok else {"inductor": err}, reason="compile=True"))
        if ok:
            planner.record(Choice("surface", "compiled", "requested", {"compiled": t_c},
                                  reason=f"compile=True; {note}"))
            return "compiled", 1, batches
        warnings.warn(f"surface: compile=True failed, evaluating eagerly ({err})", RuntimeWarning, stacklevel=5)
        planner.record(Choice("surface", eager, "rule", {} if t_point is None else {eager: t_point},
                              {"compiled": err}, reason=f"compile=True failed; {note}"))
        return eager, 1, batches
    planner.record(Choice("compile", "none", "requested" if compile is False else "rule",
                          reason="chunk_size=1: point by point on a plain copy of the model"))
    planner.record(Choice("surface", "copy", "requested", reason="chunk_size=1"))
    return "copy", 1, batches


def _automatic_engine(ev, plan, planner, eager, compile, batches, t_point, per_rank, n_mine):
    """``"auto"``: time vmap on accelerators, compile when the grid is long enough to pay."""
    dev, note = ev.dev, ev.fold_note
    candidates, errors = {}, {}
    if dev.type == "cpu" and not _VMAP_ON_CPU:
        errors["vmap"] = "rule: not on the CPU (vmap turns convolutions into grouped ones, slower per point)"
    elif per_rank < _MIN_TIMED_POINTS:
        errors["vmap"] = f"rule: fewer than {_MIN_TIMED_POINTS} points per process, not timed"
    else:
        candidates["vmap@8"] = lambda: plan.timed_rows("vmap", batches, 8, count=8)
    want_compile, why = False, ""
    if compile is False:
        planner.record(Choice("compile", "none", "requested", reason="compile=False"))
    elif eager != "folded":
        planner.record(Choice("compile", "none", "rule", reason=f"compiles the folded graph only: {note}"))
    elif distributed():
        planner.record(Choice("compile", "none", "rule",
                              reason="under torch.distributed 'auto' does not compile "
                                     "(every rank would have to agree)"))
    else:
        if t_point is None and n_mine:
            plan.run(eager, plan.todo(eager, batches)[:1], batches)  # warm-up, a real point
            rows = plan.todo(eager, batches)[:1]
            t_point = plan.run(eager, rows, batches) if rows else None
        left = len(plan.todo(eager, batches))
        est = (t_point or 0.0) * left
        want_compile = est >= _COMPILE_PAYS_S
        why = (f"the eager evaluation of the remaining {left} points is estimated at {est:.3g} s, "
               f"{'>=' if want_compile else '<'} {_COMPILE_PAYS_S:g} s")
        if not want_compile:
            planner.record(Choice("compile", "none", "rule", {"eager_grid_s": est}, reason=why))
            errors["compiled"] = "rule: " + why
    if t_point is not None and (candidates or want_compile):
        candidates[eager] = lambda: t_point
    elif candidates:
        candidates[eager] = lambda: plan.timed_rows(eager, batches)
    if want_compile:
        def compiled():
            ok, err, t_c = _compile(plan, batches)
            if not ok:
                raise RuntimeError(err)
            return t_c

        candidates["compiled"] = compiled
    if not candidates:
        planner.record(Choice("surface", eager, "rule", errors=errors, reason=note if eager == "folded" else
                              f"{note}: the model as given"))
        return eager, 1, batches
    c = planner.decide("surface", candidates, names=(eager, "vmap@8", "compiled"), errors=errors,
                       catch=(Exception,))
    c.reason = note
    if want_compile:
        won = c.engine == "compiled"
        planner.record(Choice("compile", "inductor" if won else "none", "rule",
                              {"eager_grid_s": est, **plan.compile_info},
                              {k: v for k, v in c.errors.items() if k == "compiled"},
                              reason=why + ("" if won or "compiled" not in c.timings else
                                            "; compiled, but slower per point than the eager engine")))
    return c.engine, (c.block or 1), batches


def _compile(plan: _Plan, batches: list) -> tuple[bool, str, float | None]:
    """Compile the folded graph on a real point (its value kept) and time one more; records the
    one-time cost in ``plan.compile_info``. Returns ``(ok, error, seconds per point)``."""
    ev = plan.ev
    plan.compile_info = {}
    if ev.folded is None:
        return False, f"nothing to compile: {ev.fold_note}", None
    try:
        rows = plan.todo("compiled", batches)[:2] or [0, 0]
        t_first = plan.run("compiled", rows[:1], batches)
        t_c = _timing.timed(lambda: plan.run("compiled", rows[1:] or rows[:1], batches), ev.dev)[1]
    except Exception as e:  # noqa: BLE001 - a backend that cannot compile leaves the eager engine
        return False, short_error(e), None
    plan.compile_info = {"compile_s": max(0.0, t_first - t_c), "graphs": float(ev.folded.compiles)}
    return True, "", t_c


@full_precision()
def _surface(model, loss_fn, data, dirs, grids, chunk, progress, max_batch, on_nonfinite="nan", name="surface",
             compile="auto"):
    t0 = time.perf_counter()
    if not (compile is True or compile is False or compile == "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    data = as_batches(data)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for i, d in enumerate(dirs):
        _check_direction(params, d, i)
    mesh = torch.meshgrid(*[torch.as_tensor(g, dtype=torch.float64) for g in grids], indexing="ij")
    coords = torch.stack([m.reshape(-1) for m in mesh], 1)
    P = coords.shape[0]
    world, rank = 1, 0
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    mine = torch.arange(rank, P, world)  # grid points split across ranks
    zero = torch.nonzero((coords == 0).all(1)).flatten()  # the origin, when it is a grid point
    with eval_mode(model):
        data = list(data)
        if not data:
            raise ValueError("data is empty: a surface needs at least one (inputs, targets) batch")
        own = coords[mine] if len(mine) else coords[:1]
        ev = _Evaluator(model, loss_fn, dirs, own)
        planner = Planner(ev.dev)
        plan = _Plan(ev, planner, len(mine))
        engine, size, batches = _choose(ev, plan, planner, data, chunk, compile, max_batch, P // world, len(mine))
        key = (engine, size)
        todo = plan.todo(engine, batches, size)
        bar = progress_bar(progress, len(mine), name, "point")
        bar.update(len(mine) - len(todo))
        step = size if engine == "vmap" else 1
        for s in range(0, len(todo), step):
            plan.run(engine, todo[s:s + step], batches, size)
            bar.update(len(todo[s:s + step]))
        bar.close()
        got = plan.done.get(key, {})
        n_total = sum(len(b[1]) for b in batches)
        loss = torch.tensor([got[r][0] for r in range(len(mine))], dtype=torch.float64) / max(n_total, 1)
        acc = torch.tensor([got[r][1] for r in range(len(mine))], dtype=torch.float64) / max(n_total, 1)
        loss[~torch.isfinite(loss)] = float("nan")
        bad_here = next(((r, got[r][2]) for r in range(len(mine)) if got[r][2] is not None), None)
        center_bad = None
        if not len(zero):  # the origin is not on the grid: one more point, by the same engine
            r0 = ev.evaluate(engine, [0], batches, size, coords=torch.zeros(1, len(dirs), dtype=torch.float64))[0]
            center = r0[0] / max(n_total, 1)
            center = center if math.isfinite(center) else float("nan")
            center_bad = r0[2]
        if not ev.classify:
            acc = torch.full_like(acc, float("nan"))
    full = torch.zeros(2, P, dtype=torch.float64)
    full[0, mine], full[1, mine] = loss, acc
    if world > 1:
        dev = next(model.parameters()).device
        buf = torch.nan_to_num(full, nan=0.0).to(dev)
        nanmask = torch.zeros_like(full, dtype=torch.float64)
        nanmask[:, mine] = torch.isnan(full[:, mine]).double()
        nanmask = nanmask.to(dev)
        dist.all_reduce(buf)
        dist.all_reduce(nanmask)
        full = buf.cpu()
        full[nanmask.cpu() > 0] = float("nan")
    if len(zero):
        center = float(full[0, int(zero[0])])
    if on_nonfinite == "raise" and not bool(torch.isfinite(full[0]).all() and np.isfinite(center)):
        if bad_here is not None:  # this rank's first bad point (batches as merged: a merged batch spans several)
            i, b = bad_here
            point = ", ".join(f"{v:.4g}" for v in coords[mine[i]].tolist())
            raise NonFiniteError(name, "loss", b, f" at the grid point ({point})"
                                 + (" (consecutive batches were merged; max_batch=0 keeps them)"
                                    if len(batches) != len(data) else ""))
        raise NonFiniteError(name, "loss", None, " at the model itself (the origin)" if center_bad is not None
                             else " at a point of another process")
    shape = tuple(len(g) for g in grids)
    meta = [dict(getattr(d, "meta", {"norm": float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))}))
            for d in dirs]
    return (full[0].reshape(shape).numpy(), full[1].reshape(shape).numpy(), meta, float(center), P,
            time.perf_counter() - t0, planner.to_dict())


def _grid(span, steps, name):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {steps!r}")
    lo, hi = span
    if not lo <= hi:
        raise ValueError(f"span must be (low, high) with low <= high, got {span}")
    return np.linspace(lo, hi, steps)


def surface_1d(model: nn.Module, loss_fn, data, direction: dict, span=(-1.0, 1.0), steps: int = 41, *,
               chunk_size="auto", max_batch: int | None = None, progress: bool = True,
               on_nonfinite: str = "nan", compile: bool | str = "auto") -> SurfaceResult:
    """Loss and accuracy along ``theta + alpha * direction`` for ``alpha`` in ``span``.

    Args:
        model: any ``nn.Module`` (evaluated in eval mode, never modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        data: one ``(inputs, targets)`` batch or a re-iterable of them; inputs may be any
            pytree of tensors (a dict passed to ``forward(self, batch)``), as for the operator.
        direction: ``{parameter name: tensor}`` (a :class:`landscape.directions.Direction`).
        span, steps: the grid of ``alpha``.
        chunk_size: ``"auto"`` (default): the engine is chosen by the planner (the folded
            graph when the model folds; vmapped chunks of 8 timed against it on accelerators);
            1: point by point on a plain copy of the model (the reference engine); an integer
            above 1: that many grid points per vmapped pass (memory grows with it).
        max_batch: consecutive data batches are merged up to this many samples per pass; 0 never
            merges; ``None`` times one point both ways (for grids of 16 points or more per
            process; below that it merges up to 4096 on accelerators and keeps the given batches
            on the CPU) and keeps the faster.
        on_nonfinite: ``"nan"`` (default): a point whose loss is NaN or Inf is NaN in the
            result; ``"raise"``: :class:`landscape.errors.NonFiniteError` naming the point and
            batch (after the whole grid is evaluated).
        compile: ``True``: evaluate with the ``torch.compile``-d folded graph (compiled once per
            surface; a failure to compile warns and evaluates eagerly); ``False``: never
            compile; ``"auto"`` (default): compile when the eager evaluation of the rest of the
            grid, estimated from its first points, would take at least 300 s, and keep the
            compiled engine if it is faster per point. Not with ``chunk_size`` above 1.
        progress: a progress bar over the grid points (shown after 2 s; ``False`` silences it).
            A 21 x 21 grid is 441 forward passes over ``data``: on a 2-core CPU, 33 s for
            torchvision's resnet18 on 64 images.

    Returns:
        A :class:`SurfaceResult`; its ``engine`` says which engine computed the numbers.

    Raises:
        ValueError: bad steps, span, chunk_size, max_batch, compile or on_nonfinite; directions
            that do not match the model's trainable parameters; empty data.
    """
    check_policy(on_nonfinite)
    alphas = _grid(span, steps, "steps")
    loss, acc, meta, center, P, t, engine = _surface(model, loss_fn, data, [direction], [alphas], chunk_size, progress,
                                                     max_batch, on_nonfinite, "surface_1d", compile)
    return SurfaceResult(alphas, None, loss, acc, meta, center, P, t, engine)


def surface_2d(model: nn.Module, loss_fn, data, dirs, span=(-1.0, 1.0), steps: int = 21, *,
               chunk_size="auto", max_batch: int | None = None, progress: bool = True,
               on_nonfinite: str = "nan", compile: bool | str = "auto") -> SurfaceResult:
    """Loss and accuracy on ``theta + alpha * d1 + beta * d2`` over ``span x span`` (``steps``
    points each way). ``dirs`` is a pair of directions; the result is indexed ``[alpha, beta]``.
    Other arguments as for :func:`surface_1d`."""
    check_policy(on_nonfinite)
    if len(dirs) != 2:
        raise ValueError(f"surface_2d needs two directions, got {len(dirs)}")
    g = _grid(span, steps, "steps")
    loss, acc, meta, center, P, t, engine = _surface(model, loss_fn, data, list(dirs), [g, g], chunk_size, progress,
                                                     max_batch, on_nonfinite, "surface_2d", compile)
    return SurfaceResult(g, g, loss, acc, meta, center, P, t, engine)
