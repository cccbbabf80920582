"""Translate a traced quantized model (:mod:`dnq.export.trace`) into an ONNX QDQ graph.

Each quantized weight is stored as integers (its :class:`dnq.quant.WeightGrid` levels) behind a
per-channel ``DequantizeLinear`` (``axis`` = the output channel): INT4/UINT4 from opset 21,
INT2/UINT2 from opset 25, 8 bits always; any other width (and 2 or 4 bits below those opsets)
is held in 8-bit integers, which store the same levels. Signed grids (the ``dnq`` convention's
symmetric weights) are INT types, asymmetric ones (the ``paper`` convention's) UINT.

Each activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` with its calibrated
scale and zero point, in UINT8: runtimes execute 8-bit activations (an activation is not
stored, so a narrower type saves nothing), and onnxruntime 1.32 moves UINT4 activations into
``MaxPool``, which then refuses them. ``QuantizeLinear`` saturates at its type's range (0..255),
so a narrower quantizer gets a ``Clip`` to its own range first (``[(qmin - zp) * scale,
(qmax - zp) * scale]``, in float32): after it, rounding lands on the quantizer's levels exactly.

Why our own translation rather than ``torch.onnx.export``: the TorchScript exporter writes
fake-quantize ops only for 8-bit ranges (and is deprecated), the dynamo exporter writes QDQ only for
``torch.ao`` / PT2E quantized graphs, and neither reads the toolkit's hook-based quantizers or
stores 4-bit weights. The supported layers are the model zoo's (:data:`SUPPORTED`); anything
else is refused, naming the layer, before a file is written.

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.quant import quantize
    >>> q = quantize(build_model("cnn-digits", 10, 1, 8).eval(), 4, 4, torch.randn(64, 1, 8, 8))
    >>> proto, info = build_onnx(q, torch.randn(2, 1, 8, 8), opset=21)
    >>> sorted({n.op_type for n in proto.graph.node})  # doctest: +NORMALIZE_WHITESPACE
    ['Clip', 'Conv', 'DequantizeLinear', 'Flatten', 'Gemm', 'GlobalAveragePool', 'Identity', 'MaxPool',
     'QuantizeLinear', 'Relu']
    >>> [(w["layer"], w["bits"], w["container"]) for w in info["weights"]]  # first and last at 8 bits
    [('0', 8, 'INT8'), ('3', 4, 'INT4'), ('7', 4, 'INT4'), ('12', 8, 'INT8')]
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import os

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from dnq_landscape_common.io import atomic_write_bytes

from ..quant import ActQuantizer
from .errors import ExportError, require
from .trace import trace_quantized

MIN_OPSET, DEFAULT_OPSET, MAX_OPSET = 13, 21, 25
"""13: per-channel ``DequantizeLinear``; 21: INT4/UINT4; 25: INT2/UINT2 (onnxruntime runs all three)."""
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU,
           nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
SUPPORTED = (*(t.__name__ for t in _LAYERS), "add", "mul", "cat", "relu", "relu6", "flatten", "view", "reshape", "mean",
             "adaptive_avg_pool2d")
"""The layers and functions the exporter translates (by class or function name)."""
# ONNX tensor element types by name (onnx.TensorProto values), so that this module imports onnx lazily
_ELEM = {"FLOAT": 1, "UINT8": 2, "INT8": 3, "INT64": 7, "UINT4": 21, "INT4": 22, "UINT2": 25, "INT2": 26}


@dataclasses.dataclass(frozen=True)
class Normalization:
    """The input normalization put in front of the graph: ``(x / max_value - mean) / std`` per
    channel, computed in float32 as :meth:`dnq.data.Dataset.normalize` does; the graph then takes
    raw ``uint8`` images."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_value: float = 255.0

    @classmethod
    def of_dataset(cls, ds) -> "Normalization":
        """The normalization of a :class:`dnq.data.Dataset`."""
        return cls(tuple(float(v) for v in ds.mean), tuple(float(v) for v in ds.std), float(ds.max_value))


def container(bits: int, signed: bool, opset: int) -> tuple[str, bool]:
    """The ONNX integer type holding ``bits``-bit levels at ``opset``, and whether it is native
    (the type's own range) or an 8-bit container.

    Example:
        >>> container(4, True, 21), container(2, False, 21), container(2, False, 25), container(3, True, 25)
        (('INT4', True), ('UINT8', False), ('UINT2', True), ('INT8', False))
    """
    prefix = "INT" if signed else "UINT"
    if bits == 8 or (bits == 4 and opset >= 21) or (bits == 2 and opset >= 25):
        return f"{prefix}{bits}", True
    return f"{prefix}8", False


def _np_dtype(elem: str):
    import ml_dtypes  # onnx's own dependency, for the 2- and 4-bit numpy types

    return {"INT8": np.int8, "UINT8": np.uint8, "INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4,
            "INT2": ml_dtypes.int2, "UINT2": ml_dtypes.uint2}[elem]


def check_opset(opset) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET} (21: 4-bit weights stored as INT4; "
                          f"25: 2-bit too), got {opset!r}")
    return opset


class _Static:
    """A non-tensor value of the trace (a shape, a size): used by reshapes, never emitted."""


class _Builder:
    def __init__(self, onnx, opset: int):
        self.onnx, self.opset = onnx, opset
        self.nodes, self.inits, self.used = [], [], set()

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "v"
        out, i = base, 1
        while out in self.used:
            out, i = f"{base}_{i}", i + 1
        self.used.add(out)
        return out

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


class _Converter:
    """Walks the fx graph once and emits ONNX nodes; refuses what it cannot translate."""

    def __init__(self, gm: torch.fx.GraphModule, b: _Builder):
        self.gm, self.b = gm, b
        self.mods = dict(gm.named_modules())
        self.values: dict[torch.fx.Node, object] = {}
        self.weights: list[dict] = []
        self.acts: list[dict] = []

    # -- helpers --------------------------------------------------------------------------------
    def v(self, a):
        if isinstance(a, torch.fx.Node):
            val = self.values[a]
            if isinstance(val, _Static):
                raise ExportError(f"{a.name} (a shape or size) is used as a tensor; the exporter translates "
                                  "static-shape models only")
            return val
        return a

    @staticmethod
    def shape(node: torch.fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise ExportError(f"no shape was recorded for {node.name}; the exporter needs tensor outputs")
        return tuple(meta.shape)

    def refuse(self, what: str, where: str):
        raise ExportError(f"{where}: {what} has no ONNX translation in dnq.export (supported: {', '.join(SUPPORTED)}); "
                          "this model cannot be exported")

    def run(self, input_name: str) -> str:
        out = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if input_name in self.values.values():
                    raise ExportError(f"the model's forward takes more than one input ({node.name}); the exporter "
                                      "writes models of one image batch")
                self.values[node] = input_name
            elif node.op == "output":
                out = self.v(node.args[0])
            elif node.op == "call_module":
                self.values[node] = self.module(node, self.mods[node.target])
            elif node.op == "call_function":
                self.values[node] = self.function(node, node.target)
            elif node.op == "call_method":
                self.values[node] = self.method(node, node.target)
            else:
                self.refuse(f"a {node.op} node ({node.target})", node.name)
        if not isinstance(out, str):
            raise ExportError("the model's output is not one tensor; the exporter writes single-output models")
        return out

    # -- quantizers and weights -----------------------------------------------------------------
    def quantizer(self, x: str, q: ActQuantizer, name: str) -> str:
        """``[Clip ->] QuantizeLinear -> DequantizeLinear`` in an 8-bit container (see the module's notes)."""
        elem = "INT8" if q.qmin < 0 else "UINT8"
        dt = _np_dtype(elem)
        scale_f = np.float32(float(q.scale))
        zp_i = int(round(float(q.zero_point)))
        full = (q.qmin, q.qmax) == ((-128, 127) if q.qmin < 0 else (0, 255))
        if not full:  # QuantizeLinear saturates at the container's range: clip to the quantizer's first
            lo, hi = np.float32((q.qmin - zp_i) * scale_f), np.float32((q.qmax - zp_i) * scale_f)
            x = self.clip(x, float(lo), float(hi), f"{name}.clip")
        scale = self.b.const(f"{name}.scale", np.array(scale_f, dtype=np.float32))
        zp = self.b.const(f"{name}.zero_point", np.array(zp_i, dtype=dt))
        y = self.b.node("QuantizeLinear", [x, scale, zp], f"{name}.q")
        self.acts.append({"quantizer": name, "bits": q.bits, "container": elem, "clip": not full,
                          "scale": float(scale_f), "zero_point": zp_i, "qmin": q.qmin, "qmax": q.qmax})
        return self.b.node("DequantizeLinear", [y, scale, zp], f"{name}.dq")

    def weight(self, name: str, layer: nn.Module, transpose: bool = False) -> str:
        w = layer.weight.detach().float().cpu()
        grid = getattr(layer, "weight_grid", None)
        if grid is None:
            self.weights.append({"layer": name, "bits": None, "container": "FLOAT", "native": True,
                                 "numel": int(w.numel()), "bytes": 4 * int(w.numel())})
            return self.b.const(f"{name}.weight", (w.t() if transpose else w).numpy())
        if grid.scale.numel() != w.shape[0]:
            raise ExportError(f"layer {name}: its weight grid has {grid.scale.numel()} channels, the weight "
                              f"{w.shape[0]}; was the layer changed after PTQ?")
        levels = grid.levels(w)
        view = (-1,) + (1,) * (w.dim() - 1)
        err = ((levels.float() - grid.zero_point.view(view)) * grid.scale.view(view) - w).abs()
        tol = 1e-3 * grid.scale.view(view) + 1e-6 * w.abs()
        if levels.min() < grid.qmin or levels.max() > grid.qmax or bool((err > tol).any()):
            raise ExportError(f"layer {name}: the weight is not on its recorded {grid.bits}-bit grid (largest "
                              f"error {float(err.max()):.3g}); was the model changed after PTQ?")
        elem, native = container(grid.bits, grid.qmin < 0, self.b.opset)
        dt = _np_dtype(elem)
        q = (levels.t() if transpose else levels).numpy().astype(dt)
        qn = self.b.const(f"{name}.weight_q", q)
        stored = len(self.b.inits[-1].raw_data)
        scale = self.b.const(f"{name}.weight_scale", grid.scale.numpy().astype(np.float32))
        zp = self.b.const(f"{name}.weight_zero_point", grid.zero_point.numpy().round().astype(np.int64).astype(dt))
        self.weights.append({"layer": name, "bits": grid.bits, "container": elem, "native": native,
                             "numel": int(levels.numel()), "bytes": stored,
                             "qmin": grid.qmin, "qmax": grid.qmax,
                             "grid": "symmetric" if grid.qmin < 0 else "asymmetric"})
        return self.b.node("DequantizeLinear", [qn, scale, zp], f"{name}.weight", axis=1 if transpose else 0)

    def bias(self, name: str, layer: nn.Module) -> list[str]:
        if layer.bias is None:
            return []
        return [self.b.const(f"{name}.bias", layer.bias.detach().float().cpu().numpy())]

    # -- modules --------------------------------------------------------------------------------
    def module(self, node: torch.fx.Node, m: nn.Module):
        x, name = self.v(node.args[0]) if node.args else None, node.target
        if isinstance(m, ActQuantizer):
            return self.quantizer(x, m, name)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(x, m, name)
        if isinstance(m, nn.Linear):
            return self.linear(node, x, m, name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self.batchnorm(x, m, name)
        if isinstance(m, nn.ReLU):
            return self.b.node("Relu", [x], name)
        if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
            return self.clip(x, lo, hi, name)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim, name)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return self.pool(x, m, name)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive_avg(node, x, m.output_size, name)
        self.refuse(f"{type(m).__name__}", f"layer {name!r}")

    def conv(self, x: str, m: nn.Module, name: str) -> str:
        if m.padding_mode != "zeros":
            self.refuse(f"{type(m).__name__} with padding_mode={m.padding_mode!r}", f"layer {name!r}")
        if isinstance(m.padding, str):
            self.refuse(f"{type(m).__name__} with padding={m.padding!r} (give the padding as numbers)",
                        f"layer {name!r}")
        w = self.weight(name, m)
        pads = list(m.padding) * 2
        return self.b.node("Conv", [x, w, *self.bias(name, m)], name, kernel_shape=list(m.kernel_size),
                           strides=list(m.stride), pads=pads, dilations=list(m.dilation), group=m.groups)

    def linear(self, node: torch.fx.Node, x: str, m: nn.Linear, name: str) -> str:
        if len(self.shape(node.args[0])) == 2:
            return self.b.node("Gemm", [x, self.weight(name, m), *self.bias(name, m)], name, transB=1)
        y = self.b.node("MatMul", [x, self.weight(name, m, transpose=True)], f"{name}.matmul")
        return self.b.node("Add", [y, *self.bias(name, m)], name) if m.bias is not None else y

    def batchnorm(self, x: str, m: nn.Module, name: str) -> str:
        if m.running_mean is None:
            self.refuse("a BatchNorm without running statistics", f"layer {name!r}")
        c = m.num_features
        gamma = m.weight.detach() if m.affine else torch.ones(c)
        beta = m.bias.detach() if m.affine else torch.zeros(c)
        ins = [self.b.const(f"{name}.{k}", t.float().cpu().numpy())
               for k, t in (("scale", gamma), ("B", beta), ("mean", m.running_mean), ("var", m.running_var))]
        return self.b.node("BatchNormalization", [x, *ins], name, epsilon=float(m.eps))

    def clip(self, x: str, lo: float, hi: float, name: str) -> str:
        lo_n = self.b.const(f"{name}.min", np.array(lo, dtype=np.float32))
        hi_n = self.b.const(f"{name}.max", np.array(hi, dtype=np.float32))
        return self.b.node("Clip", [x, lo_n, hi_n], name)

    def flatten(self, node: torch.fx.Node, x: str, start: int, end: int, name: str) -> str:
        rank = len(self.shape(node.args[0]))
        if start % rank == 1 and end % rank == rank - 1:
            return self.b.node("Flatten", [x], name, axis=1)
        return self.reshape(node, x, name)

    def reshape(self, node: torch.fx.Node, x: str, name: str) -> str:
        out, inp = self.shape(node), self.shape(node.args[0])
        if not out or not inp or out[0] != inp[0]:
            self.refuse("a reshape that changes the batch dimension", node.name)
        shape = self.b.const(f"{name}.shape", np.array([-1, *out[1:]], dtype=np.int64))
        return self.b.node("Reshape", [x, shape], name)

    def pool(self, x: str, m: nn.Module, name: str) -> str:
        def pair(v):
            return list(v) if isinstance(v, (tuple, list)) else [v, v]
        k, s, p = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
        if isinstance(m, nn.MaxPool2d):
            return self.b.node("MaxPool", [x], name, kernel_shape=k, strides=s, pads=p * 2,
                               dilations=pair(m.dilation), ceil_mode=int(m.ceil_mode))
        if m.divisor_override is not None:
            self.refuse("AvgPool2d with divisor_override", f"layer {name!r}")
        return self.b.node("AveragePool", [x], name, kernel_shape=k, strides=s, pads=p * 2,
                           ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))

    def adaptive_avg(self, node: torch.fx.Node, x: str, size, name: str) -> str:
        inp, out = self.shape(node.args[0]), self.shape(node)
        if out[2:] == (1, 1):
            return self.b.node("GlobalAveragePool", [x], name)
        if any(i % o for i, o in zip(inp[2:], out[2:])):
            self.refuse(f"adaptive average pooling from {inp[2:]} to {out[2:]} (not a whole window)", name)
        k = [i // o for i, o in zip(inp[2:], out[2:])]
        return self.b.node("AveragePool", [x], name, kernel_shape=k, strides=k)

    # -- functions and methods ------------------------------------------------------------------
    def binary(self, node: torch.fx.Node, op: str):
        a, c = node.args[0], node.args[1]
        names = []
        for t in (a, c):
            if isinstance(t, torch.fx.Node):
                names.append(self.v(t))
            elif isinstance(t, (int, float)):
                names.append(self.b.const(f"{node.name}.const", np.array(t, dtype=np.float32)))
            else:
                self.refuse(f"{op} with a {type(t).__name__} operand", node.name)
        return self.b.node(op, names, node.name)

    def function(self, node: torch.fx.Node, fn):
        if fn in (operator.add, operator.iadd, torch.add):
            return self.binary(node, "Add")
        if fn in (operator.mul, operator.imul, torch.mul):
            return self.binary(node, "Mul")
        if fn in (F.relu, torch.relu):
            return self.b.node("Relu", [self.v(node.args[0])], node.name)
        if fn is F.relu6:
            return self.clip(self.v(node.args[0]), 0.0, 6.0, node.name)
        if fn is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return self.clip(self.v(node.args[0]), float(lo), float(hi), node.name)
        if fn is F.adaptive_avg_pool2d:
            return self.adaptive_avg(node, self.v(node.args[0]), None, node.name)
        if fn is torch.flatten:
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return self.flatten(node, self.v(node.args[0]), start, end, node.name)
        if fn is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return self.b.node("Concat", [self.v(t) for t in node.args[0]], node.name, axis=int(dim))
        if fn in (getattr, operator.getitem) and not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            return _Static()
        self.refuse(f"the function {getattr(fn, '__name__', fn)}", node.name)

    def method(self, node: torch.fx.Node, name: str):
        if name in ("size", "dim"):
            return _Static()
        x = self.v(node.args[0])
        if name in ("relu", "relu_"):
            return self.b.node("Relu", [x], node.name)
        if name in ("add", "add_"):
            return self.binary(node, "Add")
        if name in ("mul", "mul_"):
            return self.binary(node, "Mul")
        if name in ("contiguous", "clone", "detach"):
            return x
        if name == "flatten":
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return self.flatten(node, x, start, end, node.name)
        if name in ("view", "reshape"):
            return self.reshape(node, x, node.name)
        if name == "mean":
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            axes = self.b.const(f"{node.name}.axes", np.array(dims, dtype=np.int64))
            if self.b.opset < 18:
                return self.b.node("ReduceMean", [x], node.name, axes=dims, keepdims=int(keep))
            return self.b.node("ReduceMean", [x, axes], node.name, keepdims=int(keep))
        self.refuse(f"the tensor method .{name}()", node.name)


_MODULES = (*_LAYERS, ActQuantizer, nn.Sequential, nn.ModuleList, nn.ModuleDict)  # containers hold the others


def _check_layers(model: nn.Module) -> None:
    """Refuse, before tracing, the first module without children that has no translation."""
    for name, m in model.named_modules():
        if not any(True for _ in m.children()) and not isinstance(m, _MODULES):
            raise ExportError(f"layer {name!r} ({type(m).__name__}) has no ONNX translation in dnq.export "
                              f"(supported: {', '.join(SUPPORTED)}); this model cannot be exported")


def _normalize(b: _Builder, norm: Normalization | None, shape: tuple[int, ...]) -> tuple[str, str]:
    """The graph input, and the value the model reads (the normalized image)."""
    if norm is None:
        return "input", "input"
    channels = shape[1]
    if len(norm.mean) != channels or len(norm.std) != channels:
        raise ExportError(f"the normalization has {len(norm.mean)} means and {len(norm.std)} stds for a model with "
                          f"{channels} input channels")
    b.used.add("image")
    view = (1, channels) + (1,) * (len(shape) - 2)  # per channel, broadcast over the batch and the positions
    x = b.node("Cast", ["image"], "image_float", to=_ELEM["FLOAT"])
    x = b.node("Div", [x, b.const("max_value", np.array(norm.max_value, dtype=np.float32))], "image_scaled")
    mean = np.array(norm.mean, dtype=np.float32).reshape(view)
    std = np.array(norm.std, dtype=np.float32).reshape(view)
    x = b.node("Sub", [x, b.const("mean", mean)], "image_centred")
    return "image", b.node("Div", [x, b.const("std", std)], "normalized")


@torch.no_grad()
def build_onnx(model: nn.Module, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
               normalization: Normalization | None = None, metadata: dict | None = None):
    """The ONNX model of a quantized (or float) ``model``, in memory.

    Args:
        model: a model from the toolkit's PTQ (:func:`dnq.ptq.apply_ptq`), or a float model
            (its weights are then stored in float32 and it has no quantizer).
        example: a batch the model takes (normalized images): its shapes fix the graph's.
        opset: the ONNX opset (:data:`MIN_OPSET`..:data:`MAX_OPSET`).
        normalization: put the input normalization in the graph, which then takes raw ``uint8``
            images named ``image``; None: the graph takes normalized float32 images named ``input``.
        metadata: string key/values for the model's ``metadata_props``.

    Returns:
        ``(onnx.ModelProto, info)``; ``info`` lists ``weights`` (per layer: bits, container
        type) and ``activations`` (per quantizer: bits, container, scale, zero point).

    Raises:
        ExportError: a layer, function or hook without translation, a weight off its grid, a bad
            opset; nothing is written.
    """
    onnx = require("onnx")
    check_opset(opset)
    if opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows (up to "
                          f"{onnx.defs.onnx_opset_version()}); upgrade onnx or pass a lower opset")
    _check_layers(model)
    model = _cpu_copy(model)
    gm = trace_quantized(model, example.detach().cpu())
    b = _Builder(onnx, opset)
    in_name, x = _normalize(b, normalization, tuple(example.shape))
    conv = _Converter(gm, b)
    y = conv.run(x)
    b.nodes.append(onnx.helper.make_node("Identity", [y], ["logits"], name="logits"))
    dims = ["batch", *[int(d) for d in example.shape[1:]]]
    elem = _ELEM["UINT8"] if normalization is not None else _ELEM["FLOAT"]
    out_node = gm.graph.find_nodes(op="output")[0].args[0]
    out_shape = ["batch", *[int(d) for d in _Converter.shape(out_node)[1:]]]
    graph = onnx.helper.make_graph(b.nodes, type(model).__name__,
                                   [onnx.helper.make_tensor_value_info(in_name, elem, dims)],
                                   [onnx.helper.make_tensor_value_info("logits", _ELEM["FLOAT"], out_shape)], b.inits)
    opsets = [onnx.helper.make_opsetid("", opset)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="dnq-landscape",
                                   ir_version=onnx.helper.find_min_ir_version_for(opsets))
    for k, val in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), str(val)
    return proto, {"weights": conv.weights, "activations": conv.acts, "input": in_name, "output": "logits"}


def checker(model) -> None:
    """``onnx.checker.check_model(..., full_check=True)`` on a ``ModelProto``, path or bytes.

    Raises:
        ExportError: the checker's finding, in one line.
    """
    onnx = require("onnx")
    proto = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else (
        onnx.load_from_string(model) if isinstance(model, bytes) else model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 - the checker raises ValidationError and shape-inference errors
        raise ExportError(f"onnx.checker rejects the exported model: {str(e).splitlines()[0]}") from None


def to_onnx(qmodel: nn.Module, example: torch.Tensor, path, *, opset: int = DEFAULT_OPSET,
            normalization: Normalization | None = None, overwrite: bool = False, metadata: dict | None = None) -> dict:
    """Write a quantized model as an ONNX QDQ file (atomically) after ``onnx.checker`` accepts it.

    Args:
        qmodel: a model from the toolkit's PTQ (:func:`dnq.ptq.apply_ptq`, :func:`dnq.quant.quantize`,
            :func:`dnq.recon.reconstruct`), either convention, mixed precision included.
        example: a batch the model takes (normalized images), for the graph's shapes.
        path: the file to write. An existing file is replaced only with ``overwrite``.
        opset, normalization, metadata: as in :func:`build_onnx`.

    Returns:
        :func:`build_onnx`'s ``info`` with ``path`` and ``bytes`` (the file's size).

    Raises:
        ExportError: what :func:`build_onnx` refuses, the checker's finding, or an existing
            ``path`` without ``overwrite``; nothing is written then.

    Example:
        >>> import os, tempfile, torch
        >>> from dnq.models import build_model
        >>> from dnq.quant import quantize
        >>> q = quantize(build_model("cnn-digits", 10, 1, 8).eval(), 4, 4, torch.randn(64, 1, 8, 8))
        >>> path = os.path.join(tempfile.mkdtemp(), "digits-w4a4.onnx")
        >>> info = to_onnx(q, torch.randn(2, 1, 8, 8), path)
        >>> info["bytes"] == os.path.getsize(path), info["input"]
        (True, 'input')
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    proto, info = build_onnx(qmodel, example, opset=opset, normalization=normalization, metadata=metadata)
    data = proto.SerializeToString()
    checker(data)
    atomic_write_bytes(path, data)
    return {**info, "path": path, "bytes": len(data)}


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode (the weight grids, plain attributes, come along)."""
    return copy.deepcopy(model).cpu().float().eval()


__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "SUPPORTED", "Normalization", "build_onnx", "check_opset",
           "container", "to_onnx"]
