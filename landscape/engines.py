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

import torch
from torch.func import grad, jvp, vmap

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
