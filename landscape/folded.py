"""The model as a loss surface evaluates it: a ``torch.fx`` trace of a copy with every BatchNorm
folded into the convolution or linear layer before it (eval mode), optionally in ``channels_last``
layout, whose folded weights are recomputed from the perturbed parameters at each grid point
(:class:`Folded`; used by :mod:`landscape.surface`'s ``folded`` and ``compiled`` engines).

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape.folded import Folded
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    >>> model[1].running_mean.uniform_(-1, 1); model[1].running_var.uniform_(0.5, 2)  # doctest: +ELLIPSIS
    tensor(...)
    tensor(...)
    >>> params = dict(model.named_parameters())
    >>> f = Folded(model, params, list(params), channels_last=False)
    >>> x = torch.randn(2, 1, 6, 6)
    >>> torch.allclose(f.gm(x), model(x), atol=1e-5)  # the folded graph computes the model
    True
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call
from torch.nn.modules import module as mm

__all__ = ["FOLDABLE", "Folded", "Pair", "has_hooks", "to_channels_last"]

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_forward_ids = itertools.count()


def has_hooks(model: nn.Module) -> bool:
    if mm._global_forward_hooks or mm._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


@dataclass
class Pair:
    """A BatchNorm folded into the layer before it: ``layer`` and ``bn`` are module names."""

    layer: str
    bn: str
    had_bias: bool
    affine: bool
    mean: torch.Tensor
    inv_std: torch.Tensor

    def inputs(self) -> list[str]:
        names = [f"{self.layer}.weight"] + ([f"{self.layer}.bias"] if self.had_bias else [])
        return names + ([f"{self.bn}.weight", f"{self.bn}.bias"] if self.affine else [])

    def fold(self, p: dict) -> dict:
        """The layer's folded weight and bias from the (perturbed) parameters ``p``."""
        w = p[f"{self.layer}.weight"]
        s = p[f"{self.bn}.weight"] * self.inv_std if self.affine else self.inv_std
        wf = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        b = p[f"{self.layer}.bias"] - self.mean if self.had_bias else -self.mean
        bf = b * s + p[f"{self.bn}.bias"] if self.affine else b * s
        return {f"{self.layer}.weight": wf, f"{self.layer}.bias": bf}


class Folded:
    """A ``torch.fx`` trace of a copy of ``model`` with its BatchNorm layers folded where they
    follow a convolution or linear layer, optionally in ``channels_last`` layout.

    Args:
        model: the user's model (in eval mode; read, never written).
        params: its parameters, detached, by name.
        moving: the names of the parameters the directions move.
        channels_last: convert 4-D parameters (and, at evaluation, 4-D inputs) to channels_last.

    Raises:
        ValueError: the model cannot be folded (hooks, tied parameters, parametrizations).
        Any error of ``torch.fx.symbolic_trace`` on untraceable models.
    """

    def __init__(self, model: nn.Module, params: dict, moving: list[str], channels_last: bool):
        if has_hooks(model):
            raise ValueError("the model has forward hooks, which a traced graph would skip or move")
        if len(list(model.named_parameters(remove_duplicate=False))) != len(params):
            raise ValueError("the model has tied (shared) parameters")
        if any(hasattr(m, "parametrizations") for m in model.modules()):
            raise ValueError("the model has parametrized modules")
        m = copy.deepcopy(model).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        gm = fx.symbolic_trace(m)
        mods = dict(gm.named_modules())
        pairs = []
        for node in list(gm.graph.nodes):
            bn = mods.get(node.target) if node.op == "call_module" else None
            if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
                    and bn.running_mean is not None and len(node.args) == 1 and not node.kwargs):
                continue
            prev = node.args[0]
            if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
                continue
            layer = mods.get(prev.target)
            if type(layer) not in FOLDABLE or layer.weight.shape[0] != bn.num_features:
                continue  # exact types: a subclass may change what forward computes
            had_bias = layer.bias is not None
            if not had_bias:
                layer.bias = nn.Parameter(torch.zeros_like(bn.running_mean, dtype=layer.weight.dtype),
                                          requires_grad=False)
            inv_std = torch.rsqrt(bn.running_var.to(layer.weight.dtype) + bn.eps)
            pairs.append(Pair(prev.target, node.target, had_bias, bn.affine,
                               bn.running_mean.to(layer.weight.dtype), inv_std))
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        conv = channels_last and any(isinstance(x, nn.Conv2d) for x in gm.modules())
        if conv:
            gm = gm.to(memory_format=torch.channels_last)
        self.gm, self.pairs, self.channels_last = gm, pairs, conv
        fmt = to_channels_last if conv else (lambda t: t)
        self.params = {k: fmt(v) for k, v in params.items()}  # the model's values, in the layout of the graph
        gm_params = dict(gm.named_parameters())
        pair_out = {n for pr in pairs for n in (f"{pr.layer}.weight", f"{pr.layer}.bias")}
        missing = [k for k in gm_params if k not in pair_out and k not in params]
        if missing:
            raise ValueError(f"the traced graph has parameters the model does not name: {missing[:3]}")
        moving = set(moving)
        self.moving_pairs = [pr for pr in self.pairs if moving & set(pr.inputs())]
        self.direct = [k for k in moving if k in gm_params and k not in pair_out]  # moved as they are
        with torch.no_grad():
            for pr in self.pairs:  # every fold at the origin; the moving ones are redone per point
                for k, v in pr.fold(self.params).items():
                    gm_params[k].copy_(v)
        self.gm_params = gm_params
        self._compiled = None
        self.compiles = 0

    def values(self, moved: dict) -> dict:
        """Every graph parameter that depends on the moved parameters ``moved`` (by model name)."""
        out = {k: moved[k] for k in self.direct}
        if self.moving_pairs:
            p = {**self.params, **moved}
            for pr in self.moving_pairs:
                out.update(pr.fold(p))
        return out

    def write(self, values: dict) -> None:
        for k, v in values.items():
            self.gm_params[k].copy_(v)

    def compiled(self, backend_name="inductor"):
        """``f(values, x)``: the graph's output with ``values`` in place of its parameters, compiled
        with ``backend_name`` (a ``torch.compile`` backend name or callable) on first use (one
        ``torch.compile`` per surface; each new input shape compiles once)."""
        if self._compiled is None:
            # a fresh code object per surface: torch._dynamo keeps its compiled graphs per code
            # object, and a shared one would reach its recompile limit after a few surfaces
            ns = {"functional_call": functional_call}
            src = "def surface_forward(module, values, x):\n    return functional_call(module, values, (x,))\n"
            exec(compile(src, f"<landscape.surface forward {next(_forward_ids)}>", "exec"), ns)
            inner = backend_name
            if isinstance(inner, str):
                from torch._dynamo import lookup_backend  # noqa: PLC0415 - torch._dynamo loads in seconds: compile only

                inner = lookup_backend(inner)

            def backend(graph, example_inputs):
                self.compiles += 1
                return inner(graph, example_inputs)

            fn = torch.compile(ns["surface_forward"], backend=backend, dynamic=False)
            gm = self.gm
            self._compiled = lambda values, x: fn(gm, values, x)
        return self._compiled
