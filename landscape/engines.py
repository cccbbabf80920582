"""The ways of computing one batch's Hessian-vector products and quadratic forms.

Each engine computes, for one batch of a :class:`landscape.operator.BaseOperator`, either the
products ``Hess(L_b) V`` of a block of ``k`` directions or the forms ``v_i^T Hess(L_b) v_i``
(``L_b`` the batch's mean loss); the operator loops over batches and accumulates.
:class:`landscape.HessianOperator` picks one of each (:mod:`landscape.planner`).

Products (``products(op, i, x, y, V, frozen) -> (dict of (k, *shape), loss)``):

* :class:`FwdRev` ``"fwd-rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``
  vmapped over the ``k`` tangents (Pearlmutter 1994; one forward, a gradient pass and its
  tangent per batch and block);
* :class:`RevRev` ``"rev-rev"``: double backward, one ``torch.autograd.grad`` with
  ``is_grads_batched=True`` on the graph of a ``create_graph=True`` gradient (a loop over the
  block where an operator has no batching rule);
* :class:`CachedGraph` ``"cached"``: as ``"rev-rev"``, but every batch's gradient graph is built
  once and kept, so a product costs only the batched double backward.

:class:`Graphed` wraps a product engine: on CUDA it captures the engine's products once per static
shape in a CUDA graph (``"fwd-rev"``, ``"rev-rev"``: one graph per batch shape and block, the
batch copied into it; ``"cached"``: one graph per batch and block, over the kept gradient graph)
and replays it, so that a product costs its kernels without their launches; each capture is
checked against the eager product it replaces. Anywhere else, or where a capture fails (the
engine then runs eagerly, with a one-line warning saying why), it calls the engine.

Quadratic forms (``forms(op, i, x, y, V, frozen) -> (k,) forms``):

* :class:`TaylorForms` ``"taylor"``: second-order forward (Taylor) mode, :mod:`landscape.taylor`;
  :meth:`TaylorForms.rejects` names a batch it cannot take (a target equal to ``ignore_index``,
  non-tensor inputs), which the operator then computes with products instead;
* :class:`ProductForms` ``"hvp"``: ``sum(v * (H v))`` from a product engine.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator
    >>> from landscape.engines import FwdRev
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (x, y))
    >>> V = op.unflatten(torch.randn(op.dim, 2))
    >>> HV, loss = FwdRev().products(op, 0, x, y, V, op.frozen())
    >>> op.to_block(HV).shape == (op.dim, 2)
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from .planner import short_error
from .taylor import TaylorQuadratic, quiet_forward_ad


class FwdRev:
    """Forward-over-reverse Hessian-vector products, vmapped over the block."""

    name = "fwd-rev"

    def products(self, op, i, x, y, V: dict, frozen: dict) -> tuple[dict, torch.Tensor]:
        """The batch's products ``Hess(L_b) V`` and its loss."""
        def loss(p):
            value = op.batch_loss(p, x, y, frozen)
            return value, value.detach()

        g = grad(loss, has_aux=True)

        def one(v):
            _, tangent, value = jvp(g, (op.params,), (v,), has_aux=True)
            return tangent, value

        with quiet_forward_ad():
            prods, values = vmap(one)(V)
        return prods, values[0]

    def reset(self) -> None:
        """Nothing is kept between products."""


def double_backward(op, graph, V: dict, retain: bool) -> dict:
    """``Hess(L_b) V`` by one batched double backward through ``graph`` (``BaseOperator.graph``),
    or a loop over the block where an operation has no batching rule."""
    leaves, g = graph[0], graph[1]
    outs = [V[n] for n in op.names]
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
    return {n: (r if r is not None else torch.zeros((k, *s), dtype=op.dtype, device=op.device))
            for n, r, s in zip(op.names, res, op.shapes)}


class RevRev:
    """Reverse-over-reverse (double backward) products; the graph is rebuilt for every product."""

    name = "rev-rev"

    def products(self, op, i, x, y, V: dict, frozen: dict) -> tuple[dict, torch.Tensor]:
        """The batch's products ``Hess(L_b) V`` and its loss."""
        graph = op.graph(x, y, frozen)
        return double_backward(op, graph, V, retain=False), graph[2]

    def reset(self) -> None:
        """Nothing is kept between products."""


class CachedGraph:
    """Double backward through gradient graphs built once per batch and kept.

    The graphs hold the batch's activations and the parameters as they were at the first
    product: build a new operator after changing the model. Memory: about :meth:`graph_bytes`
    per batch.
    """

    name = "cached"

    def __init__(self):
        self.graphs: dict[int, tuple] = {}

    def products(self, op, i, x, y, V: dict, frozen: dict) -> tuple[dict, torch.Tensor]:
        """The batch's products ``Hess(L_b) V`` and its loss (the graph of batch ``i`` is built
        on its first use)."""
        if i not in self.graphs:
            self.graphs[i] = op.graph(x, y, frozen)
        graph = self.graphs[i]
        return double_backward(op, graph, V, retain=True), graph[2]

    def reset(self) -> None:
        """Drop the graphs."""
        self.graphs.clear()

    @staticmethod
    def graph_bytes(op, x, y, frozen) -> int:
        """Bytes saved for the backward by one batch's gradient graph."""
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            op.graph(x, y, frozen)
        return total


PRODUCT_ENGINES = {e.name: e for e in (FwdRev, RevRev, CachedGraph)}

#: a replayed product may differ from the eager one by this much (relative, in norm) before its
#: capture is refused: the same kernels give the same numbers up to the order of atomic additions
REPLAY_TOLERANCE = 1e-4


class CudaGraphs:
    """The CUDA side of :class:`Graphed`: a side stream, a memory pool shared by its graphs, and
    capture. (A seam: a test replaces it to run the capture logic eagerly on the CPU.)"""

    def __init__(self, device: torch.device):
        self.stream, self.pool = torch.cuda.Stream(device), torch.cuda.graph_pool_handle()
        self.main = torch.cuda.current_stream(device)

    @contextlib.contextmanager
    def side_stream(self):
        """Run the enclosed work on the side stream, ordered after and before the main stream's."""
        self.main = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(self.main)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            self.main.wait_stream(self.stream)

    def capture(self, fn) -> Callable[[], None]:
        """Capture ``fn()`` in a CUDA graph (on the side stream, in the shared pool); its replay."""
        graph = torch.cuda.CUDAGraph()
        main = torch.cuda.current_stream(self.stream.device)
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                fn()
        except BaseException:
            torch.cuda.set_stream(main)  # a capture that fails to end leaves the side stream current
            main.wait_stream(self.stream)
            raise
        return graph.replay


class _Capture:
    """One captured product: its replay, its static inputs and outputs."""

    def __init__(self, replay, x, y, V: dict, out: dict, loss: torch.Tensor, pointers: tuple):
        self.replay, self.x, self.y, self.V, self.out, self.loss = replay, x, y, V, out, loss
        self.pointers = pointers  # the addresses of the parameters and buffers it reads


class Graphed:
    """A product engine whose products are replayed from CUDA graphs (see the module doc).

    Args:
        engine: a product engine (:class:`FwdRev`, :class:`RevRev` or :class:`CachedGraph`).
        enabled: ``False`` runs the engine eagerly everywhere.

    Attributes:
        graphs: the captured products, by key (``("shape", k, ...)`` or ``("batch", i, k)``).
        errors: why a product runs eagerly, by a readable key (a failed capture, a refused check).

    The outputs of a replay are the graph's own buffers, overwritten by the next replay: use them
    before the next product (the operator adds them into its accumulator at once).
    """

    backend = CudaGraphs

    def __init__(self, engine, enabled: bool = True):
        self.engine, self.enabled, self.name = engine, enabled, engine.name
        self.graphs: dict[tuple, _Capture] = {}
        self.errors: dict[str, str] = {}
        self._failed: set[tuple] = set()
        self._cuda: CudaGraphs | None = None
        self._static_V: dict[int, tuple] = {}  # k -> (static V, the V last copied in, its versions)

    def active(self, op) -> bool:
        """Whether this engine's products on ``op``'s device are captured."""
        return self.enabled and op.device.type == "cuda"

    def products(self, op, i, x, y, V: dict, frozen: dict) -> tuple[dict, torch.Tensor]:
        """The batch's products ``Hess(L_b) V`` and its loss: replayed, captured now, or eager."""
        if not self.active(op):
            return self.engine.products(op, i, x, y, V, frozen)
        key = self._key(op, i, x, y, V)
        if key is None or key in self._failed:
            return self.engine.products(op, i, x, y, V, frozen)
        cap = self.graphs.get(key)
        pointers = _pointers(op, frozen)
        if cap is not None and cap.pointers != pointers:  # a parameter or buffer was replaced: capture again
            del self.graphs[key]
            cap = None
        if cap is None:
            try:
                cap = self.graphs[key] = self._capture(op, i, x, y, V, frozen, pointers)
            except Exception as e:  # noqa: BLE001 - any failure of a capture means the eager product
                self._failed.add(key)
                self.errors[_label(key)] = short_error(e)
                warnings.warn(f"landscape: the {self.name} product ({_label(key)}) runs eagerly: its CUDA graph "
                              f"capture failed ({short_error(e)})", RuntimeWarning, stacklevel=4)
                return self.engine.products(op, i, x, y, V, frozen)
            return cap.out, cap.loss  # the check's replay left this batch's products in the outputs
        if cap.x is not None:  # the batch into the graph's input buffers
            for dst, src in zip(tree_flatten(cap.x)[0], tree_flatten(x)[0]):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
            cap.y.copy_(y)
        self._copy_V(V)
        cap.replay()
        return cap.out, cap.loss

    def reset(self) -> None:
        """Drop the graphs and the engine's state."""
        self.graphs.clear()
        self._failed.clear()
        self._static_V.clear()
        self.engine.reset()

    # -- capture ----------------------------------------------------------------------------
    def _key(self, op, i, x, y, V: dict) -> tuple | None:
        k = next(iter(V.values())).shape[0]
        if isinstance(self.engine, CachedGraph):  # one graph per batch: its gradient graph is the batch's
            return ("batch", i, k)
        leaves, spec = tree_flatten(x)
        sig = []
        for t in leaves:
            if isinstance(t, torch.Tensor):
                if t.device != op.device:
                    return None
                sig.append((tuple(t.shape), t.dtype))
            elif isinstance(t, (int, float, bool, str, type(None))):
                sig.append(t)  # a constant of the forward, captured with it
            else:
                return None
        if y.device != op.device:
            return None
        return ("shape", k, str(spec), tuple(sig), tuple(y.shape), y.dtype)

    def _copy_V(self, V: dict) -> dict:
        """The static block of ``V``'s width, holding ``V`` (copied only when ``V`` changed)."""
        k = next(iter(V.values())).shape[0]
        static, last, versions = self._static_V.get(k, (None, None, None))
        now = tuple(t._version for t in V.values())
        if static is None:
            static = {n: torch.empty_like(t) for n, t in V.items()}
        if last is not V or versions != now:
            for n, t in V.items():
                static[n].copy_(t)
        self._static_V[k] = (static, V, now)  # V is kept: its id cannot be reused by another block
        return static

    def _capture(self, op, i, x, y, V: dict, frozen: dict, pointers: tuple) -> _Capture:
        """Warm up on a side stream, capture one product, replay it and check it against the eager one."""
        if self._cuda is None:
            self._cuda = self.backend(op.device)
        cached = isinstance(self.engine, CachedGraph)
        # static inputs and outputs live outside the graphs' pool, allocated on the main stream
        sx = None if cached else tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, x)
        sy = None if cached else y.clone()
        sV = self._copy_V(V)
        xs, ys = (x, y) if cached else (sx, sy)  # a cached engine reads its batch's kept gradient graph
        with self._cuda.side_stream():  # warm-up, the eager reference (a cached engine builds its graph here)
            ref, ref_loss = self.engine.products(op, i, xs, ys, sV, frozen)
            ref_block = op.to_block(ref)
        out = {n: torch.empty_like(t) for n, t in ref.items()}
        loss = torch.empty_like(ref_loss)

        def product():
            prods, value = self.engine.products(op, i, xs, ys, sV, frozen)
            for n, t in prods.items():
                out[n].copy_(t)
            loss.copy_(value)

        replay = self._cuda.capture(product)
        replay()
        got, fin = op.to_block(out), torch.isfinite(ref_block)  # NaN where the eager product has NaN
        err = float((got - ref_block)[fin].norm() / ref_block[fin].norm().clamp_min(1e-30))
        same = torch.equal(fin, torch.isfinite(got)) and bool(torch.isclose(loss, ref_loss, rtol=1e-5, equal_nan=True))
        if not (err <= REPLAY_TOLERANCE and same):
            raise RuntimeError(f"the replayed product differs from the eager one by {err:.1e} (relative)")
        return _Capture(replay, sx, sy, sV, out, loss, pointers)


def _pointers(op, frozen: dict) -> tuple:
    """The addresses of the tensors a captured product reads besides its inputs."""
    return tuple(t.data_ptr() for t in op.params.values()) + tuple(
        t.data_ptr() for t in frozen.values() if isinstance(t, torch.Tensor))


def _label(key: tuple) -> str:
    """A readable key: ``"batch 3, block 4"`` or ``"block 4, batch shape (128, 3, 32, 32)"``."""
    if key[0] == "batch":
        return f"batch {key[1]}, block {key[2]}"
    shapes = [s[0] for s in key[3] if isinstance(s, tuple)]
    return f"block {key[1]}, batch shape {shapes[0] if len(shapes) == 1 else shapes}"


class TaylorForms:
    """Quadratic forms by second-order forward mode (:class:`landscape.taylor.TaylorQuadratic`).

    Raises:
        landscape.taylor.UnsupportedError: on construction, for a model or loss without rules.
    """

    name = "taylor"

    def __init__(self, op):
        self.tq = TaylorQuadratic(op.model, op.loss_fn, op.names)

    def rejects(self, x, y) -> str | None:
        """Why this batch cannot be taken (``None`` if it can): a check of the rules' conditions,
        run before the pass."""
        if not isinstance(x, torch.Tensor):
            return f"Taylor mode takes one tensor input, got {type(x).__name__}"
        ignore = self.tq.ignore_index
        if self.tq.loss_kind == "ce" and ignore is not None and not y.is_floating_point() and bool((y == ignore).any()):
            return f"targets equal to ignore_index={ignore}"
        return None

    def forms(self, op, i, x, y, V: dict, frozen: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's forms and whether its outputs are finite (0-d bool on the device)."""
        q = self.tq(x, y, V)
        return q, self.tq.output_finite

    @property
    def peak_bytes(self) -> int:
        """The largest activation of the last batch (a tangent is ``k`` times that)."""
        return self.tq.peak_bytes


class ProductForms:
    """Quadratic forms ``sum(v * (H_b v))`` from a product engine."""

    name = "hvp"

    def __init__(self, products):
        self.engine = products

    def forms(self, op, i, x, y, V: dict, frozen: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's forms and its loss."""
        HV, loss = self.engine.products(op, i, x, y, V, frozen)
        q = sum((V[n].reshape(V[n].shape[0], -1) * HV[n].reshape(HV[n].shape[0], -1)).sum(1) for n in op.names)
        return q, loss
