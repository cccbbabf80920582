"""A small fake-quantization simulator for post-training quantization (PTQ).

Uniform affine quantizers for 2 to 8 bits: weights per output channel (symmetric or
asymmetric), activations per tensor (asymmetric) at the input of every Conv/Linear layer.
Clipping ranges come from min-max, a percentile, or an MSE search, calibrated on a small
calibration set. BatchNorm is folded into the preceding convolution before the weights are
quantized, and the first and last layers stay at 8 bits by default.

Two PTQ methods (:data:`ROUNDING_METHODS`; "method" is the project's one name for them, the
older "variant" survives as aliases and as a field of the result files): ``"rtn"``,
round-to-nearest quantization as above, and
``"rtn+bn"`` (``quantize(..., bn_reestimate=True)``), the same quantizers followed by a standard
calibration-only step: every BatchNorm's running statistics are re-estimated on the calibration
images through the quantized model (:func:`reestimate_bn`), then folded. The two differ only in
the BatchNorm statistics (see :func:`quantize`).

Why our own: ``torch.ao.quantization`` is deprecated, and torchao / quanto cannot simulate
2-4-bit activations on convolutions. Fake quantization (quantize then dequantize in float)
gives the accuracy of integer inference with the same rounding and clipping.

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.quant import quantize
    >>> model = build_model("cnn-digits", 10, 1, 8).eval()
    >>> qmodel = quantize(model, wbits=4, abits=4, calib_data=torch.randn(64, 1, 8, 8))
    >>> qmodel is model
    False
    >>> quantize(model, 2, 4, torch.randn(64, 1, 8, 8), bn_reestimate=True).ptq_method
    'rtn+bn'
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from collections.abc import Iterable

import torch
import torch.fx
import torch.nn as nn

from dnq_landscape_common.precision import full_precision
from dnq_landscape_common.tensors import channel_moments

from .batchnorm import batchnorm_layers, recompute_bn

RANGE_METHODS = ("minmax", "percentile", "mse")
WEIGHT_MODES = ("symmetric", "asymmetric")
MIN_BITS, MAX_BITS = 2, 8
QUANT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ROUNDING_METHODS = ("rtn", "rtn+bn")
"""``"rtn"``: round-to-nearest PTQ with the trained BatchNorm statistics; ``"rtn+bn"``: the same
with the BatchNorm statistics re-estimated through the quantized model (``bn_reestimate=True``)."""
PTQ_VARIANTS = ROUNDING_METHODS  # the name it had before "method" was the one name
_MSE_GRID = torch.linspace(0.2, 1.0, 81)


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit-width (an int in 2..8) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def ptq_method(bn_reestimate: bool) -> str:
    """The name in :data:`ROUNDING_METHODS` of a :func:`quantize` call with this ``bn_reestimate``.

    Example:
        >>> ptq_method(False), ptq_method(True)
        ('rtn', 'rtn+bn')
    """
    if not isinstance(bn_reestimate, bool):
        raise ValueError(f"bn_reestimate must be True or False, got {bn_reestimate!r}")
    return ROUNDING_METHODS[1] if bn_reestimate else ROUNDING_METHODS[0]


ptq_variant = ptq_method  # the name it had before "method" was the one name


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """Parse ``"W8A8,W4A4,W2A4"`` into ``[(8, 8), (4, 4), (2, 4)]``."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*[Ww](\d+)[Aa](\d+)\s*", item)
        if not m:
            raise ValueError(f"bad bit setting {item!r}; write settings like W8A8,W4A4,W2A4 "
                             f"(weight and activation bits, each in {MIN_BITS}..{MAX_BITS})")
        out.append((check_bits(int(m[1]), "weight bits"), check_bits(int(m[2]), "activation bits")))
    return out


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize: ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``.

    Rounding is round-half-to-even (``torch.round``), as in integer kernels.
    """
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def _channel_view(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (w.dim() - 1)))


def weight_qparams(w: torch.Tensor, bits: int, mode: str = "symmetric", method: str = "minmax",
                   percentile: float = 99.99):
    """Per-output-channel quantization parameters of a weight tensor.

    Symmetric: a narrow signed grid ``[-(2^(b-1)-1), 2^(b-1)-1] * scale`` with zero point 0 and
    ``scale = max|w| / (2^(b-1)-1)`` (max-abs); asymmetric: ``[0, 2^b - 1]`` over ``[min, max]``
    (the range always contains 0). ``method`` shrinks the range: ``percentile`` uses the
    ``percentile``-th percentile of ``|w|`` (or of ``w`` at both ends), ``mse`` searches the
    clipping ratio in [0.2, 1] that minimizes the channel's squared error.

    Returns:
        ``(scale, zero_point, qmin, qmax)`` with ``scale`` and ``zero_point`` of shape (C_out,).
    """
    check_bits(bits)
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {mode!r}; valid: {', '.join(WEIGHT_MODES)}")
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {method!r}; valid: {', '.join(RANGE_METHODS)}")
    flat = w.detach().reshape(w.shape[0], -1).float()
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        if method == "percentile":
            hi = torch.quantile(flat.abs(), percentile / 100.0, dim=1)
        else:
            hi = flat.abs().amax(dim=1)
        lo = -hi
    else:
        qmin, qmax = 0, 2 ** bits - 1
        if method == "percentile":
            lo = torch.quantile(flat, 1 - percentile / 100.0, dim=1)
            hi = torch.quantile(flat, percentile / 100.0, dim=1)
        else:
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)

    def params(lo, hi):
        if mode == "symmetric":
            scale = (hi / qmax).clamp_min(1e-12)
            return scale, torch.zeros_like(scale)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
        return scale, torch.clamp(torch.round(-lo / scale), qmin, qmax)

    scale, zp = params(lo, hi)
    if method == "mse":
        best = torch.full_like(scale, math.inf)
        for r in _MSE_GRID.tolist():
            s, z = params(lo * r, hi * r)
            err = (fake_quantize(flat, s[:, None], z[:, None], qmin, qmax) - flat).pow(2).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale, zp = torch.where(better, s, scale), torch.where(better, z, zp)
    return scale.to(w.dtype), zp.to(w.dtype), qmin, qmax


def quantize_weight(w: torch.Tensor, bits: int, mode: str = "symmetric", method: str = "minmax",
                    percentile: float = 99.99) -> torch.Tensor:
    """Fake-quantize a weight tensor per output channel (see :func:`weight_qparams`)."""
    scale, zp, qmin, qmax = weight_qparams(w, bits, mode, method, percentile)
    return fake_quantize(w, _channel_view(scale, w), _channel_view(zp, w), qmin, qmax)


@dataclasses.dataclass
class WeightGrid:
    """The per-output-channel integer grid a quantized layer's weight lies on:
    ``weight[c] = (q - zero_point[c]) * scale[c]`` with integers ``q`` in ``[qmin, qmax]``.

    Every PTQ method records it on the layer it quantizes (``layer.weight_grid``, a plain
    attribute: it is not in the ``state_dict``), and :func:`dnq.quant._fold_pairs` keeps it true
    when a BatchNorm is folded into an already quantized weight. The exporter
    (:mod:`dnq.export`) stores the integers ``q`` it gives.

    Example:
        >>> w = torch.tensor([[-0.5, 0.25, 0.5]])
        >>> grid = WeightGrid(torch.tensor([0.25]), torch.tensor([0.0]), -7, 7, 4)
        >>> grid.levels(w).tolist()
        [[-2, 1, 2]]
        >>> flipped = grid.folded(torch.tensor([-2.0]))   # a BatchNorm with a negative factor
        >>> flipped.levels(w * -2.0).tolist(), float(flipped.scale[0])
        ([[2, -1, -2]], 0.5)
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int

    @classmethod
    def of(cls, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, bits: int) -> "WeightGrid":
        """A grid from a quantizer's parameters (any shape that flattens to one value per channel)."""
        scale = scale.detach().reshape(-1).cpu().clone()
        zp = zero_point.detach().reshape(-1).cpu().to(scale.dtype).clone()
        return cls(scale, zp, int(qmin), int(qmax), int(bits))

    def folded(self, factor: torch.Tensor) -> "WeightGrid":
        """The grid of ``weight * factor[c]`` (a BatchNorm folded into the quantized weight): the
        step scales by ``|factor|``; a negative factor mirrors the levels (``q -> qmin + qmax - q``),
        so that the zero point moves to ``qmin + qmax - zero_point``. A zero factor keeps the grid."""
        f = factor.detach().reshape(-1).cpu().to(self.scale.dtype)
        neg = f < 0
        scale = torch.where(f == 0, self.scale, self.scale * f.abs())
        zp = torch.where(neg, self.qmin + self.qmax - self.zero_point, self.zero_point)
        return WeightGrid(scale, zp, self.qmin, self.qmax, self.bits)

    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        """``(levels(weight) - zero_point) * scale`` in the weight's dtype and device: the weight as
        ONNX's ``DequantizeLinear`` computes it from the stored integers."""
        view = (-1,) + (1,) * (weight.dim() - 1)
        q = self.levels(weight).clamp(self.qmin, self.qmax).to(self.scale.dtype)
        return ((q - self.zero_point.view(view)) * self.scale.view(view)).to(device=weight.device, dtype=weight.dtype)

    def levels(self, weight: torch.Tensor) -> torch.Tensor:
        """The integers ``q`` of ``weight`` on this grid (int64, the weight's shape), unchecked."""
        view = (-1,) + (1,) * (weight.dim() - 1)
        w = weight.detach().cpu().to(self.scale.dtype)
        return (torch.round(w / self.scale.view(view)) + self.zero_point.view(view)).to(torch.int64)


def record_weight_grid(layer: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                       bits: int) -> None:
    """Set ``layer.weight_grid`` (:class:`WeightGrid`) for a weight just quantized with these parameters."""
    object.__setattr__(layer, "weight_grid", WeightGrid.of(scale, zero_point, qmin, qmax, bits))


def set_quantized_weight(layer: nn.Module, qparams, bits: int) -> None:
    """Write the round-to-nearest weight on the per-channel grid ``qparams`` (``(scale, zero_point,
    qmin, qmax)``, :func:`weight_qparams`'s) into ``layer.weight`` (:func:`quantize_weight`'s values)
    and record the grid (:func:`record_weight_grid`)."""
    scale, zp, qmin, qmax = qparams
    w = layer.weight
    with torch.no_grad():
        w.copy_(fake_quantize(w, _channel_view(scale, w), _channel_view(zp, w), qmin, qmax))
    record_weight_grid(layer, scale, zp, qmin, qmax, bits)


def act_qparams(lo: float, hi: float, bits: int):
    """Asymmetric per-tensor parameters for the range ``[lo, hi]`` (widened to contain 0).

    Returns:
        ``(scale, zero_point, qmin, qmax)`` as Python numbers.
    """
    check_bits(bits)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = 0, 2 ** bits - 1
    scale = (hi - lo) / (qmax - qmin)
    if not (math.isfinite(scale) and scale > 0):  # a constant-zero input: any scale is exact
        scale = 1.0
    zp = min(max(round(-lo / scale), qmin), qmax)
    return scale, float(zp), qmin, qmax


class ActObserver:
    """Collects the range of a tensor over calibration batches, and a seeded subsample of
    its values (at most ``max_samples``) for the percentile and MSE range methods."""

    def __init__(self, max_samples: int = 1 << 20, seed: int = 0):
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []
        self.max_samples, self.count = max_samples, 0
        self.gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        keep = max(self.max_samples // 8, 1)
        if x.numel() > keep:
            idx = torch.randint(0, x.numel(), (keep,), generator=self.gen).to(x.device)
            x = x[idx]
        self.samples.append(x.cpu())
        self.count += x.numel()
        if self.count > self.max_samples:  # keep a bounded, uniform-ish subsample
            allv = torch.cat(self.samples)
            idx = torch.randperm(allv.numel(), generator=self.gen)[: self.max_samples // 2]
            self.samples, self.count = [allv[idx]], self.max_samples // 2

    def range(self, bits: int, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
        if not math.isfinite(self.lo):
            raise RuntimeError("observer saw no data; the calibration set never reached this layer")
        if method == "minmax":
            return self.lo, self.hi
        vals = torch.cat(self.samples)
        if method == "percentile":
            q = torch.quantile(vals, torch.tensor([1 - percentile / 100.0, percentile / 100.0]))
            return float(q[0]), float(q[1])
        if method == "mse":
            best, best_r = math.inf, (self.lo, self.hi)
            for r in _MSE_GRID.tolist():
                s, z, qmin, qmax = act_qparams(self.lo * r, self.hi * r, bits)
                err = float((fake_quantize(vals, torch.tensor(s), torch.tensor(z), qmin, qmax) - vals).pow(2).mean())
                if err < best:
                    best, best_r = err, (self.lo * r, self.hi * r)
            return best_r
        raise ValueError(f"unknown range method {method!r}; valid: {', '.join(RANGE_METHODS)}")


class ActQuantizer(nn.Module):
    """Asymmetric per-tensor fake quantizer, attached to a layer as ``input_quantizer``."""

    def __init__(self, scale: float, zero_point: float, qmin: int, qmax: int, bits: int):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.qmin, self.qmax, self.bits = qmin, qmax, bits

    def forward(self, x):
        return fake_quantize(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.qmin, self.qmax)

    def extra_repr(self):
        return f"bits={self.bits}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


def _quantize_input_hook(module, args):
    return (module.input_quantizer(args[0]), *args[1:])


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear layers of ``model`` (the layers that get quantized), by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


@torch.no_grad()
def execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The Conv/Linear layers of ``model`` in the order one forward pass calls them.

    This is the single definition of "first" and "last" layer used by :func:`quantize`, the DNQ
    noise statistics (:mod:`dnq.noise`) and the study's weight-quantized models. The pass runs in
    eval mode without gradients on a small slice of ``example_input``; the model's mode is
    restored, and its weights and buffers are not changed (eval-mode BatchNorm does not update
    its statistics).
    """
    mods = dict(quant_layers(model))
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
               for n, m in mods.items()]
    was = model.training
    try:
        model.eval()
        with full_precision():
            model(example_input[:2])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return order


def layer_bits(order: list[str], wbits: int, abits: int, first_last_bits: int | None = 8,
               bits_by_layer: dict | None = None) -> dict[str, tuple[int, int]]:
    """``{layer: (weight bits, activation bits)}`` for layers in execution ``order``: the first and
    last get ``first_last_bits`` for both (unless it is ``None``), the rest ``(wbits, abits)``.

    ``bits_by_layer`` (mixed precision, :mod:`dnq.mixed`) overrides named layers: a value is the
    layer's weight bits (its activation bits stay as above) or a ``(weight bits, activation bits)``
    pair.

    Raises:
        ValueError: a bad bit-width, or ``bits_by_layer`` naming a layer not in ``order``.
    """
    check_bits(wbits, "weight bits")
    check_bits(abits, "activation bits")
    if first_last_bits is not None:
        check_bits(first_last_bits, "first/last layer bits")
    edge = {order[0], order[-1]} if first_last_bits is not None and order else set()
    out = {n: (first_last_bits, first_last_bits) if n in edge else (wbits, abits) for n in order}
    for name, b in (bits_by_layer or {}).items():
        if name not in out:
            raise ValueError(f"bits_by_layer names {name!r}, which is not a quantized layer called by the model; "
                             f"layers: {order[:6]}{'...' if len(order) > 6 else ''}")
        w, a = (b if isinstance(b, (tuple, list)) else (b, out[name][1]))
        out[name] = (check_bits(w, f"weight bits of {name}"), check_bits(a, f"activation bits of {name}"))
    return out


def weight_error(w: torch.Tensor, bits: int, mode: str = "symmetric", method: str = "minmax") -> torch.Tensor:
    """The weight quantization error ``Q(W) - W`` of the per-output-channel quantizer of
    :func:`quantize_weight`, computed in float32 (or float64 for a float64 ``w``) and returned in
    that precision. This is the error DNQ models as noise and the study's ``noise`` measurement
    takes the curvature along."""
    wf = w.detach()
    wf = wf if wf.dtype == torch.float64 else wf.float()
    return quantize_weight(wf, bits, mode, method) - wf


def weight_quantized(model: nn.Module, wbits_by_layer: dict[str, int]) -> nn.Module:
    """A copy of ``model`` (eval mode) whose named Conv/Linear weights are replaced by ``Q(W)``:
    the symmetric per-channel min-max quantizer of :func:`weight_error`, no BatchNorm folding,
    activations in float. The original is not touched."""
    q = copy.deepcopy(model).eval()
    mods = dict(q.named_modules())
    with torch.no_grad():
        for name, b in wbits_by_layer.items():
            layer = mods[name]
            layer.weight.copy_(quantize_weight(layer.weight.float(), b, "symmetric", "minmax").to(layer.weight))
    return q


def weight_error_moments(model: nn.Module, wbits_by_layer: dict[str, int]) -> tuple[dict, dict]:
    """``(mean, variance)`` of the weight quantization error ``Q(W) - W`` per output channel, by
    weight name (``"layers.0.conv1.weight"``: a float64 ``(C,)`` tensor each), for the layers of
    ``wbits_by_layer`` at their bits (:func:`weight_error`'s quantizer). This is the noise DNQ
    models, in the form :func:`landscape.predicted_loss_increase` takes as ``mean`` and
    ``variances``."""
    mods = dict(model.named_modules())
    mean, var = {}, {}
    for name, b in wbits_by_layer.items():
        mean[f"{name}.weight"], var[f"{name}.weight"] = channel_moments(weight_error(mods[name].weight, b))
    return mean, var


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN reads only the conv's output, found with torch.fx."""
    graph = torch.fx.symbolic_trace(model).graph
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(mods.get(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d))):
            pairs.append((src.target, node.target))
    return pairs


def _foldable_pairs(model: nn.Module, stacklevel: int) -> list[tuple[str, str]] | None:
    """:func:`_conv_bn_pairs`, or ``None`` with a warning where torch.fx cannot trace the model."""
    try:
        return _conv_bn_pairs(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types on untraceable code
        warnings.warn(f"BatchNorm not folded: torch.fx could not trace the model ({type(e).__name__}: {e}); "
                      "BatchNorm stays in floating point", stacklevel=stacklevel + 1)
        return None


@torch.no_grad()
def _fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each (conv, bn) pair in place with the BN's running statistics; the BN becomes
    ``nn.Identity``."""
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(_channel_view(factor, conv.weight))
        conv.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
        grid = getattr(conv, "weight_grid", None)
        if grid is not None:  # rtn+bn: the BatchNorm folds into an already quantized weight
            grid = grid.folded(factor)
            conv.weight.copy_(grid.dequantized(conv.weight))  # on the grid exactly, as an integer runtime has it
            object.__setattr__(conv, "weight_grid", grid)
        model.set_submodule(bn_name, nn.Identity())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` in eval mode with every BatchNorm that directly follows a
    convolution folded into that convolution (weight scaled, bias added) and replaced by
    ``nn.Identity``. The outputs in eval mode are unchanged up to rounding. Models that torch.fx
    cannot trace are copied unfolded, with a warning."""
    model = copy.deepcopy(model).eval()
    pairs = _foldable_pairs(model, stacklevel=2)
    if pairs is not None:
        _fold_pairs(model, pairs)
    return model


def _batches(calib_data, batch_size: int) -> Iterable[torch.Tensor]:
    batches = calib_data.split(batch_size) if isinstance(calib_data, torch.Tensor) else calib_data
    for b in batches:
        b = b[0] if isinstance(b, (tuple, list)) else b
        if len(b):
            yield b


@torch.no_grad()
def observe_inputs(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: Iterable[torch.Tensor],
                   device: torch.device, *, max_samples: int = 1 << 20, seed: int = 0):
    """Run ``model`` over ``batches`` (without gradients, in full float32 precision) and observe the
    input of each of ``layers`` (``(name, module)`` pairs) with an :class:`ActObserver`.

    Returns:
        ``(observers by name, the names in the order the pass called them, images seen)``.
    """
    observers = {name: ActObserver(max_samples=max_samples, seed=seed) for name, _ in layers}
    order: list[str] = []

    def hook(mod, args, name):
        if name not in order:
            order.append(name)
        observers[name].observe(args[0])

    handles = [layer.register_forward_pre_hook(lambda m, a, n=name: hook(m, a, n)) for name, layer in layers]
    seen = 0
    try:
        with full_precision():  # ranges from float32 activations, whatever the caller's TF32/autocast
            for x in batches:
                model(x.to(device))
                seen += len(x)
    finally:
        for h in handles:
            h.remove()
    return observers, order, seen


_EMPTY_CALIB = "calib_data is empty; pass at least one calibration batch (e.g. Dataset.calibration_inputs(256))"


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def reestimate_bn(model: nn.Module, calib_data, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``calib_data``, in place.

    The statistics are reset and recomputed by forward passes over all of ``calib_data`` with
    ``momentum=None`` (PyTorch's cumulative average over the batches, as in
    ``torch.optim.swa_utils.update_bn``), the BatchNorm layers in train mode and every other
    module in eval mode (dropout off, quantizers as they are), without gradients and in full
    float32 precision (:func:`landscape.precision.full_precision`): the rule the trainer uses
    after training, :func:`dnq.batchnorm.recompute_bn`, which does the pass. With one batch (the default:
    256 calibration images, ``batch_size`` 256) ``running_mean`` and ``running_var`` are the mean
    and the unbiased variance over all calibration images (and spatial positions); with several
    batches, the average over the batches of the per-batch mean and unbiased variance. During the
    pass each BatchNorm normalizes with the statistics of the current batch, so a later layer
    sees inputs normalized as they will be after the update. Afterwards the BatchNorm momenta and
    every module's train/eval mode are restored; on an error the old statistics are put back.

    Applied to a quantized model (``quantize(..., bn_reestimate=True)`` does this), it removes the
    shift of the BatchNorm inputs that quantization causes: the practice of BatchNorm
    re-estimation after quantization (Nagel et al., "Overcoming Oscillations in
    Quantization-Aware Training", ICML 2022, which traces low-bit accuracy loss to wrongly
    estimated BatchNorm statistics; AIMET's "BN re-estimation" re-estimates on a small subset of
    the training data and then folds).

    Args:
        model: the model to update in place (the caller's own; copy it first to keep the original).
        calib_data: a tensor of inputs (N, ...), or an iterable of input batches or
            ``(inputs, targets)`` pairs; each batch is moved to the model's device.
        batch_size: batch size when ``calib_data`` is a tensor.

    Returns:
        ``model`` itself. A model without BatchNorm (with running statistics) is returned
        unchanged, without a pass.

    Raises:
        ValueError: empty ``calib_data``, a bad ``batch_size``, or a batch of one sample where a
            BatchNorm sees a single value per channel (BatchNorm1d after a Linear layer).

    Example:
        >>> import copy, torch
        >>> from dnq.models import build_model
        >>> from dnq.quant import reestimate_bn
        >>> model = build_model("cnn-digits", 10, 1, 8).eval()
        >>> x = torch.randn(64, 1, 8, 8)
        >>> updated = reestimate_bn(copy.deepcopy(model), x)
        >>> torch.allclose(updated[1].running_mean, model[0](x).mean(dim=(0, 2, 3)), atol=1e-5)
        True
        >>> updated.training, int(updated[1].num_batches_tracked)
        (False, 1)
    """
    _check_batch_size(batch_size)
    if isinstance(calib_data, torch.Tensor) and len(calib_data) == 0:
        raise ValueError(_EMPTY_CALIB)
    bns = batchnorm_layers(model)
    if not bns:
        return model
    saved = [(bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    seen = 0

    def batches():
        nonlocal seen
        for x in _batches(calib_data, batch_size):
            seen += len(x)
            yield x

    try:
        recompute_bn(model, batches(), _device_of(model))
    except Exception as e:
        for bn, mean, var, count in saved:  # never leave the statistics reset
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
        if not seen and isinstance(e, ValueError):
            raise ValueError(_EMPTY_CALIB) from None
        if isinstance(e, ValueError) and "more than 1 value per channel" in str(e):
            raise ValueError(f"BatchNorm re-estimation got a batch of a single sample ({e}); use a calibration "
                             "set and batch size that leave at least 2 samples in every batch") from e
        raise
    return model


def _check_quantize_args(wbits, abits, first_last_bits, range_method, act_range_method, weight_mode, percentile,
                         batch_size) -> None:
    """:func:`quantize`'s settings, checked before any work (``ValueError`` naming the valid values)."""
    check_bits(wbits, "weight bits")
    check_bits(abits, "activation bits")
    if first_last_bits is not None:
        check_bits(first_last_bits, "first/last layer bits")
    for m in (range_method, act_range_method):
        if m not in RANGE_METHODS:
            raise ValueError(f"unknown range method {m!r}; valid: {', '.join(RANGE_METHODS)}")
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {weight_mode!r}; valid: {', '.join(WEIGHT_MODES)}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    _check_batch_size(batch_size)


def _reestimate_and_fold(qmodel: nn.Module, calib_data, batch_size: int, pairs) -> list[str]:
    """``rtn+bn``'s last step: re-estimate BatchNorm through the quantized model, then fold the
    (conv, bn) ``pairs``; returns the names of the re-estimated BatchNorm layers."""
    bns = set(batchnorm_layers(qmodel))
    reestimated = [n for n, m in qmodel.named_modules() if m in bns]
    if not reestimated:
        warnings.warn("bn_reestimate=True on a model without BatchNorm running statistics: nothing to "
                      "re-estimate, the 'rtn+bn' model equals the 'rtn' one", stacklevel=3)
    reestimate_bn(qmodel, calib_data, batch_size)
    _fold_pairs(qmodel, pairs or [])
    return reestimated


@torch.no_grad()
def quantize(model: nn.Module, wbits: int, abits: int, calib_data, *, weight_mode: str = "symmetric",
             range_method: str = "minmax", act_range_method: str | None = None, first_last_bits: int | None = 8,
             fold_bn: bool = True, percentile: float = 99.99, batch_size: int = 256, seed: int = 0,
             bn_reestimate: bool = False, bits_by_layer: dict | None = None) -> nn.Module:
    """Post-training fake quantization of a model; the original is never touched.

    ``bn_reestimate=False`` (method ``"rtn"``): BatchNorm is folded into the preceding
    convolution (``fold_bn``), then every Conv/Linear weight is quantized per output channel and
    an input quantizer, calibrated on ``calib_data`` with the float model, is attached.

    ``bn_reestimate=True`` (method ``"rtn+bn"``): the same quantizers on the *unfolded* model
    (weights quantized per output channel in place, input quantizers calibrated on the float
    model as above), then every BatchNorm's running statistics are re-estimated on ``calib_data``
    through the quantized model (quantized weights and activations; :func:`reestimate_bn`), and
    only then folded into the preceding convolution (when ``fold_bn``; same torch.fx pairs as
    :func:`fold_batchnorm`). Folding a per-channel quantized weight ``Q(W)`` by the per-channel
    factor ``f = gamma / sqrt(var + eps)`` keeps it on a per-channel uniform grid (step ``|f|`` times
    the old one). For the symmetric max-abs quantizer ``Q(f W) = f Q(W)`` for any ``f != 0``
    (``max|f W| = |f| max|W|`` and round-half-to-even is odd-symmetric; the percentile and MSE
    ranges scale with ``|f|`` too), so before re-estimation the folded weights equal those of
    ``"rtn"`` up to float rounding (the scale is computed in float32), the activation ranges are
    the same, and the two methods differ only in the BatchNorm statistics (for the asymmetric
    quantizer the identity holds for ``f > 0``, and for ``f < 0`` except at exact ties of the
    zero point's rounding). The folded weight is then written on its grid, ``(q - z) * scale * |f|``
    (:class:`WeightGrid`), as an integer runtime computes it from stored integers: at most one
    float rounding from the product ``Q(W) * f`` (on the issue-24 models this moved one test image of
    2,000, in one of twelve settings).
    BatchNorm not after a convolution (e.g. BatchNorm1d after a Linear layer), or in a model
    torch.fx cannot trace, is re-estimated and stays a float BatchNorm; LayerNorm and other
    normalizations are untouched. A model without BatchNorm gives the ``"rtn"`` model (with a
    warning) but keeps ``ptq_variant == "rtn+bn"``, so that result tables stay aligned;
    ``qmodel.ptq_bn_reestimated`` is then empty. See :func:`reestimate_bn` for the practice and
    its references.

    Args:
        model: a trained float model (any mode; the copy is put in eval mode).
        wbits, abits: weight and activation bits (2..8).
        calib_data: a tensor of inputs (N, ...), or an iterable of input batches or
            ``(inputs, targets)`` pairs, for the activation ranges and, with ``bn_reestimate``,
            the BatchNorm statistics (256 samples is typical).
        weight_mode: ``"symmetric"`` or ``"asymmetric"`` per-channel weight quantizer.
        range_method: ``"minmax"``, ``"percentile"`` or ``"mse"`` for the weights.
        act_range_method: the same for activations (default: ``range_method``).
        first_last_bits: bits of the first and last quantized layer (weights and input
            activations); ``None`` quantizes them like the rest.
        fold_bn: fold BatchNorm into the preceding convolution (before quantizing the weights,
            or after the re-estimation with ``bn_reestimate``).
        percentile: the percentile of the ``"percentile"`` method.
        batch_size: calibration batch size when ``calib_data`` is a tensor.
        seed: seed of the activation subsampling (percentile / MSE methods).
        bn_reestimate: re-estimate the BatchNorm statistics through the quantized model.
        bits_by_layer: mixed precision: ``{layer: weight bits}`` or ``{layer: (weight bits,
            activation bits)}`` overriding ``wbits`` / ``abits`` / ``first_last_bits`` for the
            named layers (:func:`layer_bits`; :func:`dnq.mixed.allocate` chooses them).

    Returns:
        A new model in eval mode with quantized weights and an ``input_quantizer`` (with a
        forward pre-hook) on every Conv/Linear; ``qmodel.ptq_layers`` lists each layer's setting,
        ``qmodel.ptq_method`` (also ``ptq_variant``, its older name) is ``"rtn"`` or ``"rtn+bn"``
        (:data:`ROUNDING_METHODS`), and
        ``qmodel.ptq_bn_reestimated`` names the re-estimated BatchNorm layers (empty for ``"rtn"``).

    Raises:
        ValueError: a bad setting, empty ``calib_data`` or a model without Conv/Linear layers.

    Example:
        >>> import torch
        >>> from dnq.models import build_model
        >>> from dnq.quant import quantize
        >>> model = build_model("cnn-digits", 10, 1, 8).eval()
        >>> calib = torch.randn(256, 1, 8, 8)
        >>> q = quantize(model, 2, 4, calib, bn_reestimate=True)
        >>> q.ptq_method, q.ptq_bn_reestimated
        ('rtn+bn', ['1', '4', '8'])
        >>> any(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules())   # folded afterwards
        False
    """
    act_range_method = act_range_method or range_method
    _check_quantize_args(wbits, abits, first_last_bits, range_method, act_range_method, weight_mode, percentile,
                         batch_size)
    method = ptq_method(bn_reestimate)
    pairs: list[tuple[str, str]] | None = []
    if bn_reestimate:
        qmodel = copy.deepcopy(model).eval()
        if fold_bn:
            pairs = _foldable_pairs(qmodel, stacklevel=2)  # traced before any hook or quantizer is attached
        if not isinstance(calib_data, torch.Tensor):
            calib_data = list(_batches(calib_data, batch_size))  # read twice: a generator would be spent
    else:
        qmodel = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("the model has no Conv/Linear layer to quantize")
    try:
        device = next(qmodel.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    observers, order, seen = observe_inputs(qmodel, layers, _batches(calib_data, batch_size), device, seed=seed)
    if not seen:
        raise ValueError(_EMPTY_CALIB)
    unused = [n for n, _ in layers if n not in order]
    if unused:
        warnings.warn(f"layers never called on the calibration data stay in floating point: {unused}", stacklevel=2)
    bits_of = layer_bits(order, wbits, abits, first_last_bits, bits_by_layer)

    mods = dict(layers)
    info = []
    for name in order:
        layer = mods[name]
        wb, ab = bits_of[name]
        set_quantized_weight(layer, weight_qparams(layer.weight, wb, weight_mode, range_method, percentile), wb)
        lo, hi = observers[name].range(ab, act_range_method, percentile)
        scale, zp, qmin, qmax = act_qparams(lo, hi, ab)
        layer.input_quantizer = ActQuantizer(scale, zp, qmin, qmax, ab).to(device)
        layer.register_forward_pre_hook(_quantize_input_hook)
        info.append({"layer": name, "wbits": wb, "abits": ab, "act_lo": lo, "act_hi": hi})
    reestimated = _reestimate_and_fold(qmodel, calib_data, batch_size, pairs) if bn_reestimate else []
    qmodel.ptq_layers = info
    qmodel.ptq_method = qmodel.ptq_variant = method  # ptq_variant: the older name, kept for readers of it
    qmodel.ptq_bn_reestimated = reestimated
    return qmodel
