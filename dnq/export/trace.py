"""The graph of a quantized model, with its quantizers as nodes: what :mod:`dnq.export` translates.

The toolkit's quantizers are applied by hooks (:func:`dnq.quant.quantize` attaches an
``input_quantizer`` as a forward pre-hook on every Conv/Linear; the paper convention,
:mod:`dnq.act_sites`, attaches ``output_site`` / ``input_site`` hooks). A plain ``torch.fx`` trace
skips the hooks of the modules it keeps as leaves, so :class:`QuantTracer` runs them itself: a
pre-hook's quantizer becomes a node before the layer's node, a forward hook's after it. Every
activation quantizer (:class:`dnq.quant.ActQuantizer`) is a leaf node, so that the exporter sees
its scale, zero point and range in one place. A hook the exporter does not know is refused: its
effect on the values cannot be read from the graph.

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.quant import quantize
    >>> q = quantize(build_model("cnn-digits", 10, 1, 8).eval(), 4, 4, torch.randn(64, 1, 8, 8))
    >>> gm = trace_quantized(q, torch.randn(2, 1, 8, 8))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"][:4]
    ['0.input_quantizer', '0', '1', '2']
    >>> tuple(gm.graph.find_nodes(op="output")[0].args[0].meta["tensor_meta"].shape)
    (2, 10)
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..act_sites import _input_hook, _output_hook
from ..quant import ActQuantizer, _quantize_input_hook
from .errors import ExportError

KNOWN_HOOKS = (_quantize_input_hook, _input_hook, _output_hook)
"""The hooks the tracer runs itself on a leaf module: the toolkit's quantizer hooks."""


class QuantTracer(torch.fx.Tracer):
    """A ``torch.fx`` tracer that keeps activation quantizers as leaves and runs the toolkit's
    quantizer hooks of leaf modules (a standard trace would skip them)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ActQuantizer) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        if not self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)  # traced into: Module.__call__ runs its hooks
        _check_hooks(m, path)
        for hook in m._forward_pre_hooks.values():
            res = hook(m, args)
            if res is not None:
                args = res if isinstance(res, tuple) else (res,)
        out = super().call_module(m, forward, args, kwargs)
        for hook in m._forward_hooks.values():
            res = hook(m, args, out)
            if res is not None:
                out = res
        return out


def _check_hooks(m: nn.Module, path: str) -> None:
    """Refuse a leaf module with a hook the tracer does not know, or with keyword-argument hooks."""
    for kind, hooks in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks)):
        for hook in hooks.values():
            if hook not in KNOWN_HOOKS:
                name = getattr(hook, "__qualname__", type(hook).__name__)
                raise ExportError(f"{path or 'the model'} ({type(m).__name__}) has a {kind} the exporter does not "
                                  f"know ({name}); remove it, or export a model quantized by dnq's PTQ")
    if getattr(m, "_forward_pre_hooks_with_kwargs", None) or getattr(m, "_forward_hooks_with_kwargs", None):
        raise ExportError(f"{path or 'the model'} ({type(m).__name__}) has hooks taking keyword arguments, which "
                          "the exporter cannot read; remove them")


def trace_quantized(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """Trace ``model`` (eval mode, on the CPU) with :class:`QuantTracer` and record every node's
    output shape (``node.meta["tensor_meta"]``) on ``example``.

    Raises:
        ExportError: the model cannot be traced, or has a hook the exporter does not know.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        got = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ExportError(f"example must be a batch of model inputs (a tensor with a batch dimension), got {got}")
    tracer = QuantTracer()
    try:
        graph = tracer.trace(model)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - fx raises many types on untraceable code
        raise ExportError(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); the exporter "
                          "needs a traceable forward (no data-dependent control flow)") from None
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    with torch.no_grad():
        ShapeProp(gm).propagate(example[:2].float())
    return gm


__all__ = ["KNOWN_HOOKS", "QuantTracer", "trace_quantized"]
