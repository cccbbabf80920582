"""Loss and accuracy of a model on a 1-D line or a 2-D plane through its parameters.

``surface_1d`` evaluates ``theta + alpha * d`` and ``surface_2d`` ``theta + alpha * d1 + beta * d2``
on a grid, over the whole data (sample-weighted). Two evaluation paths, chosen by timing unless
``chunk_size`` says (on the CPU, the copy path), either a chunk of points' parameters stacked and evaluated together by one
``torch.func.vmap`` of ``torch.func.functional_call``, or one copy of the model (made once per
surface, never per point) whose parameters are overwritten point by point. On a 2-core CPU
the second is 2-4x faster for small CNNs (vmap turns convolutions into slower grouped ones and
falls back to loops for some pooling ops); the first can pay on GPUs. The user's model itself is
never written (it is in eval mode during the evaluation, every module's flag restored after).
Evaluations run in full float32 precision (no TF32, no autocast:
:func:`landscape.precision.full_precision`). NaN or Inf losses are NaN in the result (a surface
is expected to reach regions where the loss overflows); ``on_nonfinite="raise"`` raises
:class:`landscape.errors.NonFiniteError` instead, naming the first grid point and batch. Under
``torch.distributed`` the grid points are split across ranks (each rank evaluates its points on
the data it is given: pass every rank the whole evaluation set) and gathered, so every rank
returns the whole surface.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import random_directions, surface_2d
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    >>> s = surface_2d(model, nn.functional.cross_entropy, data, random_directions(model, 2), steps=5)
    >>> s.loss.shape
    (5, 5)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ._timing import timed
from .errors import NonFiniteError, check_policy
from .hessian import _as_batches, eval_mode
from .precision import full_precision
from .results import Result


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
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    directions: list
    center_loss: float
    num_points: int
    time_s: float = 0.0


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
    """Evaluates loss and accuracy at ``theta + c @ dirs`` for rows ``c`` of a coordinate matrix.

    ``"copy"``: one copy of the model for the whole surface, its parameters overwritten per point,
    a plain forward pass (fast on the CPU). ``"vmap"``: a chunk of points' parameters stacked and
    evaluated by one vmapped ``functional_call`` (pays where kernels are launch-bound, e.g. GPUs).
    """

    def __init__(self, model, loss_fn, data, dirs):
        self.model, self.loss_fn, self.data, self.dirs = model, loss_fn, data, dirs
        params = {n: p.detach() for n, p in model.named_parameters()}
        self.moving = sorted({k for d in dirs for k in d})
        self.base = {k: params[k] for k in self.moving}
        self.fixed = {k: v for k, v in params.items() if k not in self.base}
        self.buffers = dict(model.named_buffers())
        self.dev = next(iter(params.values())).device
        self.classify = True
        self._copy = None
        self.first_bad: tuple[int, int] | None = None  # (row of coords, batch) of the first non-finite loss

    def _params_at(self, c: torch.Tensor) -> dict:
        out = {}
        for k in self.moving:
            t = self.base[k].unsqueeze(0).expand(len(c), *self.base[k].shape).clone()
            for j, d in enumerate(self.dirs):
                if k in d:
                    t += c[:, j].to(device=t.device, dtype=t.dtype).view(-1, *([1] * self.base[k].dim())) * d[k].to(t)
            out[k] = t
        return out

    def _accumulate(self, out, y, loss_sum, correct, i, batch):
        loss = float(self.loss_fn(out, y))
        if self.first_bad is None and not math.isfinite(loss):
            self.first_bad = (i, batch)
        loss_sum[i] += len(y) * loss
        if self.classify and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
            correct[i] += float((out.argmax(-1) == y).sum())
        else:
            self.classify = False

    def run(self, coords: torch.Tensor, mode: str, chunk: int, progress: bool = False):
        P = coords.shape[0]
        loss_sum = torch.zeros(P, dtype=torch.float64)
        correct = torch.zeros(P, dtype=torch.float64)
        n_total = sum(len(b[1]) for b in self.data)
        step = 1 if mode == "copy" else chunk
        bar = tqdm(total=P, desc="surface", leave=False, disable=not progress)
        if mode == "copy" and self._copy is None:
            import copy

            self._copy = copy.deepcopy(self.model).eval()  # one copy for the whole surface
        with torch.no_grad():
            for start in range(0, P, step):
                c = coords[start:start + step]
                stacked = self._params_at(c)
                if mode == "copy":
                    named = dict(self._copy.named_parameters())
                    for k, t in stacked.items():
                        named[k].copy_(t[0])
                    with torch.inference_mode():
                        for b, (x, y) in enumerate(self.data):
                            self._accumulate(self._copy(x.to(self.dev)), y.to(self.dev), loss_sum, correct, start, b)
                else:
                    f = vmap(lambda p, x: functional_call(self.model, {**self.fixed, **self.buffers, **p}, (x,)),
                             in_dims=(0, None))
                    for b, (x, y) in enumerate(self.data):
                        outs = f(stacked, x.to(self.dev))
                        for i, o in enumerate(outs):
                            self._accumulate(o, y.to(self.dev), loss_sum, correct, start + i, b)
                bar.update(len(c))
        bar.close()
        loss = loss_sum / max(n_total, 1)
        loss[~torch.isfinite(loss)] = float("nan")
        acc = correct / max(n_total, 1)
        return loss, acc

    def choose(self, coords: torch.Tensor, chunk) -> tuple[str, int]:
        """``chunk="auto"``: on the CPU, point by point on a copy (vmap measured 2-4x slower per
        point on small CNNs, so timing it would only add cost); on other devices, time one point by
        copy and a chunk of 8 by vmap and keep the faster."""
        if chunk != "auto":
            if not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"chunk_size must be 'auto' or a positive integer, got {chunk!r}")
            return ("copy", 1) if chunk == 1 else ("vmap", chunk)
        if self.dev.type == "cpu":
            return "copy", 1
        probe = coords[:1]
        self.run(probe, "copy", 1)
        t_copy = timed(lambda: self.run(probe, "copy", 1), self.dev)[1]
        try:
            eight = coords[:8].repeat(max(1, 8 // len(coords[:8])), 1)[:8]
            t_vmap = timed(lambda: self.run(eight, "vmap", 8), self.dev)[1] / len(eight)
        except (RuntimeError, NotImplementedError):
            return "copy", 1
        return ("vmap", 8) if t_vmap < t_copy else ("copy", 1)


def _faster_batching(model, loss_fn, data, merged, dirs, point) -> int:
    """4096 if one point over the merged batches is faster than over the given ones, else 0."""
    times = []
    for batches in (data, merged):
        ev = _Evaluator(model, loss_fn, batches, dirs)
        ev.run(point, "copy", 1)  # warm-up (and the model copy)
        times.append(timed(lambda: ev.run(point, "copy", 1), ev.dev)[1])
    return 4096 if times[1] < times[0] else 0


@full_precision()
def _surface(model, loss_fn, data, dirs, grids, chunk, progress, max_batch, on_nonfinite="nan", name="surface"):
    t0 = time.perf_counter()
    data = _as_batches(data)
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
    with eval_mode(model):
        data = list(data)
        if max_batch is None:
            dev = next(iter(params.values())).device
            max_batch = 4096
            merged = _merge_batches(data, max_batch)
            # on the CPU, bigger batches are not always cheaper per sample (the digits CNN, 256 vs
            # 1,797 samples: either was faster, by up to 1.7x, from one run to the next): time one
            # point each way when the grid is large enough to pay for it
            if dev.type == "cpu" and len(merged) < len(data) and len(mine) >= 16:
                max_batch = _faster_batching(model, loss_fn, data, merged, dirs, coords[mine[:1]])
        batches = _merge_batches(data, max_batch) if max_batch else data
        ev = _Evaluator(model, loss_fn, batches, dirs)
        mode, size = ev.choose(coords[mine] if len(mine) else coords[:1], chunk)
        ev.first_bad = None  # the timing runs of choose() are not the surface
        loss, acc = ev.run(coords[mine], mode, size, progress)
        bad_here = ev.first_bad
        center, _ = ev.run(torch.zeros(1, len(dirs), dtype=torch.float64), mode, 1)
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
    if on_nonfinite == "raise" and not bool(torch.isfinite(full[0]).all() and np.isfinite(float(center[0]))):
        if bad_here is not None:  # this rank's first bad point (batches as merged: a merged batch spans several)
            i, b = bad_here
            point = ", ".join(f"{v:.4g}" for v in coords[mine[i]].tolist())
            raise NonFiniteError(name, "loss", b, f" at the grid point ({point})"
                                 + (" (consecutive batches were merged; max_batch=0 keeps them)"
                                    if len(batches) != len(data) else ""))
        raise NonFiniteError(name, "loss", None, " at the model itself (the origin)" if ev.first_bad
                             else " at a point of another process")
    shape = tuple(len(g) for g in grids)
    meta = [dict(getattr(d, "meta", {"norm": float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))}))
            for d in dirs]
    return (full[0].reshape(shape).numpy(), full[1].reshape(shape).numpy(), meta, float(center[0]), P,
            time.perf_counter() - t0)


def _grid(span, steps, name):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {steps!r}")
    lo, hi = span
    if not lo <= hi:
        raise ValueError(f"span must be (low, high) with low <= high, got {span}")
    return np.linspace(lo, hi, steps)


def surface_1d(model: nn.Module, loss_fn, data, direction: dict, span=(-1.0, 1.0), steps: int = 41, *,
               chunk_size="auto", max_batch: int | None = None, progress: bool = False,
               on_nonfinite: str = "nan") -> SurfaceResult:
    """Loss and accuracy along ``theta + alpha * direction`` for ``alpha`` in ``span``.

    Args:
        model: any ``nn.Module`` (evaluated in eval mode, never modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        data: one ``(inputs, targets)`` batch or a re-iterable of them.
        direction: ``{parameter name: tensor}`` (a :class:`landscape.directions.Direction`).
        span, steps: the grid of ``alpha``.
        chunk_size: grid points evaluated together by one vmapped pass (memory grows with it);
            1 evaluates point by point on one copy of the model; ``"auto"``: 1 on the CPU, else
            both timed on the first points and the faster kept.
        max_batch: consecutive data batches are merged up to this many samples per pass; 0 never
            merges; ``None`` merges up to 4096 on accelerators and, on the CPU, times one point
            both ways (for grids of 16 points or more) and keeps the faster.
        on_nonfinite: ``"nan"`` (default): a point whose loss is NaN or Inf is NaN in the
            result; ``"raise"``: :class:`landscape.errors.NonFiniteError` naming the point and
            batch (after the whole grid is evaluated).
    """
    check_policy(on_nonfinite)
    alphas = _grid(span, steps, "steps")
    loss, acc, meta, center, P, t = _surface(model, loss_fn, data, [direction], [alphas], chunk_size, progress,
                                             max_batch, on_nonfinite, "surface_1d")
    return SurfaceResult(alphas, None, loss, acc, meta, center, P, t)


def surface_2d(model: nn.Module, loss_fn, data, dirs, span=(-1.0, 1.0), steps: int = 21, *,
               chunk_size="auto", max_batch: int | None = None, progress: bool = False,
               on_nonfinite: str = "nan") -> SurfaceResult:
    """Loss and accuracy on ``theta + alpha * d1 + beta * d2`` over ``span x span`` (``steps``
    points each way). ``dirs`` is a pair of directions; the result is indexed ``[alpha, beta]``.
    Other arguments as for :func:`surface_1d`."""
    check_policy(on_nonfinite)
    if len(dirs) != 2:
        raise ValueError(f"surface_2d needs two directions, got {len(dirs)}")
    g = _grid(span, steps, "steps")
    loss, acc, meta, center, P, t = _surface(model, loss_fn, data, list(dirs), [g, g], chunk_size, progress, max_batch,
                                             on_nonfinite, "surface_2d")
    return SurfaceResult(g, g, loss, acc, meta, center, P, t)
