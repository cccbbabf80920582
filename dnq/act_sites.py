"""Where the paper convention quantizes activations: the BRECQ / QDrop reference code's places.

The reference code (github.com/wimh966/QDrop, ``quantize_model`` and ``QuantBasicBlock``;
github.com/yhhhli/BRECQ, ``QuantModel``) quantizes activations at *outputs*:

* a layer followed by an activation (ReLU, ReLU6) is quantized after the activation;
* a block (a residual block, an inverted-residual block) is quantized after the residual add and
  its activation; inside a block, the output of every layer that feeds another layer of the block
  after its activation (e.g. ``conv1`` + ReLU of a basic block), while the convolution before the
  add and the shortcut convolution are not quantized at their outputs;
* the image is not quantized, nor the network's output; the last quantizer (the one feeding
  the classifier) gets 8 bits.

:func:`paper_sites` finds these places on a float model with a torch.fx trace in which the known
blocks are leaves, and names each site after the unit it belongs to (``"conv1"``: the stem's
output after its ReLU; ``"layers.0"``: the block's output; ``"layers.0.conv2:in"``: inside the
block, the input of ``conv2``). A site is applied by a hook (:class:`SiteQuantizer`): a forward
hook on the module whose output is the site's value, or, inside a block, a forward pre-hook on the
layer that reads it. Where the activation is a function (``F.relu`` in the CIFAR ResNets' stem),
the hook sits on the module before it and applies the ReLU first; the function then sees
non-negative values and leaves them unchanged, so the network computes the same values.

Example:
    >>> from dnq.models import build_model
    >>> from dnq.quant import fold_batchnorm
    >>> model = fold_batchnorm(build_model("resnet20"))
    >>> sites = paper_sites(model)
    >>> [(s.name, s.module, s.kind, s.pre_act) for s in sites[:4]]  # doctest: +NORMALIZE_WHITESPACE
    [('conv1', 'bn1', 'output', 'relu'), ('layers.0.conv2:in', 'layers.0.conv2', 'input', None),
     ('layers.0', 'layers.0', 'output', None), ('layers.1.conv2:in', 'layers.1.conv2', 'input', None)]
    >>> sites[-1].name, sites[-1].last, len(sites)  # the last block's output feeds the classifier
    ('layers.8', True, 19)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .models.resnet import BasicBlock
from .models.vit import Block
from .quant import QUANT_LAYERS

_PASS = (nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout)
_ACT_MODULES = (nn.ReLU, nn.ReLU6)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", "relu": "relu", "relu_": "relu"}
_PRE_ACTS = {"relu": F.relu, "relu6": F.relu6}


@dataclasses.dataclass(frozen=True)
class Site:
    """One activation quantizer of the paper convention.

    Attributes:
        name: the site's name: the unit's name for a unit's output, ``"<layer>:in"`` for a
            block-internal input.
        module: the module the hook sits on.
        kind: ``"output"`` (a forward hook on ``module``) or ``"input"`` (a forward pre-hook).
        unit: the reconstruction unit (a block, or a layer outside blocks) the site belongs to.
        pre_act: the activation the hook applies before quantizing (``"relu"`` where the model
            applies it as a function after ``module``), or None.
        end: for a layer unit, the module whose output is the unit's quantized output (the
            activation module after the layer, or ``module``); None inside a block.
        last: the last site in execution order (it feeds the classifier: 8 bits in QDrop).
        producer: inside a block, the layer whose output (after ``act``) the site reads.
        act: inside a block, the activation between ``producer`` and the site (``"relu"``,
            ``"relu6"`` or None).
    """

    name: str
    module: str
    kind: str
    unit: str
    pre_act: str | None = None
    end: str | None = None
    last: bool = False
    producer: str | None = None
    act: str | None = None


def block_types() -> tuple[type, ...]:
    """The block classes the reconstruction knows (CIFAR and torchvision residual blocks,
    MobileNetV2's inverted residual, vit-tiny's transformer block)."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock as TVBasic
    from torchvision.models.resnet import Bottleneck

    return (BasicBlock, TVBasic, Bottleneck, InvertedResidual, Block)


class _BlockLeafTracer(torch.fx.Tracer):
    def __init__(self, blocks: tuple[type, ...]):
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.blocks) or super().is_leaf_module(m, qualname)


class ConventionError(ValueError):
    """The paper convention cannot place its quantizers on this model."""


def _act_of(node: torch.fx.Node, mods: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module" and isinstance(mods[node.target], _ACT_MODULES):
        return "module"
    if node.op in ("call_function", "call_method") and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_function" and node.target is F.hardtanh:
        raise ConventionError("a functional hardtanh/relu6 after a layer: the paper convention places its quantizer "
                              "after a ReLU/ReLU6 module or F.relu only")
    return None


def _layer_site(node: torch.fx.Node, mods: dict[str, nn.Module], calls: dict[str, int]) -> Site | None:
    """The output site of a layer outside blocks: after its activation, or None at the network's output."""
    cur, last_mod = node, node.target
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op == "call_module" and isinstance(mods[nxt.target], _PASS):
            cur, last_mod = nxt, nxt.target
            continue
        act = _act_of(nxt, mods)
        if act == "module":
            if calls[nxt.target] != 1:
                raise ConventionError(f"the activation module {nxt.target!r} after {node.target!r} is called "
                                      f"{calls[nxt.target]} times; the paper convention needs one module per place")
            return Site(node.target, nxt.target, "output", node.target, None, nxt.target)
        if act is not None:  # a function: the hook on the module before it applies it first
            return Site(node.target, last_mod, "output", node.target, act, last_mod)
        break
    if any(u.op == "output" for u in cur.users):
        return None  # the network's output is not quantized
    return Site(node.target, last_mod, "output", node.target, None, last_mod)


def _internal_sites(block_name: str, block: nn.Module) -> list[Site]:
    """Inside a block: the input of every layer that does not read the block's input."""
    graph = torch.fx.Tracer().trace(block)
    inner = dict(block.named_modules())
    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    out = []
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(inner[n.target], QUANT_LAYERS) and n.args[0] not in placeholders:
            name = f"{block_name}.{n.target}"
            producer, act, cur = None, None, n.args[0]
            while isinstance(cur, torch.fx.Node) and producer is None:  # back to the layer that feeds it
                if cur.op == "call_module" and isinstance(inner[cur.target], QUANT_LAYERS):
                    producer = f"{block_name}.{cur.target}"
                elif cur.op == "call_module" and isinstance(inner[cur.target], _ACT_MODULES):
                    act = "relu6" if isinstance(inner[cur.target], nn.ReLU6) else "relu"
                elif cur.op in ("call_function", "call_method") and cur.target in _ACT_FUNCTIONS:
                    act = _ACT_FUNCTIONS[cur.target]
                elif not (cur.op == "call_module" and isinstance(inner[cur.target], _PASS)):
                    break
                cur = cur.args[0] if cur.args else None
            out.append(Site(f"{name}:in", name, "input", block_name, producer=producer, act=act))
    return out


def paper_sites(model: nn.Module) -> list[Site]:
    """The activation quantizer sites of the paper convention on ``model``, in execution order.

    Args:
        model: a float model (BatchNorm folded or not) built of Conv/Linear layers, ReLU/ReLU6
            activations and the blocks of :func:`block_types` (except vit-tiny's).

    Raises:
        ConventionError: a model the paper convention cannot place quantizers on (a transformer
            block, a model torch.fx cannot trace, an activation module called twice), naming
            the problem and the ``dnq`` convention as the way out.
    """
    blocks = block_types()
    if any(isinstance(m, Block) for m in model.modules()):
        raise ConventionError("the paper convention (BRECQ/QDrop's quantizer places) is defined for CNNs; "
                              f"{type(model).__name__} has transformer blocks: use --convention dnq")
    try:
        graph = _BlockLeafTracer(blocks).trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types on untraceable code
        raise ConventionError(f"the paper convention needs a torch.fx trace of the model to place its quantizers, "
                              f"and {type(model).__name__} cannot be traced ({type(e).__name__}: {e}); use "
                              f"--convention dnq") from None
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    sites: list[Site] = []
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        mod = mods[n.target]
        if isinstance(mod, blocks):
            if calls[n.target] != 1:
                raise ConventionError(f"block {n.target!r} is called {calls[n.target]} times")
            sites += _internal_sites(n.target, mod)
            sites.append(Site(n.target, n.target, "output", n.target))
        elif isinstance(mod, QUANT_LAYERS):
            site = _layer_site(n, mods, calls)
            if site is not None:
                sites.append(site)
    if not sites:
        raise ConventionError(f"{type(model).__name__} has no activation the paper convention quantizes (one layer?)")
    sites[-1] = dataclasses.replace(sites[-1], last=True)
    return sites


class SiteQuantizer(nn.Module):
    """The hook of a site: the activation it applies first (``pre_act``) and its quantizer.

    ``quantizer`` is an activation quantizer module (:class:`dnq.quant.ActQuantizer`, or the LSQ
    quantizer of the reconstruction) or None (a float site: the float model of a reconstruction,
    where only ``pre_act`` applies). ``observer``, when set, sees every value before quantization.
    """

    def __init__(self, quantizer: nn.Module | None = None, pre_act: str | None = None):
        super().__init__()
        self.quantizer = quantizer
        self.pre_act = pre_act
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_act is not None:
            x = _PRE_ACTS[self.pre_act](x)
        if self.observer is not None:
            self.observer(x)
        return x if self.quantizer is None else self.quantizer(x)

    def extra_repr(self) -> str:
        return f"pre_act={self.pre_act}"


def _output_hook(module, args, out):
    return module.output_site(out)


def _input_hook(module, args):
    return (module.input_site(args[0]), *args[1:])


def attach_sites(model: nn.Module, sites: list[Site],
                 quantizers: dict[str, nn.Module | None]) -> dict[str, SiteQuantizer]:
    """Attach a :class:`SiteQuantizer` for every site (``quantizers[site.name]``: a quantizer module, a
    :class:`SiteQuantizer` to re-attach, or None for a float site) to
    ``model``, in place, as ``output_site`` (forward hook) or ``input_site`` (pre-hook) of the
    site's module; returns them by site name."""
    out = {}
    for s in sites:
        mod = model.get_submodule(s.module)
        q = quantizers.get(s.name)
        sq = q if isinstance(q, SiteQuantizer) else SiteQuantizer(q, s.pre_act)
        if s.kind == "output":
            if hasattr(mod, "output_site"):
                raise ConventionError(f"two sites on the output of {s.module!r}")
            mod.output_site = sq
            mod.register_forward_hook(_output_hook)
        else:
            mod.input_site = sq
            mod.register_forward_pre_hook(_input_hook)
        out[s.name] = sq
    return out


def unit_tail(sites: list[Site], unit: str) -> tuple[list[Site], str | None, str | None]:
    """How a reconstruction unit ends under the paper convention: ``(its sites, the module whose
    output is the unit's output when it is not the unit itself, the activation applied after
    the unit)``. A block ends in itself (its output site is a hook on it); a layer outside blocks
    at its site's module (its activation module, or the module its functional activation
    follows); a layer reconstructed alone inside a block (AdaRound) after its activation when it
    feeds a block-internal site, else (the layer before the residual add, a shortcut) at its output.

    Example:
        >>> from dnq.models import build_model
        >>> sites = paper_sites(build_model("resnet20"))
        >>> [unit_tail(sites, u)[1:] for u in ("conv1", "layers.0.conv1", "layers.0.conv2")]
        [('bn1', None), (None, 'relu'), (None, None)]
    """
    own = [s for s in sites if s.unit == unit]
    if own:
        end = own[-1].end
        return own, (None if end in (None, unit) else end), None
    feeds = [s for s in sites if s.producer == unit]
    return [], None, (feeds[0].act if feeds else None)


__all__ = ["ConventionError", "Site", "SiteQuantizer", "attach_sites", "block_types", "paper_sites", "unit_tail"]
