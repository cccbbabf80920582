"""The Hessian of a loss over data as a linear operator, its engines chosen per operator.

:class:`HessianOperator` represents the Hessian ``H = sum_b (n_b / N) * Hess(L_b)`` of the
average loss over a data iterable (``L_b`` is the mean loss of batch ``b`` of ``n_b``
samples; a summed loss gives the Hessian of the sum, see :mod:`landscape.operator`), with
respect to all or some of a model's parameters, evaluated in eval mode (BatchNorm running
statistics, no dropout). It is a :class:`landscape.operator.BaseOperator` (parameters, data
passes, accumulation, all-reduce, gradient, SciPy export) with two engines from
:mod:`landscape.engines`:

* the **product** engine for ``H @ V`` (:meth:`HessianOperator.matmat`): ``"fwd-rev"``,
  ``"rev-rev"`` or ``"cached"``, on blocks of up to ``max_block`` vectors;
* the **quadratic** engine for ``z_i^T H z_i`` (:meth:`HessianOperator.quadratic_forms`, all
  Hutchinson needs): ``"taylor"`` (second-order forward mode) or ``"hvp"`` (from products).

Each is chosen once per operator and recorded in :attr:`HessianOperator.planner`: as the caller
says (``method=``, ``quadratic=``, or ``engine=`` for either), or by timing the candidates on the
device (products: for single vectors and blocks; forms: Taylor mode, checked against
double-backward products to a relative 1e-4, is kept when it is also faster). On the CPU the
timing batch is a quarter of the first batch (the cost scales with the batch) and the forms are
timed against double backward; on an accelerator, whose cost does not scale with the batch
(kernel launches), it is the whole first batch, the candidates are timed as they would run
(replayed CUDA graphs) and the forms against the product engine just chosen, at its block. A
candidate that fails (no forward-mode or batching rule, a loss without a Taylor rule, an input
that is not a tensor) is skipped, its error recorded; ``"rev-rev"`` with a loop over the block is
the exact fallback of last resort. A batch the Taylor rules cannot take (a target equal to
``ignore_index``) is computed with the product engine instead, and counted
(``"fallback:taylor->hvp"``). :attr:`HessianOperator.counts` says how many vectors each engine
computed; the instruments copy the counts of their own run into their results (``engines``).

On CUDA the products are replayed from CUDA graphs (:class:`landscape.engines.Graphed`, one
capture per static shape, checked against the eager product; ``graphs=False`` turns this off); a
product whose capture fails runs eagerly with a one-line warning. The planner's ``"graph"``
choice says what was captured and why anything was not. A pass makes one host read (its NaN/Inf
flags and the data fingerprint's comparison together), whatever the number of batches.

The user's model is left as it was: parameters and buffers are read, never written (products
use ``torch.func.functional_call`` on detached copies), and the training flags of every module
are restored after each pass. Products, quadratic forms and gradients run in full float32
precision whatever the process's TF32 and autocast settings
(:func:`landscape.precision.full_precision`), and the timings synchronize the device.

Every batch's loss and its share of a product (or gradient, or quadratic form) is checked for
NaN and Inf on the device, and the flags are read once per pass: a non-finite value raises
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
    >>> op.planner.get("product").engine in ("fwd-rev", "rev-rev", "cached")
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

from ._timing import best_of, timed
from .engines import PRODUCT_ENGINES, CachedGraph, FwdRev, Graphed, ProductForms, RevRev, TaylorForms
from .errors import NonFiniteError, check_policy
from .fp64 import dots, norms
from .operator import BaseOperator, DataChangedError, eval_mode, finite_pair, select_params, take
from .planner import Choice, short_error
from .precision import full_precision

METHODS = ("auto", "fwd-rev", "rev-rev", "cached")
QUADRATIC = ("auto", "taylor", "hvp")
ENGINES = METHODS[1:] + QUADRATIC[1:]

__all__ = ["HessianOperator", "METHODS", "QUADRATIC", "ENGINES", "eval_mode", "select_params", "measuring",
           "nonfinite_policy", "DataChangedError"]


@contextlib.contextmanager
def measuring(op, instrument: str):
    """The operator an instrument should use: ``op`` with its NaN/Inf checks on and named after
    ``instrument`` (:meth:`BaseOperator.measuring`), or, for a duck-typed operator, a wrapper
    that checks every product it returns (the batch is then unknown)."""
    if isinstance(op, BaseOperator):
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


class HessianOperator(BaseOperator):
    """The Hessian of the loss of ``model`` over ``data`` as a linear operator.

    Args:
        model: any ``nn.Module``; evaluated in eval mode, never modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean (or summed, see
            ``reduction``) loss.
        data: one ``(inputs, targets)`` batch, or a re-iterable of such batches (a list, a
            ``DataLoader`` without shuffling); inputs may be any pytree of tensors; a short last
            batch gets its proper weight ``n_b / N``.
        params: ``None`` for all trainable parameters, or names / glob patterns.
        method: the product engine: ``"auto"``, ``"fwd-rev"``, ``"rev-rev"`` or ``"cached"``.
        cache_bytes: memory budget of the ``"cached"`` engine (default 2 GiB).
        max_block: vectors per batched product; larger blocks are split. Default 4 on the CPU
            and 32 on CUDA (BENCHMARKS.md, "behind the defaults").
        quadratic: the quadratic-form engine: ``"auto"``, ``"taylor"`` or ``"hvp"``.
        progress: show a progress bar over batches for each pass.
        on_nonfinite: ``"raise"`` (default): a NaN or Inf loss or product on any batch raises
            :class:`landscape.errors.NonFiniteError` naming the batch; ``"nan"``: no check, NaN
            flows into the result. The instruments always check while they run.
        engine: an engine named directly, product or quadratic (``"taylor"``, ``"fwd-rev"``,
            ...); the same as passing it as ``method`` or ``quadratic``.
        reduction: ``"auto"``, ``"mean"`` or ``"sum"`` (:mod:`landscape.operator`).
        graphs: ``None`` or ``True``: on CUDA, products of static shapes are replayed from CUDA
            graphs (elsewhere they run eagerly); ``False``: always eagerly.

    Under ``torch.distributed``, each rank passes its own shard of the data; products are
    all-reduced weighted by sample counts, so every rank gets the same answer, and rank 0's
    engine choices are broadcast.

    The operator reads the model's current parameters at each product, except that the
    ``"cached"`` engine keeps the gradient graphs built at its first product: build a new
    operator after changing the model.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, params=None, *, method: str = "auto",
                 cache_bytes: int = 2 << 30, max_block: int | None = None, quadratic: str = "auto",
                 progress: bool = False, on_nonfinite: str = "raise", engine: str | None = None,
                 reduction: str = "auto", graphs: bool | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if quadratic not in QUADRATIC:
            raise ValueError(f"unknown quadratic {quadratic!r}; valid: {', '.join(QUADRATIC)}")
        if engine is not None:
            if engine not in ENGINES:
                raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
            if engine in QUADRATIC:
                if quadratic not in ("auto", engine):
                    raise ValueError(f"engine={engine!r} contradicts quadratic={quadratic!r}: give one of them")
                quadratic = engine
            else:
                if method not in ("auto", engine):
                    raise ValueError(f"engine={engine!r} contradicts method={method!r}: give one of them")
                method = engine
        if max_block is not None and (not isinstance(max_block, int) or max_block < 1):
            raise ValueError(f"max_block must be a positive integer, got {max_block!r}")
        if graphs not in (None, True, False):
            raise ValueError(f"graphs must be None, True or False, got {graphs!r}")
        super().__init__(model, loss_fn, data, params, reduction=reduction, progress=progress,
                         on_nonfinite=on_nonfinite)
        self.cache_bytes = cache_bytes
        self.max_block = max_block or (32 if self.device.type == "cuda" else 4)
        self.block = self.max_block  # the product engine's block; "auto" may lower it to 1
        self.quadratic_block = 16 if self.device.type == "cpu" else 32
        self.taylor_budget = (16 << 20) if self.device.type == "cpu" else (1 << 30)  # bytes per tangent
        self.requested_method, self.requested_quadratic = method, quadratic
        self.graphs = graphs is not False
        self._products: Graphed | None = None
        self._forms = None
        self._graph_state = None  # what the "graph" choice last recorded
        if method != "auto":
            self._products = Graphed(PRODUCT_ENGINES[method](), self.graphs)
            self.planner.record(Choice("product", method, "requested", reason="method given", block=self.max_block))
            self._note_graphs()
        if quadratic == "hvp":
            self.planner.record(Choice("quadratic", "hvp", "requested", reason="quadratic given"))

    # -- what was chosen (read-only views of the planner) --------------------------------------
    @property
    def method(self) -> str | None:
        """The product engine (``None`` until chosen)."""
        c = self.planner.get("product")
        return c.engine if c else None

    @property
    def quadratic(self) -> str | None:
        """The quadratic-form engine (``None`` until chosen)."""
        c = self.planner.get("quadratic")
        return c.engine if c else None

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per vector of every timed candidate (``"fwd-rev@4"``, ``"quadratic:taylor"``)."""
        out = dict(getattr(self.planner.get("product"), "timings", {}))
        out.update({f"quadratic:{k}": v for k, v in getattr(self.planner.get("quadratic"), "timings", {}).items()})
        return out

    @property
    def method_errors(self) -> dict[str, str]:
        """Why candidates were not used, by engine."""
        out = dict(getattr(self.planner.get("product"), "errors", {}))
        out.update(getattr(self.planner.get("quadratic"), "errors", {}))
        return out

    # -- the product engine ---------------------------------------------------------------------
    def _product_engine(self, V: dict):
        if self._products is None:
            with eval_mode(self.model):
                self._choose_products(V, self.frozen())
        return self._products

    def _choose_products(self, V: dict, frozen: dict) -> None:
        x, y = self.first_batch()
        n_full = len(y)
        accel = self.device.type != "cpu"
        if len(y) >= 32 and not accel:  # time on a quarter of the batch: the choice stays cheap
            x, y = take(x, len(y), len(y) // 4), y[: len(y) // 4]
        nb = len(self.data) if hasattr(self.data, "__len__") else None
        width = V[self.names[0]].shape[0]
        widths = sorted({1, width})
        engines = {m: Graphed(cls(), self.graphs) for m, cls in
                   (("cached", CachedGraph), ("fwd-rev", FwdRev), ("rev-rev", RevRev))}
        errors = {}
        try:  # measured on the timing batch, scaled to a full one
            size = CachedGraph.graph_bytes(self, x, y, frozen) * n_full // max(len(y), 1)
        except Exception as e:  # noqa: BLE001 - the cached engine is then not a candidate
            size, errors["cached"] = None, short_error(e)
        if size is not None and (nb is None or size * nb > self.cache_bytes):
            errors["cached"] = f"graphs need ~{size} B per batch, budget {self.cache_bytes} B" if nb else \
                "the data has no len(): graphs cannot be budgeted"
        if "cached" not in errors:  # a rule, not a timing: the same double backward without rebuilding graphs
            errors["rev-rev"] = "the graphs fit in cache_bytes: 'cached' does the same work without rebuilding them"
        for m in [m for m in engines if m in errors]:
            del engines[m]

        def timer(eng, w):
            Vw = {n: v[:w] for n, v in V.items()}
            if isinstance(eng.engine, CachedGraph) or eng.active(self):  # graph built (or product captured) first
                eng.products(self, 0, x, y, Vw, frozen)
            # a warm-up run each: vmap traces on first use, autograd allocates its buffers
            return lambda: best_of(lambda: eng.products(self, 0, x, y, Vw, frozen)[0], self.device,
                                   repeat=2, warmup=True) / w

        candidates = {}
        for m, eng in engines.items():
            for w in widths:
                candidates[f"{m}@{w}"] = lambda eng=eng, w=w: timer(eng, w)()
        names = tuple(f"{m}@{w}" for m in METHODS[1:] for w in widths)
        choice = self.planner.decide("product", candidates, names=names, errors=errors, catch=(Exception,))
        if accel and self._reusable(engines[choice.engine]):  # timed on batch 0 itself: keep its captures
            self._products = engines[choice.engine]
        else:
            self._products = Graphed(PRODUCT_ENGINES[choice.engine](), self.graphs)
        self.block = choice.block or self.block
        self._note_graphs()

    def _reusable(self, engine: Graphed) -> bool:
        """Whether an engine timed on :meth:`first_batch` may compute batch 0 of the passes: a
        cached engine keeps batch 0's gradient graph, which only data that yields the same first
        batch on every iteration (a list or tuple of batches) is sure to match."""
        return not isinstance(engine.engine, CachedGraph) or isinstance(self.data, (list, tuple))

    def _note_graphs(self) -> None:
        """Record (again, when it changed) what the product engine replays from CUDA graphs."""
        eng = self._products
        state = (len(eng.graphs), len(eng.errors))
        if state == self._graph_state:
            return
        self._graph_state = state
        if not self.graphs:
            c = Choice("graph", "eager", "requested", reason="graphs=False")
        elif self.device.type != "cuda":
            c = Choice("graph", "eager", "rule", reason=f"CUDA graphs capture CUDA work: on {self.device.type} "
                                                        "the products run eagerly")
        else:
            c = Choice("graph", "captured" if eng.graphs else "eager", "rule", errors=dict(eng.errors),
                       reason=f"{len(eng.graphs)} product(s) of static shape captured and replayed, each checked "
                              "against the eager product" + (" (the errors ran eagerly)" if eng.errors else ""))
        self.planner.record(c)

    @full_precision()
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for a (dim, k) block (or a (dim,) vector); counts ``k`` matvecs."""
        if V.dim() == 1:
            return self.matmat(V[:, None])[:, 0]
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected vectors of length {self.dim} (the selected parameters), got shape "
                             f"{tuple(V.shape)}")
        return self._matmat(V, "product")

    def _matmat(self, V: torch.Tensor, kind: str) -> torch.Tensor:
        """``H @ V``, counted under ``kind`` (``"product"``, or ``"quadratic"`` for the forms of
        the ``"hvp"`` engine)."""
        if V.shape[1] > self.max_block:
            return torch.cat([self._matmat(B, kind) for B in V.split(self.max_block, dim=1)], dim=1)
        self.prepare()
        V = V.to(device=self.device, dtype=self.dtype)
        engine = self._product_engine(self.unflatten(V))
        if V.shape[1] > self.block:
            return torch.cat([self._matmat(B, kind) for B in V.split(self.block, dim=1)], dim=1)
        k = V.shape[1]
        Vd = self.unflatten(V)
        check = self.on_nonfinite == "raise"
        flags: list[torch.Tensor] = []  # per batch: (loss finite, product finite), read once below
        acc = torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)
        n_total = 0
        with eval_mode(self.model):
            frozen = self.frozen()
            for i, x, y in self.passes("hvp"):
                prods, loss = engine.products(self, i, x, y, Vd, frozen)
                block = self.to_block(prods)
                if check:
                    flags.append(finite_pair(loss, block))
                acc += len(y) * block
                n_total += len(y)
        self._note_graphs()
        acc = self.reduce(acc, n_total, flags, "Hessian-vector product")
        self.num_matvecs += k
        self.count("quadratic:hvp" if kind == "quadratic" else f"product:{engine.name}", k)
        return acc

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for a flat vector of length :attr:`dim`."""
        return self.matmat(v)

    __matmul__ = matmat

    # -- the quadratic-form engine --------------------------------------------------------------
    @full_precision()
    def quadratic_forms(self, Z: torch.Tensor) -> torch.Tensor:
        """``z_i^T H z_i`` for each column of a (dim, k) block; counts ``k`` matvecs.

        Equal to ``(Z * (H @ Z)).sum(0)``, computed without the products when the model allows
        (the quadratic engine, see the class doc)."""
        if Z.dim() != 2 or Z.shape[0] != self.dim:
            raise ValueError(f"expected a (dim={self.dim}, k) block, got shape {tuple(Z.shape)}")
        self.prepare()
        Z = Z.to(device=self.device, dtype=self.dtype)
        if self.quadratic is None:
            if self.requested_quadratic == "taylor":
                with eval_mode(self.model):  # requested explicitly: an unsupported model raises here
                    self._forms = TaylorForms(self)
                self.planner.record(Choice("quadratic", "taylor", "requested", reason="quadratic given"))
            else:
                self._choose_quadratic(Z[:, : self.quadratic_block])
        if self.quadratic == "hvp":
            return dots(Z, self._matmat(Z, "quadratic")).to(self.dtype)
        return torch.cat([self._taylor_block(B) for B in Z.split(self.quadratic_block, dim=1)])

    def _taylor_block(self, B: torch.Tensor) -> torch.Tensor:
        k = B.shape[1]
        V = self.unflatten(B)
        acc = torch.zeros(k, 1, dtype=self.dtype, device=self.device)
        n_total, flags, fallbacks = 0, [], 0
        with eval_mode(self.model):
            frozen = self.frozen()
            for i, x, y in self.passes("forms"):
                if self._forms.rejects(x, y) is None:
                    q, ok = self._forms.forms(self, i, x, y, V, frozen)
                else:  # this batch by products: its forms are the same numbers
                    q, ok = ProductForms(self._product_engine(V)).forms(self, i, x, y, V, frozen)
                    fallbacks += 1
                if self.on_nonfinite == "raise":  # Taylor: the loss is finite where the model's output is
                    flags.append(torch.stack([torch.isfinite(ok).all() if ok.is_floating_point() else ok,
                                              torch.isfinite(q).all()]))
                acc[:, 0] += len(y) * q
                n_total += len(y)
        out = self.reduce(acc, n_total, flags, "quadratic form")[:, 0]
        self.num_matvecs += k
        self.count("quadratic:taylor", k)
        if fallbacks:
            self.count("fallback:taylor->hvp", fallbacks)
        return out

    def _choose_quadratic(self, Z: torch.Tensor) -> None:
        errors, timings, choice, reason = {}, {}, "hvp", ""
        accel = self.device.type != "cpu"
        with eval_mode(self.model):
            try:
                self._forms = TaylorForms(self)
                x, y = self.first_batch()
                why = self._forms.rejects(x, y)
                if why is not None:
                    raise NotImplementedError(why)
                n_full = len(y)
                if len(y) >= 32 and not accel:  # as for the products (_choose_products)
                    x, y = x[: len(y) // 4], y[: len(y) // 4]
                V, frozen = self.unflatten(Z), self.frozen()
                # probes per pass: tangents are k times the largest activation; past a budget memory
                # traffic costs more than the shared primal saves (BENCHMARKS.md, "behind the defaults")
                self._forms.forms(self, 0, x, y, {n: v[:1] for n, v in V.items()}, frozen)
                per_probe = self._forms.peak_bytes * n_full / max(len(y), 1)
                self.quadratic_block = max(1, min(self.quadratic_block, int(self.taylor_budget // max(per_probe, 1))))
                Z = Z[:, : self.quadratic_block]
                V = self.unflatten(Z)
                self._forms.forms(self, 0, x, y, V, frozen)  # warm-up
                P, hvp = self._hvp_candidate(Z, V, x, y, frozen, accel)
                t_taylor = t_hvp = float("inf")
                for _ in range(1 if accel else 2):  # best of two on the CPU, where single timings are noisy
                    (q_t, _), t = timed(lambda: self._forms.forms(self, 0, x, y, V, frozen), self.device)
                    t_taylor = min(t_taylor, t)
                    HV, t = timed(hvp, self.device)
                    t_hvp = min(t_hvp, t)
                q_t = q_t[: P.shape[1]]
                q_h = dots(P, HV).to(q_t.dtype)
                scale = (norms(P) * norms(HV)).to(q_t.dtype)
                timings = {"taylor": t_taylor / Z.shape[1], "hvp": t_hvp / P.shape[1]}
                if bool(((q_t - q_h).abs() > 1e-4 * scale + 1e-12).any()):
                    errors["taylor"] = (f"Taylor-mode forms disagree with Hessian-vector products ({q_t.tolist()} vs "
                                        f"{q_h.tolist()}): please report this model")
                    reason = "Taylor-mode forms failed the check against products"
                elif t_taylor <= t_hvp:
                    choice = "taylor"
            except Exception as e:  # noqa: BLE001 - any failure of the Taylor path means products
                errors["taylor"] = short_error(e)
                reason = "no Taylor-mode forms for this model, loss or data"
        how = "timing" if timings and "taylor" not in errors else "rule"
        if how == "timing":
            self.planner.decide("quadratic", {"taylor": lambda: timings["taylor"], "hvp": lambda: timings["hvp"]},
                                names=("taylor", "hvp"))
        else:  # every rank must run the same collectives: rank 0's choice
            choice = self.planner.agree(choice, QUADRATIC)
            self.planner.record(Choice("quadratic", choice, how, timings, errors, reason))
        if self.quadratic == "taylor" and self._forms is None:
            with eval_mode(self.model):
                self._forms = TaylorForms(self)
        elif self.quadratic == "hvp":
            self._forms = None

    def _hvp_candidate(self, Z, V, x, y, frozen, accel: bool):
        """The probes the ``"hvp"`` forms are timed on and the function computing their products:
        on the CPU double backward on all of ``Z``; on an accelerator the operator's own product
        engine (chosen now if not yet) at its block, as the forms would run (warmed up, captured)."""
        if not accel:
            rev = RevRev()
            return Z, lambda: self.to_block(rev.products(self, 0, x, y, V, frozen)[0])
        engine = self._product_engine(self.unflatten(Z[:, : self.max_block]))
        if not self._reusable(engine):  # batch 0's graph is not to be built from this batch
            engine = Graphed(type(engine.engine)(), self.graphs)
        P = Z[:, : self.block]
        Vp = self.unflatten(P)

        def hvp():
            return self.to_block(engine.products(self, 0, x, y, Vp, frozen)[0])

        hvp()
        return P, hvp

    def __repr__(self) -> str:
        return (f"HessianOperator(dim={self.dim}, params={len(self.names)} tensors, "
                f"product={self.method or 'auto'}, quadratic={self.quadratic or 'auto'}, "
                f"matvecs={self.num_matvecs})")
