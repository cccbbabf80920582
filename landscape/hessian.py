"""Hessian-vector products of an average loss, streamed over data.

:class:`HessianOperator` represents the Hessian ``H = sum_b (n_b / N) * Hess(L_b)`` of the
average loss over a data iterable (``L_b`` is the mean loss of batch ``b`` of ``n_b``
samples), with respect to all or some of a model's parameters, evaluated in eval mode
(BatchNorm running statistics, no dropout). Products with a block of ``k`` vectors at once
(:meth:`HessianOperator.matmat`) share the work of each batch:

* ``"fwd-rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``, vmapped over
  the ``k`` tangents (one forward, a gradient pass and its tangent, per batch and block);
* ``"rev-rev"``: double backward, one ``torch.autograd.grad`` with ``is_grads_batched=True``
  for the whole block, on the graph of a ``create_graph=True`` gradient;
* ``"cached"``: as ``"rev-rev"``, but the gradient graphs of every batch are built once and
  kept (``retain_graph``), so a product costs only the batched double backward. Used when the
  graphs fit in ``cache_bytes`` (their size is measured on the first batch).

``method="auto"`` times the candidates on a quarter of the first batch, for single vectors and blocks,
and keeps the fastest (per workload and process: later operators on the same workload reuse
the choice); a method that
fails (an operator without a forward-mode or batching rule) is skipped, and ``"rev-rev"`` with a
loop over the block is the exact fallback of last resort.

The user's model is left as it was: parameters and buffers are read, never written (products
use ``torch.func.functional_call`` on detached copies), and the training flags of every module
are restored after each pass.

Products, quadratic forms and gradients run in full float32 precision whatever the process's
TF32 and autocast settings (:func:`landscape.precision.full_precision`; the settings are
restored after each call), and the method choice's timings synchronize the device.

Every batch's loss and its share of a product (or gradient, or quadratic form) is checked for
NaN and Inf on the device, and the flags are read once per product: a non-finite value raises
:class:`landscape.errors.NonFiniteError` naming the batch and the instrument running
(``on_nonfinite="nan"`` skips the checks and lets NaN through).

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> op = HessianOperator(model, nn.functional.cross_entropy, data)
    >>> v = torch.randn(op.dim)
    >>> op.matvec(v).shape == v.shape
    True
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from ._timing import best_of, timed
from .errors import NonFiniteError, check_policy
from .precision import full_precision

METHODS = ("auto", "fwd-rev", "rev-rev", "cached")
QUADRATIC = ("auto", "taylor", "hvp")
_CHOICES: dict = {}  # method timings by workload signature, so operators on the same workload reuse them


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
    """Names of the trainable parameters selected by ``params``.

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
        chosen, seen = [], set()
        for pat in params:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"parameter pattern {pat!r} matches no trainable parameter; "
                                 f"names look like {names[:4]}")
            for n in hits:
                if n not in seen:
                    seen.add(n)
                    chosen.append(n)
        chosen = [n for n in names if n in seen]  # model order
    if not chosen:
        raise ValueError("no trainable parameter selected")
    return chosen


def _finite_pair(loss: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[loss is finite, every entry of value is finite]`` on the device (no host read)."""
    return torch.stack([torch.isfinite(loss).all(), torch.isfinite(value).all()])


@contextlib.contextmanager
def measuring(op, instrument: str):
    """The operator an instrument should use: ``op`` with its NaN/Inf checks on and named after
    ``instrument`` (:meth:`HessianOperator.measuring`), or, for a duck-typed operator, a wrapper
    that checks every product it returns (the batch is then unknown)."""
    if isinstance(op, HessianOperator):
        with op.measuring(instrument):
            yield op
    elif isinstance(op, _Checked):  # inside another instrument: already checked, under its name
        yield op
    else:
        yield _Checked(op, instrument)


def nonfinite_policy(op, on_nonfinite: str | None) -> str:
    """An instrument's policy: its own argument, else the operator's (default ``"raise"``)."""
    if on_nonfinite is None:
        return check_policy(getattr(op, "on_nonfinite", "raise"), "the operator's on_nonfinite")
    return check_policy(on_nonfinite)


class _Checked:
    """A duck-typed operator whose products, quadratic forms and gradients are checked for NaN/Inf."""

    def __init__(self, op, instrument: str):
        self._op, self._instrument = op, instrument

    def __getattr__(self, name):
        value = getattr(self._op, name)
        if name in ("matmat", "matvec", "quadratic_forms"):
            what = "quadratic form" if name == "quadratic_forms" else "Hessian-vector product"

            def checked(*args, **kwargs):
                out = value(*args, **kwargs)
                if not bool(torch.isfinite(out).all()):
                    raise NonFiniteError(self._instrument, what)
                return out
            return checked
        if name == "gradient":
            def checked_gradient():
                g, loss = value()
                if not (bool(torch.isfinite(g).all()) and torch.isfinite(torch.as_tensor(loss)).all()):
                    raise NonFiniteError(self._instrument, "loss or gradient")
                return g, loss
            return checked_gradient
        return value

    def __matmul__(self, V):
        return self.matmat(V)


def _as_batches(data) -> list | Iterable:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [data]  # one fixed batch
    return data


class HessianOperator:
    """The Hessian of the average loss of ``model`` over ``data`` as a linear operator.

    Args:
        model: any ``nn.Module``; evaluated in eval mode, never modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss over the batch.
        data: one ``(inputs, targets)`` batch, or a re-iterable of such batches (a list, a
            ``DataLoader``); a short last batch gets its proper weight ``n_b / N``.
        params: ``None`` for all trainable parameters, or names / glob patterns.
        method: ``"auto"``, ``"fwd-rev"``, ``"rev-rev"`` or ``"cached"`` (see the module doc).
        cache_bytes: memory budget of the ``"cached"`` method (default 2 GiB).
        max_block: vectors per batched product; larger blocks are split. Default 4 on the CPU
            (measured fastest per vector on the digits CNN: 1, 2, 8 and 16 were slower) and 32 on
            CUDA.
        quadratic: how :meth:`quadratic_forms` computes ``z^T H z`` (Hutchinson's estimator
            needs nothing else): ``"taylor"`` propagates second-order Taylor series forward
            (:mod:`landscape.taylor`, about 4/3 of a gradient per probe instead of 2),
            ``"hvp"`` takes ``z * (H z)``, ``"auto"`` checks the first against double-backward
            products on a quarter batch (relative 1e-4) and keeps it if it is also faster there
            (best of two timings each);
            models or losses without Taylor-mode rules use ``"hvp"``.
        progress: show a progress bar over batches for each product.
        on_nonfinite: ``"raise"`` (default): a NaN or Inf loss or product on any batch raises
            :class:`landscape.errors.NonFiniteError` naming the batch; ``"nan"``: no check, NaN
            flows into the result. The instruments (:func:`landscape.hessian_trace`, ...) take
            this as their default and always check while they run.

    Under ``torch.distributed``, each rank passes its own shard of the data; products are
    all-reduced weighted by sample counts, so every rank gets the same answer.

    The operator reads the model's current parameters at each product, except that the
    ``"cached"`` method keeps the gradient graphs built at its first product: build a new operator
    after changing the model.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, params=None, *, method: str = "auto",
                 cache_bytes: int = 2 << 30, max_block: int | None = None, quadratic: str = "auto",
                 progress: bool = False, on_nonfinite: str = "raise"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if quadratic not in QUADRATIC:
            raise ValueError(f"unknown quadratic {quadratic!r}; valid: {', '.join(QUADRATIC)}")
        self.on_nonfinite = check_policy(on_nonfinite)
        self.instrument: str | None = None  # the instrument running (named by NonFiniteError)
        self.model, self.loss_fn, self.data = model, loss_fn, _as_batches(data)
        self.names = select_params(model, params)
        named = dict(model.named_parameters())
        self._params = {n: named[n].detach() for n in self.names}
        self.shapes = [self._params[n].shape for n in self.names]
        self.numels = [self._params[n].numel() for n in self.names]
        self.dim = sum(self.numels)
        first = self._params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.cache_bytes, self.progress = cache_bytes, progress
        if max_block is not None and max_block < 1:
            raise ValueError(f"max_block must be >= 1, got {max_block}")
        self.max_block = max_block or (32 if self.device.type == "cuda" else 4)
        self.block = self.max_block  # "auto" also times single-vector products and may lower it
        self.requested_method = method
        self.method: str | None = None if method == "auto" else method
        self.num_matvecs = 0
        self.timings: dict[str, float] = {}
        self._cache: list | None = None
        self._count: float | None = None
        self.requested_quadratic = quadratic
        self.quadratic: str | None = None if quadratic == "auto" else quadratic
        self.quadratic_block = 16 if self.device.type == "cpu" else 32
        self.taylor_budget = (16 << 20) if self.device.type == "cpu" else (1 << 30)  # bytes per tangent
        self._taylor = None
        self.method_errors: dict[str, str] = {}

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
            if vec.dim() == 1:
                out[n] = vec[i:i + c].view(s)
            else:
                out[n] = vec[i:i + c].T.reshape(vec.shape[1], *s)
            i += c
        return out

    def block_slices(self) -> dict[str, slice]:
        """The slice of the flat vector that belongs to each parameter."""
        out, i = {}, 0
        for n, c in zip(self.names, self.numels):
            out[n] = slice(i, i + c)
            i += c
        return out

    # -- the loss as a function of the selected parameters -----------------------------------
    def _frozen(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        fixed = {n: p.detach() for n, p in named.items() if n not in self._params}
        fixed.update({n: b for n, b in self.model.named_buffers()})
        return fixed

    def _loss(self, params: dict, x, y, frozen: dict) -> torch.Tensor:
        out = functional_call(self.model, {**frozen, **params}, (x,))
        return self.loss_fn(out, y)

    def _batches(self):
        it = iter(self.data)
        if self.progress:
            it = tqdm(it, desc="hvp", leave=False)
        for b in it:
            x, y = b[0], b[1]
            yield x.to(self.device) if isinstance(x, torch.Tensor) else x, y.to(self.device)

    # -- products per batch ------------------------------------------------------------------
    def _fwd_rev(self, x, y, V: dict, frozen) -> tuple[dict, torch.Tensor]:
        """The products of the batch and its loss."""
        from .taylor import quiet_forward_ad

        def loss(p):
            value = self._loss(p, x, y, frozen)
            return value, value.detach()

        g = grad(loss, has_aux=True)

        def one(v):
            _, tangent, value = jvp(g, (self._params,), (v,), has_aux=True)
            return tangent, value

        with quiet_forward_ad():
            prods, values = vmap(one)(V)
        return prods, values[0]

    def _graph(self, x, y, frozen):
        """The batch's gradient graph: ``(leaves, gradients, loss)``."""
        p = {n: t.clone().requires_grad_(True) for n, t in self._params.items()}
        loss = self._loss(p, x, y, frozen)
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        return list(p.values()), g, loss.detach()

    def _rev_rev(self, graph, V: dict, retain: bool) -> dict:
        leaves, g = graph[0], graph[1]
        outs = [V[n] for n in self.names]
        k = outs[0].shape[0]
        try:
            res = torch.autograd.grad(g, leaves, grad_outputs=outs, retain_graph=retain, is_grads_batched=True,
                                      allow_unused=True)
        except RuntimeError:
            if k == 1 and not retain:
                raise
            cols = [torch.autograd.grad(g, leaves, grad_outputs=[o[i] for o in outs], retain_graph=True, allow_unused=True)
                    for i in range(k)]
            res = [torch.stack([c[j] if c[j] is not None else torch.zeros_like(leaves[j]) for c in cols])
                   for j in range(len(leaves))]
        return {n: (r if r is not None else torch.zeros((k, *s), dtype=self.dtype, device=self.device))
                for n, r, s in zip(self.names, res, self.shapes)}

    def _batch_product(self, method, x, y, V, frozen, graph=None) -> tuple[dict, torch.Tensor]:
        """The products of one batch and its loss."""
        if method == "fwd-rev":
            return self._fwd_rev(x, y, V, frozen)
        if graph is None or method == "rev-rev":
            graph = self._graph(x, y, frozen)
            return self._rev_rev(graph, V, retain=False), graph[2]
        return self._rev_rev(graph, V, retain=True), graph[2]

    # -- method choice -----------------------------------------------------------------------
    def _choose(self, V: dict, frozen) -> None:
        x, y = next(iter(self._batches()))
        key = (type(self.model).__qualname__, tuple(tuple(s) for s in self.shapes), tuple(x.shape), str(x.dtype),
               str(self.device), len(self.data) if hasattr(self.data, "__len__") else None, V[self.names[0]].shape[0])
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if key in _CHOICES and not distributed:  # the same workload was timed before in this process
            (self.method, self.block), timings, errors = _CHOICES[key]
            self.timings.update(timings)
            self.method_errors.update(errors)
            return
        single = hasattr(self.data, "__len__") and len(self.data) == 1
        if isinstance(x, torch.Tensor) and len(y) >= 32:  # time on a quarter of the batch: the choice stays cheap
            x, y = x[: len(y) // 4], y[: len(y) // 4]
        # with one batch, "cached" is "rev-rev" without rebuilding the graph: never slower
        candidates = ["cached", "fwd-rev"] if single else ["cached", "fwd-rev", "rev-rev"]
        width = V[self.names[0]].shape[0]
        widths = sorted({1, width})
        best, best_t, errors = None, float("inf"), {}
        for m in candidates:
            try:
                graph = None
                if m == "cached":
                    size = self._graph_bytes(x, y, frozen)
                    nb = len(self.data) if hasattr(self.data, "__len__") else None
                    if nb is None or size * nb > self.cache_bytes:
                        errors[m] = f"graphs need ~{size} B per batch, budget {self.cache_bytes} B"
                        continue
                    graph = self._graph(x, y, frozen)  # a cached product skips the graph construction
                for w in widths:  # per-vector cost of single and blocked products
                    Vw = {n: v[:w] for n, v in V.items()}
                    # vmap traces on first use: that run is a warm-up; autograd products need none
                    t = best_of(lambda: self._batch_product(m, x, y, Vw, frozen, graph)[0], self.device,
                                warmup=m == "fwd-rev") / w
                    self.timings[f"{m}@{w}"] = t
                    if t < best_t:
                        best, best_t = (m, w), t
            except (RuntimeError, NotImplementedError) as e:
                errors[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if best is None:
            raise RuntimeError(f"no Hessian-vector product method works for this model: {errors}")
        if distributed:
            # every rank must run the same products (and so the same collectives): rank 0 decides
            pick = torch.tensor([METHODS.index(best[0]), best[1]], dtype=torch.int64, device=self.device)
            dist.broadcast(pick, 0)
            best = (METHODS[int(pick[0])], int(pick[1]))
        (self.method, self.block) = best
        self.method_errors.update(errors)
        _CHOICES[key] = (best, dict(self.timings), dict(errors))

    def _graph_bytes(self, x, y, frozen) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._graph(x, y, frozen)
        return total

    # -- public products ---------------------------------------------------------------------
    @full_precision()
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for a (dim, k) block (or a (dim,) vector); counts ``k`` matvecs."""
        if V.dim() == 1:
            return self.matmat(V[:, None])[:, 0]
        if V.shape[0] != self.dim:
            raise ValueError(f"expected vectors of length {self.dim} (the selected parameters), got {V.shape[0]}")
        if V.shape[1] > self.max_block:
            return torch.cat([self.matmat(B) for B in V.split(self.max_block, dim=1)], dim=1)
        if self.method is None:
            with eval_mode(self.model):
                self._choose(self.unflatten(V.to(device=self.device, dtype=self.dtype)), self._frozen())
        if V.shape[1] > self.block:
            return torch.cat([self.matmat(B) for B in V.split(self.block, dim=1)], dim=1)
        k = V.shape[1]
        Vd = self.unflatten(V.to(device=self.device, dtype=self.dtype))
        check = self.on_nonfinite == "raise"
        flags: list[torch.Tensor] = []  # per batch: (loss finite, product finite), read once below
        with eval_mode(self.model):
            frozen = self._frozen()
            acc = torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)
            n_total = 0
            if self.method == "cached":
                if self._cache is None:
                    self._cache = [(len(y), self._graph(x, y, frozen)) for x, y in self._batches()]
                for n, graph in self._cache:
                    block = self._to_block(self._rev_rev(graph, Vd, retain=True))
                    if check:
                        flags.append(_finite_pair(graph[2], block))
                    acc += n * block
                    n_total += n
            else:
                for x, y in self._batches():
                    prods, loss = self._batch_product(self.method, x, y, Vd, frozen)
                    block = self._to_block(prods)
                    if check:
                        flags.append(_finite_pair(loss, block))
                    acc += len(y) * block
                    n_total += len(y)
        acc = self._reduce(acc, n_total, flags, "Hessian-vector product")
        self.num_matvecs += k
        return acc

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for a flat vector of length :attr:`dim`."""
        return self.matmat(v)

    __matmul__ = matmat

    def _to_block(self, d: dict) -> torch.Tensor:
        return torch.cat([d[n].reshape(d[n].shape[0], -1) for n in self.names], dim=1).T

    def _reduce(self, acc: torch.Tensor, n: int, flags: list | None = None, what: str = "product") -> torch.Tensor:
        """The sample-weighted mean over batches (and ranks), after checking the per-batch
        ``(loss finite, value finite)`` flags (one host read; under ``torch.distributed`` the
        count of bad batches is summed over ranks, so that every rank raises or none)."""
        bad = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            cnt = torch.tensor([float(n), 0.0], dtype=torch.float64, device=acc.device)
            if flags:
                cnt[1] = (~torch.stack(flags)).any(1).sum()
            dist.all_reduce(acc)
            dist.all_reduce(cnt)
            n, bad = cnt.tolist()
        elif flags:
            bad = float((~torch.stack(flags)).any(1).sum())
        if bad:
            raise self._nonfinite_error(flags, what)
        if n == 0:
            raise ValueError("the data yielded no samples")
        return acc / n

    def _nonfinite_error(self, flags: list, what: str) -> NonFiniteError:
        """The error naming the first bad batch of this rank (or another rank's)."""
        ok = torch.stack(flags).cpu() if flags else torch.ones(0, 2, dtype=torch.bool)
        bad = (~ok).any(1).nonzero()
        instrument = self.instrument or "HessianOperator"
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

    @full_precision()
    def quadratic_forms(self, Z: torch.Tensor) -> torch.Tensor:
        """``z_i^T H z_i`` for each column of a (dim, k) block; counts ``k`` matvecs.

        Equal to ``(Z * (H @ Z)).sum(0)``, computed without the products when the model allows
        (see ``quadratic`` in the class doc)."""
        if Z.dim() != 2 or Z.shape[0] != self.dim:
            raise ValueError(f"expected a (dim={self.dim}, k) block, got shape {tuple(Z.shape)}")
        Z = Z.to(device=self.device, dtype=self.dtype)
        if self.quadratic is None:
            self._choose_quadratic(Z[:, : self.quadratic_block])
        if self.quadratic == "hvp":
            return (Z * self.matmat(Z)).sum(0)
        if self._taylor is None:  # requested explicitly: an unsupported model raises here
            from .taylor import TaylorQuadratic
            with eval_mode(self.model):
                self._taylor = TaylorQuadratic(self.model, self.loss_fn, self.names)
        out = []
        for B in Z.split(self.quadratic_block, dim=1):
            k = B.shape[1]
            V = self.unflatten(B)
            acc = torch.zeros(k, 1, dtype=self.dtype, device=self.device)
            n_total = 0
            flags: list[torch.Tensor] = []
            with eval_mode(self.model):
                for x, y in self._batches():
                    q = self._taylor(x, y, V)
                    if self.on_nonfinite == "raise":  # the loss is finite where the model's output is
                        flags.append(torch.stack([self._taylor.output_finite, torch.isfinite(q).all()]))
                    acc[:, 0] += len(y) * q
                    n_total += len(y)
            out.append(self._reduce(acc, n_total, flags, "quadratic form")[:, 0])
            self.num_matvecs += k
        return torch.cat(out)

    def _choose_quadratic(self, Z: torch.Tensor) -> None:
        from .taylor import TaylorQuadratic, UnsupportedError

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        choice, err = "hvp", None
        with eval_mode(self.model):
            try:
                self._taylor = TaylorQuadratic(self.model, self.loss_fn, self.names)
                x, y = next(iter(self._batches()))
                n_full = len(y)
                if isinstance(x, torch.Tensor) and len(y) >= 32:
                    x, y = x[: len(y) // 4], y[: len(y) // 4]
                V, frozen = self.unflatten(Z), self._frozen()
                # probes per pass: tangents are k times the largest activation; past a budget
                # (16 MiB on the CPU) memory traffic costs more than the shared primal saves
                # (resnet20, batch 128, per probe: 1.8, 1.7, 2.2, 3.6, 5.4 gradients for k = 1..16)
                self._taylor(x, y, {n: v[:1] for n, v in V.items()})
                per_probe = self._taylor.peak_bytes * n_full / max(len(y), 1)
                budget = self.taylor_budget
                self.quadratic_block = max(1, min(self.quadratic_block, int(budget // max(per_probe, 1))))
                Z = Z[:, : self.quadratic_block]
                V = self.unflatten(Z)
                # one timing each, against double backward (no warm-up needed, no method choice paid)
                self._taylor(x, y, V)  # warm-up
                t_taylor, t_hvp = float("inf"), float("inf")
                for _ in range(2):  # best of two: single timings of small batches are noisy
                    q_t, t = timed(lambda: self._taylor(x, y, V), self.device)
                    t_taylor = min(t_taylor, t)
                    HV, t = timed(lambda: self._to_block(self._batch_product("rev-rev", x, y, V, frozen)[0]),
                                  self.device)
                    t_hvp = min(t_hvp, t)
                q_h = (Z * HV).sum(0)
                scale = Z.norm(dim=0) * HV.norm(dim=0)
                bad = (q_t - q_h).abs() > 1e-4 * scale + 1e-12
                self.timings["quadratic:taylor"], self.timings["quadratic:hvp"] = t_taylor, t_hvp
                if bool(bad.any()):
                    err = (f"Taylor-mode forms disagree with Hessian-vector products ({q_t.tolist()} vs {q_h.tolist()}): "
                           "please report this model")
                elif t_taylor <= t_hvp:
                    choice = "taylor"
            except (UnsupportedError, RuntimeError, NotImplementedError) as e:
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if err is not None:
            self.method_errors["taylor"] = err
        if distributed:  # every rank must run the same collectives: rank 0 decides
            pick = torch.tensor([QUADRATIC.index(choice), self.quadratic_block], dtype=torch.int64, device=self.device)
            dist.broadcast(pick, 0)
            choice, self.quadratic_block = QUADRATIC[int(pick[0])], int(pick[1])
        if choice == "taylor" and self._taylor is None:
            self._taylor = TaylorQuadratic(self.model, self.loss_fn, self.names)
        self.quadratic = choice

    @full_precision()
    def gradient(self) -> tuple[torch.Tensor, float]:
        """The flat gradient of the average loss and the average loss itself (eval mode)."""
        g_acc = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)  # summed in float64 on the device
        n_total = 0
        flags: list[torch.Tensor] = []
        with eval_mode(self.model):
            frozen = self._frozen()
            for x, y in self._batches():
                p = {n: t.clone().requires_grad_(True) for n, t in self._params.items()}
                loss = self._loss(p, x, y, frozen)
                g = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
                g = torch.cat([(gi if gi is not None else torch.zeros_like(t)).reshape(-1)
                               for gi, t in zip(g, p.values())])
                if self.on_nonfinite == "raise":
                    flags.append(_finite_pair(loss.detach(), g))
                g_acc += len(y) * g
                loss_acc += len(y) * loss.detach()
                n_total += len(y)
        both = self._reduce(torch.cat([g_acc, loss_acc.reshape(1).to(self.dtype)])[:, None], n_total, flags,
                            "gradient")[:, 0]
        return both[:-1], float(both[-1])

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X)
            one = X.ndim == 1
            T = torch.from_numpy(np.ascontiguousarray(X.reshape(self.dim, -1))).to(self.dtype)
            out = self.matmat(T).detach().cpu().double().numpy()
            return out[:, 0] if one else out

        return LinearOperator((self.dim, self.dim), matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np.float64)

    def __repr__(self) -> str:
        return (f"HessianOperator(dim={self.dim}, params={len(self.names)} tensors, method={self.method or 'auto'}, "
                f"matvecs={self.num_matvecs})")
