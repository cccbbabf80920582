"""The base of every curvature operator: parameters, data streaming, sample-weighted accumulation.

:class:`BaseOperator` owns what every way of computing Hessian products shares (after
curvlinops' ``CurvatureLinearOperator``): the selected parameters (all, or names and glob
patterns), the loss as a function of them (``torch.func.functional_call`` on detached copies:
the user's model is never written), one pass over the data per product, the sample-weighted
accumulation over batches and processes (``torch.distributed``), the NaN/Inf checks, the
gradient, and the SciPy export. The products themselves come from the engines in
:mod:`landscape.engines`; :class:`landscape.HessianOperator` chooses between them.

**Batches.** ``data`` is one ``(inputs, targets)`` pair or a re-iterable of them. Inputs may be
any pytree of tensors (a tensor, a tuple, a dict passed to ``forward(self, batch)``); a batch's
sample count is ``len(targets)``.

**Reduction.** The operator represents the Hessian of the loss *over the whole data*:

* ``reduction="mean"``: ``H = sum_b (n_b / N) Hess(L_b)`` with ``L_b`` the batch's mean loss,
  the Hessian of the mean over all ``N`` samples;
* ``reduction="sum"``: ``H = sum_b Hess(L_b)`` with ``L_b`` the batch's summed loss, the Hessian
  of the summed loss (as curvlinops defines it);
* ``reduction="auto"`` (default): what the loss declares (an ``nn.Module``'s ``reduction``
  attribute, a ``functools.partial``'s ``reduction`` keyword, or the default of a function's
  ``reduction`` parameter, as for ``torch.nn.functional.cross_entropy``); else a test on the
  first batch of two samples or more: the loss of the whole batch against the losses of its two
  halves (a mean satisfies ``L = (h L_1 + (n - h) L_2) / n``, a sum ``L = L_1 + L_2``). The
  inference warns (:class:`ReductionWarning`) with its reason; a loss that satisfies neither, or
  data of one-sample batches only, is an error asking for ``reduction=``. The decision and its
  reason are recorded in :attr:`BaseOperator.planner` under ``"reduction"``.

**The same data on every pass.** A product is a pass over the data, and an operator is only
linear (and symmetric) if every pass sees the same batches. Each pass records the batches'
sizes and a checksum (the float64 sum of every input and target tensor, computed on the
operator's device) and compares them with the first complete pass: a shuffling loader, a
``drop_last`` loader over shuffled data, or a generator that is exhausted after one pass raises
:class:`DataChangedError` naming the batch, instead of a silently wrong answer. The checksums stay
on the device and are compared there once per pass; the answer is read with the pass's NaN/Inf
flags, in the pass's one host read (:meth:`BaseOperator.reduce`).

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> op = HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"),
    ...                      (torch.randn(16, 4), torch.randint(0, 3, (16,))))
    >>> op.matvec(torch.randn(op.dim)).shape == (op.dim,)
    True
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from .errors import NonFiniteError, check_policy
from .planner import Choice, Planner, distributed
from .precision import full_precision

REDUCTIONS = ("auto", "mean", "sum")


class DataChangedError(RuntimeError):
    """The data yielded different batches on two passes of one operator."""


class ReductionWarning(UserWarning):
    """``reduction="auto"`` inferred whether the loss is a mean or a sum from the data."""


def declared_reduction(loss_fn) -> tuple[str | None, str]:
    """The reduction a loss declares, and where it says so: an ``nn.Module``'s ``reduction``
    attribute, a ``functools.partial``'s ``reduction`` keyword, or the default of a function's
    ``reduction`` parameter (``torch.nn.functional.cross_entropy``: ``"mean"``); ``(None, "")``
    when it declares none (a lambda, a function without that parameter)."""
    if isinstance(loss_fn, nn.Module):
        red = getattr(loss_fn, "reduction", None)
        return (red, "the loss module") if isinstance(red, str) else (None, "")
    if isinstance(loss_fn, functools.partial):
        if "reduction" in loss_fn.keywords:
            return loss_fn.keywords["reduction"], "the loss partial"
        loss_fn = loss_fn.func
    try:
        param = inspect.signature(loss_fn).parameters.get("reduction")
    except (TypeError, ValueError):
        return None, ""
    if param is not None and isinstance(param.default, str):
        return param.default, f"{getattr(loss_fn, '__name__', 'the loss')}'s default"
    return None, ""


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode and restore each module's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, f in flags:
            m.training = f


def select_params(model: nn.Module, params=None) -> list[str]:
    """Names of the trainable parameters selected by ``params``, in model order.

    Args:
        params: ``None`` (all parameters that require grad), or names / glob patterns
            (``"layer1.*"``, ``"*.weight"``).

    Raises:
        ValueError: a pattern that matches nothing, or an empty selection.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = names
    else:
        if isinstance(params, str):
            params = [params]
        seen = set()
        for pat in params:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"parameter pattern {pat!r} matches no trainable parameter; "
                                 f"names look like {names[:4]}")
            seen.update(hits)
        chosen = [n for n in names if n in seen]
    if not chosen:
        raise ValueError("no trainable parameter selected")
    return chosen


def as_batches(data):
    """One ``(inputs, targets)`` pair becomes a one-batch list; anything else is returned as is."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return [data]
    return data


def to_device(x, device):
    """Every tensor of a pytree moved to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def take(x, n: int, size: int):
    """The first ``size`` samples of a pytree whose tensors have ``n`` samples on dimension 0
    (tensors of another leading size are kept whole)."""
    return tree_map(lambda t: t[:size] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t, x)


def drop(x, n: int, size: int):
    """All but the first ``size`` samples of a pytree whose tensors have ``n`` samples on
    dimension 0 (tensors of another leading size are kept whole)."""
    return tree_map(lambda t: t[size:] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t, x)


def checksum(*trees) -> torch.Tensor:
    """The float64 sum of every tensor in the pytrees, as a 0-d tensor where the first lies."""
    leaves = [t for tree in trees for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
    total = torch.zeros((), dtype=torch.float64, device=leaves[0].device if leaves else "cpu")
    for t in leaves:
        total = total + t.detach().sum(dtype=torch.float64).to(total.device)
    return total


def finite_pair(loss: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[loss is finite, every entry of value is finite]`` on the device (no host read)."""
    return torch.stack([torch.isfinite(loss).all(), torch.isfinite(value).all()])


def usage(op) -> dict[str, int]:
    """A copy of an operator's per-engine product counts (empty for a duck-typed operator)."""
    return dict(getattr(op, "counts", {}) or {})


def usage_since(op, before: dict[str, int]) -> dict[str, int]:
    """The products per engine an operator spent since ``before`` (a :func:`usage` snapshot)."""
    now = usage(op)
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


class BaseOperator:
    """Parameters, data, accumulation and checks shared by the curvature operators.

    Args:
        model: any ``nn.Module``; evaluated in eval mode, never modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar: a mean or a sum over the
            batch (see ``reduction``).
        data: one ``(inputs, targets)`` batch, or a re-iterable of such batches.
        params: ``None`` for all trainable parameters, or names / glob patterns.
        reduction: ``"auto"``, ``"mean"`` or ``"sum"`` (see the module doc).
        progress: a progress bar over the batches of every pass.
        on_nonfinite: ``"raise"`` (default) or ``"nan"`` (see :class:`landscape.HessianOperator`).

    Attributes:
        planner: the operator's engine choices (:class:`landscape.planner.Planner`).
        counts: vectors computed per engine (``"product:fwd-rev"``, ``"quadratic:taylor"``,
            ``"fallback:taylor->hvp"`` counts batches), for the results' ``engines`` field.
        num_matvecs: Hessian-vector products and quadratic forms computed.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, params=None, *, reduction: str = "auto",
                 progress: bool = False, on_nonfinite: str = "raise"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        own, source = declared_reduction(loss_fn)
        if own is not None and own not in ("mean", "sum"):
            raise ValueError(f"{source} has reduction={own!r}: the operator needs a scalar loss, "
                             "use reduction='mean' or 'sum'")
        if own is not None and reduction != "auto" and own != reduction:
            raise ValueError(f"reduction={reduction!r} contradicts {source}'s reduction={own!r}; "
                             "leave reduction='auto' or make them agree")
        if isinstance(data, (str, bytes)) or not (isinstance(data, tuple) or hasattr(data, "__iter__")):
            raise TypeError(f"data must be an (inputs, targets) pair or an iterable of them, got {type(data).__name__}")
        if isinstance(data, Iterator):
            raise TypeError("data is an iterator, exhausted after one pass, and every product is a pass over the "
                            "data: pass a list of batches or a DataLoader")
        self.on_nonfinite = check_policy(on_nonfinite)
        self.instrument: str | None = None  # the instrument running (named by NonFiniteError)
        self.model, self.loss_fn, self.data = model, loss_fn, as_batches(data)
        self.names = select_params(model, params)
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in self.names}
        self.shapes = [self.params[n].shape for n in self.names]
        self.numels = [self.params[n].numel() for n in self.names]
        self.dim = sum(self.numels)
        first = self.params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.progress = progress
        self.planner = Planner(self.device)
        self.counts: dict[str, int] = {}
        self.num_matvecs = 0
        self._fingerprint: tuple[list[int], torch.Tensor] | None = None  # the first pass's sizes and checksums
        # the last pass, until its comparison is read: (sizes, checksums, changed per batch)
        self._data_check: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        self.reduction: str | None = None
        if reduction != "auto" or own is not None:
            self.reduction = own or reduction
            how = "requested" if reduction != "auto" else "rule"
            self.planner.record(Choice("reduction", self.reduction, how,
                                       reason="given" if how == "requested" else f"{source}'s reduction"))

    # -- vector helpers ---------------------------------------------------------------------
    def flatten(self, tensors) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (a dict by name, or a list in :attr:`names` order)."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector (or a (dim, k) block, giving (k, *shape) tensors) by parameter."""
        out, i = {}, 0
        for n, s, c in zip(self.names, self.shapes, self.numels):
            out[n] = vec[i:i + c].view(s) if vec.dim() == 1 else vec[i:i + c].T.reshape(vec.shape[1], *s)
            i += c
        return out

    def to_block(self, d: dict) -> torch.Tensor:
        """A dict of (k, *shape) tensors as a (dim, k) block."""
        return torch.cat([d[n].reshape(d[n].shape[0], -1) for n in self.names], dim=1).T

    def block_slices(self) -> dict[str, slice]:
        """The slice of the flat vector that belongs to each parameter."""
        out, i = {}, 0
        for n, c in zip(self.names, self.numels):
            out[n] = slice(i, i + c)
            i += c
        return out

    def count(self, key: str, k: int) -> None:
        """Add ``k`` to :attr:`counts` ``[key]``."""
        self.counts[key] = self.counts.get(key, 0) + k

    # -- the loss -----------------------------------------------------------------------------
    def frozen(self) -> dict[str, torch.Tensor]:
        """The parameters that are not differentiated, and the buffers, by name."""
        named = dict(self.model.named_parameters())
        fixed = {n: p.detach() for n, p in named.items() if n not in self.params}
        fixed.update(dict(self.model.named_buffers()))
        return fixed

    def batch_loss(self, params: dict, x, y, frozen: dict) -> torch.Tensor:
        """The batch's *mean* loss at ``params`` (a summed loss is divided by ``len(y)``; the
        accumulation weights it back, see the module doc)."""
        loss = self.loss_fn(functional_call(self.model, {**frozen, **params}, (x,)), y)
        return loss / len(y) if self.reduction == "sum" else loss

    def graph(self, x, y, frozen):
        """The batch's gradient graph: ``(leaves, gradients, loss)`` for double backward."""
        p = {n: t.clone().requires_grad_(True) for n, t in self.params.items()}
        loss = self.batch_loss(p, x, y, frozen)
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        return list(p.values()), g, loss.detach()

    def _detect_reduction(self) -> None:
        red, reason = None, None
        seen, nonfinite = 0, None
        for i, (x, y) in enumerate(self._batches_for_detection()):
            seen += 1
            n = len(y)
            if n < 2:  # one sample is both its mean and its sum: look further
                continue
            with torch.no_grad(), eval_mode(self.model):
                out = functional_call(self.model, {**self.frozen(), **self.params}, (x,))
                h = n // 2
                try:
                    whole = float(self.loss_fn(out, y).detach())
                    a = float(self.loss_fn(take(out, n, h), y[:h]).detach())
                    b = float(self.loss_fn(drop(out, n, h), y[h:]).detach())
                except Exception as e:  # noqa: BLE001 - a loss that cannot be split cannot tell
                    raise ValueError(f"reduction='auto' could not tell whether the loss is a mean or a sum: the "
                                     f"loss of half of batch {i} failed ({type(e).__name__}: {e}); pass "
                                     "reduction='mean' or reduction='sum'") from e
            if not all(math.isfinite(v) for v in (whole, a, b)):  # the NaN/Inf checks name it; look further
                nonfinite = i
                continue
            tol = 1e-4 * max(abs(whole), 1e-12)
            is_mean = abs(whole - (h * a + (n - h) * b) / n) <= tol
            is_sum = abs(whole - (a + b)) <= tol
            if is_sum and not is_mean:
                red, reason = "sum", f"batch {i}'s loss is the sum of its halves' ({whole:.6g})"
            elif is_mean:
                red, reason = "mean", f"batch {i}'s loss is the sample-weighted mean of its halves'"
            else:
                raise ValueError(f"reduction='auto' could not tell whether the loss is a mean or a sum: batch {i}'s "
                                 f"loss ({whole:.6g}) is neither the mean nor the sum of its halves' ({a:.6g}, "
                                 f"{b:.6g}); pass reduction='mean' or reduction='sum'")
            break
        if red is None and nonfinite is not None:  # nothing to tell from: the products' checks will say why
            red, reason = "mean", f"the loss is NaN or Inf on batch {nonfinite}: taken as a mean"
        if red is None:
            raise ValueError("reduction='auto' cannot tell a mean from a sum on batches of one sample "
                             f"({seen} batch(es) seen); pass reduction='mean' or reduction='sum'")
        red = self.planner.agree(red, REDUCTIONS)
        self.reduction = red
        self.planner.record(Choice("reduction", red, "rule", reason=reason))
        warnings.warn(f"landscape: the loss was taken as a {red} ({reason}); pass reduction={red!r} to say so "
                      "(and silence this warning)", ReductionWarning, stacklevel=2)

    def _batches_for_detection(self):
        """The batches the reduction test may look at, on the device (not a pass: nothing is
        checked); at most 64, so that a long run of one-sample batches ends the search."""
        for i, b in enumerate(self.data):
            if i >= 64:
                return
            yield to_device(b[0], self.device), b[1].to(self.device)

    def prepare(self) -> None:
        """Decide what must be decided before a pass (the reduction)."""
        if self.reduction is None:
            self._detect_reduction()

    # -- data ---------------------------------------------------------------------------------
    def first_batch(self):
        """The first ``(inputs, targets)`` batch, on the device (not a pass: nothing is checked)."""
        b = next(iter(self.data), None)
        if b is None:
            raise ValueError("the data yielded no batch")
        return to_device(b[0], self.device), b[1].to(self.device)

    def passes(self, desc: str = "hvp"):
        """One pass over the data: ``(index, inputs, targets)`` on the device, checked against the
        first complete pass when it ends (:class:`DataChangedError`; a difference in the batches'
        sizes raises at once, one in their checksums is computed on the device and read by the
        next :meth:`reduce`)."""
        self.check_data()  # a pass whose comparison nobody read
        it = iter(self.data)
        if self.progress:
            it = tqdm(it, desc=desc, leave=False)
        sizes, sums = [], []
        for i, b in enumerate(it):
            if not (isinstance(b, (tuple, list)) and len(b) >= 2 and isinstance(b[1], torch.Tensor)):
                raise TypeError(f"batch {i} is a {type(b).__name__}; each batch must be an (inputs, targets) pair "
                                "with a tensor of targets")
            x, y = to_device(b[0], self.device), b[1].to(self.device)
            sizes.append(len(y))
            sums.append(checksum(x, y))
            yield i, x, y
        self._check_pass(sizes, sums)

    def _check_pass(self, sizes: list[int], sums: list[torch.Tensor]) -> None:
        """Compare a finished pass with the first: sizes on the host, checksums on the device (no
        host read: the flag waits for :meth:`reduce` or :meth:`check_data`)."""
        if not sizes:
            raise ValueError("the data yielded no batch (an exhausted iterator? pass a list or a DataLoader)")
        fp = torch.stack([s.to(self.device) for s in sums])
        if self._fingerprint is None:
            self._fingerprint = (sizes, fp)
            return
        ref, fp0 = self._fingerprint
        if len(sizes) != len(ref):
            raise DataChangedError(f"the data yielded {len(sizes)} batches on this pass and {len(ref)} on the first: "
                                   "every product must see the same batches; pass a list of batches or a "
                                   "DataLoader with shuffle=False")
        for i, (n, n0) in enumerate(zip(sizes, ref)):
            if n != n0:
                raise self._data_changed(i, sizes, fp)
        self._data_check = (sizes, fp, (fp - fp0).abs() > 1e-9 * fp0.abs().clamp_min(1.0))

    def _data_changed(self, i: int, sizes: list[int], fp: torch.Tensor) -> DataChangedError:
        """The error naming batch ``i`` of a pass with these sizes and checksums (reads them)."""
        ref, fp0 = self._fingerprint
        return DataChangedError(f"batch {i} differs from the first pass's ({sizes[i]} samples, checksum "
                                f"{float(fp[i]):.10g} vs {ref[i]} samples, checksum {float(fp0[i]):.10g}): a "
                                "shuffling loader or random augmentation makes the operator non-linear and "
                                "non-symmetric; pass a list of batches or a DataLoader with shuffle=False and no "
                                "random transforms")

    def _data_flag(self) -> torch.Tensor | None:
        """Whether a checksum of the last pass changed (0-d bool on the device), or ``None`` when
        no pass waits to be checked."""
        return None if self._data_check is None else self._data_check[2].any()

    def _data_error(self) -> DataChangedError:
        """The error for the waiting pass (whose flag was read as set), which stops waiting."""
        sizes, fp, changed = self._data_check
        self._data_check = None
        return self._data_changed(int(changed.nonzero()[0, 0]), sizes, fp)

    def check_data(self) -> None:
        """Read the last pass's checksum comparison if no :meth:`reduce` read it (one host read).

        Raises:
            DataChangedError: a batch's checksum differs from the first pass's.
        """
        flag = self._data_flag()
        if flag is not None and bool(flag):
            raise self._data_error()
        self._data_check = None

    # -- accumulation -------------------------------------------------------------------------
    def reduce(self, acc: torch.Tensor, n: int, flags: list | None = None, what: str = "product") -> torch.Tensor:
        """The accumulated ``sum_b n_b * value_b`` normalized by the reduction (over batches and
        ranks), after checking the per-batch ``(loss finite, value finite)`` flags and the pass's
        data fingerprint (one host read for both; under ``torch.distributed`` bad batches and
        changed data are counted over ranks, so that every rank raises or none)."""
        bad = changed = 0.0
        data = self._data_flag()
        if distributed():
            cnt = torch.tensor([float(n), 0.0, 0.0], dtype=torch.float64, device=acc.device)
            if flags:
                cnt[1] = (~torch.stack(flags)).any(1).sum()
            if data is not None:
                cnt[2] = data
            dist.all_reduce(acc)
            dist.all_reduce(cnt)
            n, bad, changed = cnt.tolist()
        elif flags or data is not None:
            parts = ([(~torch.stack(flags)).any(1).sum().double()] if flags else []) + \
                ([data.double()] if data is not None else [])
            read = torch.stack(parts).tolist()  # the pass's one host read
            bad, changed = (read[0] if flags else 0.0), (read[-1] if data is not None else 0.0)
        if changed:
            if data is None or not bool(data):  # another rank's data changed (an error path: reads are fine)
                self._data_check = None
                raise DataChangedError("the data changed between passes on another process: every product must "
                                       "see the same batches; pass a list of batches or a DataLoader with "
                                       "shuffle=False")
            raise self._data_error()
        self._data_check = None
        if bad:
            raise self.nonfinite_error(flags, what)
        if n == 0:
            raise ValueError("the data yielded no samples")
        return acc if self.reduction == "sum" else acc / n

    def nonfinite_error(self, flags: list, what: str) -> NonFiniteError:
        """The error naming the first bad batch of this rank (or another rank's)."""
        ok = torch.stack(flags).cpu() if flags else torch.ones(0, 2, dtype=torch.bool)
        bad = (~ok).any(1).nonzero()
        instrument = self.instrument or type(self).__name__
        if not len(bad):
            return NonFiniteError(instrument, f"loss or {what}", None, " on another process")
        i = int(bad[0])
        return NonFiniteError(instrument, "loss" if not bool(ok[i, 0]) else what, i)

    @contextlib.contextmanager
    def measuring(self, instrument: str):
        """Checks on, with NaN and Inf named as ``instrument``'s (an enclosing instrument keeps its
        name), for the duration of the block."""
        prev = (self.instrument, self.on_nonfinite)
        self.instrument = self.instrument or instrument
        self.on_nonfinite = "raise"
        try:
            yield self
        finally:
            self.instrument, self.on_nonfinite = prev

    # -- gradient and export ------------------------------------------------------------------
    @full_precision()
    def gradient(self) -> tuple[torch.Tensor, float]:
        """The flat gradient of the loss over the data and the loss itself (eval mode; both
        follow the reduction)."""
        self.prepare()
        g_acc = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        n_total, flags = 0, []
        with eval_mode(self.model):
            frozen = self.frozen()
            for _, x, y in self.passes("gradient"):
                p = {n: t.clone().requires_grad_(True) for n, t in self.params.items()}
                loss = self.batch_loss(p, x, y, frozen)
                g = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
                g = torch.cat([(gi if gi is not None else torch.zeros_like(t)).reshape(-1)
                               for gi, t in zip(g, p.values())])
                if self.on_nonfinite == "raise":
                    flags.append(finite_pair(loss.detach(), g))
                g_acc += len(y) * g
                loss_acc += len(y) * loss.detach()
                n_total += len(y)
        both = self.reduce(torch.cat([g_acc, loss_acc.reshape(1).to(self.dtype)])[:, None], n_total, flags,
                           "gradient")[:, 0]
        return both[:-1], float(both[-1])

    def matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X)
            one = X.ndim == 1
            T = torch.from_numpy(np.ascontiguousarray(X.reshape(self.dim, -1))).to(self.dtype)
            out = self.matmat(T).detach().cpu().double().numpy()
            return out[:, 0] if one else out

        return LinearOperator((self.dim, self.dim), matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np.float64)


def records_engines(fn):
    """Decorate an instrument ``fn(op, ...)`` so that its result's ``engines`` field holds the
    vectors each engine of ``op`` computed during the call (:attr:`BaseOperator.counts`)."""
    @functools.wraps(fn)
    def wrapper(op, *args, **kwargs):
        before = usage(op)
        result = fn(op, *args, **kwargs)
        if hasattr(result, "engines"):
            result.engines = usage_since(op, before)
        return result
    return wrapper
