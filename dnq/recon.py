"""Reconstruction PTQ: AdaRound, BRECQ and QDrop, the methods researchers compare against.

Round-to-nearest (:func:`dnq.quant.quantize`) rounds every weight independently. Reconstruction
methods learn, on a few hundred to a thousand unlabeled calibration images, how to round each
weight (up or down) so that a layer's or a block's *output* stays close to the float model's:

* **AdaRound** (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization",
  ICML 2020), layer by layer. The weights are ``s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)``
  with the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``,
  ``zeta = 1.1``, ``gamma = -0.1``, and ``V`` initialised so that ``h(V)`` equals the fractional
  part of ``W/s`` (the soft weights start at ``W`` where they are not clipped). The loss is
  ``||W x_fp - W~ x_q||^2 + lambda * sum(1 - |2h(V) - 1|^beta)``: the output error (summed over
  channels, averaged over the batch and positions) plus a regularizer that drives every ``h``
  to 0 or 1, ``beta`` annealed from 20 to 2 after a 20% warm-up without it, ``lambda = 0.01``,
  Adam (lr 1e-3). ``x_q`` is the layer's input in the model whose earlier layers are already
  quantized, ``x_fp`` the float model's (the paper's "asymmetric" reconstruction; on the first
  layer both are the image). At the end each weight is rounded up where ``V >= 0``. The
  activation quantizers are those of round-to-nearest (ranges calibrated on the float model);
  AdaRound optimises the weights only.
* **BRECQ** (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction", ICLR 2021): the same rounding variables, optimised per *block* on the block's
  output (a residual block of resnet, an inverted-residual block of mobilenetv2, a transformer
  block of vit-tiny, a single layer where no block exists) with the activations in float; then,
  with the weights fixed, the activation step sizes are learned block by block (LSQ, Esser et
  al., ICLR 2020; Adam with a cosine decay over a quarter of the weight iterations, as in the
  authors' code, whose rate is 4e-4 over 5,000 steps: the paper convention's default; the dnq
  convention keeps its earlier rate, 4e-5 x 20,000 / activation steps, 1.6e-4 at 5,000).
* **QDrop** (Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit
  Post-Training Quantization", ICLR 2022): BRECQ's block reconstruction with the rounding and
  the activation step sizes learned together, and during the reconstruction each activation
  quantizer's output mixed element-wise with its float input: quantized with probability
  ``1 - drop_prob`` (0.5), float otherwise. Inference never drops.

Common to all three (:func:`reconstruct`): BatchNorm is folded into the preceding convolution
first (as for ``rtn``); under the ``dnq`` convention (:mod:`dnq.convention`) weights are
quantized symmetric per output channel, activations asymmetric per tensor at the input of every
Conv/Linear layer (the quantizers of :mod:`dnq.quant`); under the ``paper`` convention (the
BRECQ / QDrop reference code's) weights are asymmetric on ``2^b`` levels, activations are
quantized at layer and block outputs (:mod:`dnq.act_sites`), each unit's loss is taken after its
activation and output quantizer, QDrop mixes the block input with the float model's, and the
learning rates are the papers' (:func:`default_lrs`); the initial weight and activation ranges
come from ``range_method`` (``"mse"`` by default, as in the BRECQ and QDrop code; under the paper
convention QDrop's own search, :func:`dnq.quant_paper.paper_mse_range`); the first and last layers (execution
order) get ``first_last_bits`` (8). The paper defaults are 20,000 iterations per block, batch
32 and 1,024 calibration images (:data:`PAPER_ITERS`); on a CPU the default is
:data:`CPU_ITERS` iterations. Inputs of the block being reconstructed are cached on the device
up to ``device_budget`` bytes and streamed from host memory past it (:class:`InputCache`).
Each unit's optimisation step (:class:`dnq.recon_step.UnitStep`) is static and reads nothing back
from the device: batch indices, learning rates and the regularizer's schedule come from device
tables, the quantizer arithmetic is fused (one ``h(V)`` per step for all the unit's layers,
constant hard weights computed once), and on a GPU the step is captured once in a CUDA graph and
replayed (``cuda_graph``). The model passed in is never modified; the same seed gives the same
quantized model (on one device; since issue 22 the batches of a unit are drawn as one table, and
the results differ from earlier versions' in the last bits).

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.recon import reconstruct
    >>> model = build_model("cnn-digits", 10, 1, 8).eval()
    >>> q = reconstruct(model, 4, 4, torch.randn(64, 1, 8, 8), method="qdrop", iters=20)
    >>> q.ptq_variant, [u["unit"] for u in q.ptq_recon["units"]][:2]
    ('qdrop', ['0', '3'])
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from tqdm.auto import tqdm

from dnq_landscape_common.precision import full_precision

from .act_sites import _PRE_ACTS, attach_sites, block_types, paper_sites, unit_tail
from .convention import check_convention
from .errors import ReconstructionError
from .quant import (
    RANGE_METHODS,
    ROUNDING_METHODS,
    ActQuantizer,
    _batches,
    _device_of,
    _quantize_input_hook,
    act_qparams,
    check_bits,
    execution_order,
    fold_batchnorm,
    layer_bits,
    observe_inputs,
    quant_layers,
    record_weight_grid,
    weight_qparams,
)
from .quant_paper import _weight_bits, observe_sites, paper_act_range, paper_weight_qparams, site_bits
from .recon_cache import InputCache, _capture
from .recon_step import GAMMA, ZETA, UnitStep, lsq_quantize, recon_loss, soft_round

RECON_METHODS = ("adaround", "brecq", "qdrop")
PTQ_METHODS = (*ROUNDING_METHODS, *RECON_METHODS)
"""Every PTQ method of the toolkit: ``rtn``, ``rtn+bn`` (:func:`dnq.quant.quantize`) and the
reconstruction methods of this module."""
DESCRIPTIONS = {
    "adaround": "AdaRound (Nagel et al. 2020): learned rounding layer by layer on each layer's output, activation "
                "ranges as calibrated",
    "brecq": "BRECQ (Li et al. 2021): learned rounding per block on the block's output, then LSQ activation step "
             "sizes per block",
    "qdrop": "QDrop (Wei et al. 2022): rounding and LSQ activation step sizes learned together per block, "
             "activations dropped to float with probability 0.5 during reconstruction",
}
"""One line per reconstruction method, as ``ptq.json`` and the report state it."""
PAPER_ITERS = 20_000
CPU_ITERS = 500
PAPER_CALIB_SIZE = 1024


def check_methods(spec) -> list[str]:
    """A comma list (or a list) of PTQ methods, validated, in the given order without repeats.

    Raises:
        ValueError: an unknown method (the message lists the valid ones) or an empty list.
    """
    items = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [m for m in items if m]
    bad = [m for m in items if m not in PTQ_METHODS]
    if bad or not items:
        raise ValueError(f"unknown PTQ method(s) {bad or spec!r}; valid: {', '.join(PTQ_METHODS)}")
    return list(dict.fromkeys(items))


def default_iters(device: torch.device | str) -> int:
    """Iterations per block when none are given: the papers' 20,000 on a GPU, :data:`CPU_ITERS` on a CPU."""
    return PAPER_ITERS if torch.device(device).type == "cuda" else CPU_ITERS


LR_RULES = ("paper", "scaled")
"""The reconstruction learning-rate rules: the papers' fixed rates, or scaled with the step budget."""
PAPER_LRS = {"weights": 1e-3, "qdrop": 4e-5, "brecq": 4e-4}
"""The reference code's Adam rates: rounding variables (AdaRound / BRECQ / QDrop: Adam's default),
QDrop's step sizes (``scale_lr``) and BRECQ's activation stage (``--lr``, 5,000 steps)."""
BRECQ_ACT_ITERS = 5_000


def default_lrs(method: str, iters: int, act_iters: int, lr_rule: str = "scaled",
                convention: str = "dnq") -> tuple[float, float]:
    """Adam rates ``(rounding variables, step sizes)`` of ``method`` at ``iters`` steps per unit
    (``act_iters`` for BRECQ's activation stage) under a learning-rate rule and convention.

    Example:
        >>> default_lrs("brecq", 20000, 5000, "paper", "paper")
        (0.001, 0.0004)
        >>> default_lrs("qdrop", 2000, 500, "scaled", "paper")
        (0.01, 0.0004)
        >>> default_lrs("brecq", 2000, 500, "scaled", "paper")   # its own 5,000-step stage: 10x
        (0.01, 0.004)
    """
    factor = min(max(PAPER_ITERS / iters, 1.0), 100.0) if lr_rule == "scaled" else 1.0
    if method != "brecq":
        return PAPER_LRS["weights"] * factor, PAPER_LRS["qdrop"] * factor
    if convention == "dnq" and lr_rule == "scaled":  # the rule before conventions had names (issue 23's #5)
        return budget_lrs(iters)[0], budget_lrs(act_iters)[1]
    act_factor = min(max(BRECQ_ACT_ITERS / act_iters, 1.0), 100.0) if lr_rule == "scaled" else 1.0
    return PAPER_LRS["weights"] * factor, PAPER_LRS["brecq"] * act_factor


def budget_lrs(iters: int) -> tuple[float, float]:
    """Adam learning rates ``(rounding variables, activation step sizes)`` for ``iters`` steps per block.

    The papers' (BRECQ / QDrop code) are 1e-3 and 4e-5 for 20,000 steps. Adam moves a parameter by
    about its learning rate per step, so with fewer steps the rounding variables could not leave
    their start (round to nearest; BENCHMARKS.md, "behind the defaults"). The rates are therefore scaled by
    ``20,000 / iters`` (at most 100x), which keeps learning rate x steps at the papers' value.
    """
    factor = min(max(PAPER_ITERS / iters, 1.0), 100.0)
    return 1e-3 * factor, 4e-5 * factor


# -- quantizers with learnable parts ----------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in [0, 1) (``-log((zeta - gamma) / (h - gamma) - 1)``)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


class AdaRoundWeight(nn.Module):
    """A parametrization of a Conv/Linear ``weight``: per-channel quantized with learnable rounding.

    ``mode`` is ``"soft"`` (``floor(W/s) + h(V)``, differentiable in ``V``), ``"hard"``
    (``floor(W/s) + [V >= 0]``, the final rounding) or ``"nearest"`` (round to nearest). The
    hard and nearest weights are constant: computed once and kept until ``mode`` changes (or
    :meth:`refresh`). While :attr:`override` is set (the reconstruction step's soft weights of
    the whole unit, :class:`dnq.recon_step.UnitStep`), it is the weight.
    """

    def __init__(self, weight: torch.Tensor, bits: int, mode: str = "symmetric", method: str = "mse", qparams=None):
        super().__init__()
        scale, zp, self.qmin, self.qmax = weight_qparams(weight, bits, mode, method) if qparams is None else qparams
        view = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", scale.view(view))
        self.register_buffer("zero_point", zp.view(view))
        w = weight.detach() / self.scale
        # the weight is fixed while its rounding is learned: floor(W/s) and the nearest rounding once
        self.register_buffer("base", torch.floor(w))
        self.register_buffer("nearest_up", torch.round(w) - self.base)
        self.v = nn.Parameter(_inverse_rectified_sigmoid(w - self.base))
        self.bits, self._mode, self._fixed = bits, "soft", None
        self.symmetric = not bool(zp.any())  # the zero point is left out of the fused soft weights
        self.override: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("soft", "hard", "nearest"):
            raise ValueError(f"unknown AdaRound mode {value!r}; valid: soft, hard, nearest")
        self._mode, self._fixed = value, None

    def refresh(self) -> None:
        """Forget the cached hard / nearest weights (after ``v`` or the buffers changed)."""
        self._fixed = None

    def _apply(self, fn, recurse=True):
        self._fixed = None  # .to(), .double(): the cache is rebuilt on the new device / dtype
        return super()._apply(fn, recurse)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized weight; ``weight`` (the original, unchanged since construction) is not read."""
        if self.override is not None:
            return self.override
        if self._mode == "soft":
            zp = None if self.symmetric else self.zero_point
            return soft_round(self.v, self.base, self.scale, zp, self.qmin, self.qmax)[0]
        if self._fixed is None:
            with torch.no_grad():
                up = (self.v >= 0).to(self.base.dtype) if self._mode == "hard" else self.nearest_up
                q = torch.clamp(self.base + up + self.zero_point, self.qmin, self.qmax)
                self._fixed = (q - self.zero_point) * self.scale
        return self._fixed

    def soft_reference(self) -> torch.Tensor:
        """The soft weight composed of autograd operations (the formula :func:`dnq.recon_step.soft_round` fuses)."""
        q = torch.clamp(self.base + self.h() + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def round_loss(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^beta)``: zero when every ``h`` is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in value, its gradient multiplied by ``g``."""
    return (x - x * g).detach() + x * g


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020).

    The value is :func:`dnq.quant.fake_quantize`'s. The gradients are the straight-through
    estimator's: with respect to ``x``, 1 inside the range and 0 where clipped; with respect to
    the step size ``s``, ``round(x/s) - x/s`` inside the range and ``qmin - z`` / ``qmax - z``
    where clipped below / above, times ``grad_scale`` (LSQ uses ``1 / sqrt(numel * qmax)``).
    Inside the range means ``qmin < x/s + z < qmax`` (unrounded, as in the paper).
    """
    s = _grad_scale(scale, grad_scale)
    # clamp, then round (as in the LSQ paper): the same value as round-then-clamp for integer bounds,
    # and the clipped region is decided on the unrounded x/s + z, where float error cannot flip it
    q = _round_ste(torch.clamp(x / s + zero_point, qmin, qmax))
    return (q - zero_point) * s


class LSQActQuantizer(nn.Module):
    """An asymmetric per-tensor activation quantizer with a learnable step size (LSQ) and a fixed
    zero point, and QDrop's element-wise drop: while ``drop_prob > 0`` and the module is in
    training mode, each element is left in float with probability ``drop_prob``."""

    def __init__(self, scale: float, zero_point: float, qmin: int, qmax: int, bits: int):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.qmin, self.qmax, self.bits = qmin, qmax, bits
        self.enabled, self.drop_prob, self.generator = True, 0.0, None  # a generator switches the drops on
        self.grad_numel = "sample"  # LSQ's N: values per sample; "tensor": the whole batch (QDrop's code)

    def forward(self, x):
        """:func:`lsq_fake_quantize` of ``x`` (fused: :func:`dnq.recon_step.lsq_quantize`), each element
        left in float with probability ``drop_prob`` while a generator is set."""
        if not self.enabled:
            return x
        g = 1.0 / math.sqrt((x.numel() if self.grad_numel == "tensor" else x.numel() // x.shape[0]) * self.qmax)
        keep = None
        if self.generator is not None:  # the draws of the version before issue 22: float where rand < drop_prob
            keep = torch.rand(x.shape, generator=self.generator, device=x.device).lt_(self.drop_prob).to(x.dtype)
        return lsq_quantize(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.qmin, self.qmax, g, keep)

    def frozen(self) -> ActQuantizer:
        """The inference quantizer (:class:`dnq.quant.ActQuantizer`) with the learned step size."""
        return ActQuantizer(float(self.scale.detach().abs()), float(self.zero_point), self.qmin, self.qmax, self.bits)


# -- blocks -------------------------------------------------------------------------------------
def find_units(model: nn.Module, order: list[str], blocks: bool = True) -> list[tuple[str, list[str]]]:
    """The reconstruction units of ``model``: ``(module name, its Conv/Linear layers)`` in execution order.

    With ``blocks``, every instance of a known block (a residual block of the CIFAR ResNets and of
    torchvision's ResNets, an inverted-residual block of MobileNetV2, a transformer block of
    vit-tiny) is one unit and every other Conv/Linear layer a unit of its own; without, every
    layer is a unit (AdaRound).
    """
    kinds = block_types() if blocks else ()
    block_of: dict[str, str] = {}
    for name, mod in model.named_modules():
        if name and isinstance(mod, kinds) and not any(name.startswith(b + ".") for b in set(block_of.values())):
            for lname, _ in quant_layers(mod):
                block_of.setdefault(f"{name}.{lname}", name)
    units: list[tuple[str, list[str]]] = []
    for layer in order:
        unit = block_of.get(layer, layer)
        if units and units[-1][0] == unit:
            units[-1][1].append(layer)
        elif any(u == unit for u, _ in units):
            next(ls for u, ls in units if u == unit).append(layer)
        else:
            units.append((unit, [layer]))
    return units


# -- the driver ---------------------------------------------------------------------------------
def reconstruct(model: nn.Module, wbits: int, abits: int, calib_data, method: str = "qdrop", *,
                iters: int | None = None, batch_size: int = 32, first_last_bits: int | None = 8,
                range_method: str = "mse", weight_lr: float | None = None, act_lr: float | None = None,
                reg_weight: float = 0.01,
                beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, drop_prob: float = 0.5,
                act_iters: int | None = None, seed: int = 0, device_budget: int | None = None,
                calib_batch_size: int = 256, progress: bool = False, bits_by_layer: dict | None = None,
                cuda_graph: bool | None = None, convention: str = "dnq", lr_rule: str | None = None) -> nn.Module:
    """Quantize ``model`` with AdaRound, BRECQ or QDrop (see the module doc); the original is never touched.

    Args:
        model: a trained float model (any mode; the copy is put in eval mode, BatchNorm folded).
        wbits, abits: weight and activation bits (2..8).
        calib_data: a tensor of inputs (N, ...), or an iterable of input batches or
            ``(inputs, targets)`` pairs (the papers use 1,024 training images).
        method: ``"adaround"``, ``"brecq"`` or ``"qdrop"``.
        iters: optimisation steps per unit (default :func:`default_iters`: 20,000 on a GPU,
            :data:`CPU_ITERS` on a CPU).
        batch_size: images per step (32, the papers').
        first_last_bits: bits of the first and last layer; ``None`` quantizes them like the rest.
        range_method: initial weight (per channel) and activation (per tensor) ranges
            (``"mse"``, ``"minmax"`` or ``"percentile"``).
        weight_lr, act_lr: Adam learning rates of the rounding variables and of the step sizes
            (default :func:`budget_lrs`: the papers' 1e-3 and 4e-5 at 20,000 steps, scaled up for
            fewer steps so that learning rate x steps stays the papers', at most 100x).
        reg_weight, beta, warmup: AdaRound's regularizer weight, the (start, end) of its
            annealed exponent, and the fraction of steps before it is switched on.
        drop_prob: QDrop's probability of leaving an activation in float during reconstruction
            (0 gives BRECQ's joint reconstruction with always-quantized activations).
        act_iters: BRECQ's activation-step iterations per block (default ``iters // 4``).
        seed: seed of the batch sampling and of QDrop's drops.
        device_budget: bytes of cached unit inputs/outputs kept on the device (default: a third of
            the free GPU memory; unlimited on a CPU); the rest is streamed from host memory.
        calib_batch_size: batch size of the forward passes that fill the cache.
        progress: a progress bar over the steps (tqdm; the block being reconstructed in its postfix).
        bits_by_layer: mixed precision: ``{layer: weight bits}`` or ``{layer: (weight bits,
            activation bits)}`` for named layers (:func:`dnq.quant.layer_bits`).
        cuda_graph: capture each unit's step once in a CUDA graph and replay it
            (:mod:`dnq.recon_step`); None: on for a CUDA model. True on a CPU model is refused.
        convention: ``"dnq"`` or ``"paper"`` (:mod:`dnq.convention`): where the activation
            quantizers sit, the weight grid, QDrop's mixing (and the meaning of ``drop_prob``:
            the probability of float under ``dnq``, of staying quantized under ``paper``, as in
            QDrop's code), AdaRound's loss and the default learning rates.
        lr_rule: ``"paper"`` (the papers' rates whatever the budget: rounding 1e-3, step sizes
            4e-5 for QDrop, 4e-4 for BRECQ's activation stage) or ``"scaled"`` (those times
            ``20,000 / iters``, BRECQ's activation stage ``5,000 / act_iters``, at most 100x;
            under ``dnq`` BRECQ's activation stage keeps the earlier ``4e-5 x 20,000 / act_iters``).
            None: ``"scaled"`` under ``dnq``, ``"paper"`` under ``paper``. ``weight_lr`` /
            ``act_lr`` override either.

    Returns:
        A new model in eval mode, with the quantized weights written into each Conv/Linear and an
        ``input_quantizer`` (:class:`dnq.quant.ActQuantizer`) on each, like
        :func:`dnq.quant.quantize`'s; ``ptq_layers``, ``ptq_variant`` (the method) and
        ``ptq_recon``: the settings (with the learning rates used) and ``units``, one entry per
        unit and stage with ``unit``, ``stage`` (``weights``, ``activations`` or ``joint``),
        ``layers``, ``steps``, ``cached`` (images), ``streamed`` (cached tensors kept in host
        memory), ``loss_before`` (the output error with round-to-nearest weights, or the initial
        step sizes), ``loss_after``, ``h_binary`` (the fraction of soft rounding variables at
        exactly 0 or 1 before the final rounding), ``cuda_graph`` (whether the unit's step was
        replayed as a CUDA graph) and ``time_s``; ``cuda_graph`` (whether any unit was) and
        ``cuda_graph_note`` (why not, or why a unit ran eagerly; None otherwise).

    Raises:
        ValueError: a bad setting or empty calibration data.
        ReconstructionError: a NaN or Inf loss (naming the unit, the stage and the first bad step;
            the losses are read every :data:`dnq.recon_step.CHECK_EVERY` steps and at the end
            of each unit).
    """
    _check_settings(wbits, abits, first_last_bits, method, range_method, batch_size, calib_batch_size, iters,
                    act_iters, drop_prob, warmup, weight_lr, act_lr, reg_weight, cuda_graph)
    check_convention(convention)
    paper = convention == "paper"
    lr_rule = ("paper" if paper else "scaled") if lr_rule is None else lr_rule
    if lr_rule not in LR_RULES:
        raise ValueError(f"unknown lr_rule {lr_rule!r}; valid: {', '.join(LR_RULES)} (paper: the papers' fixed rates; "
                         f"scaled: times 20000/steps)")
    device = _device_of(model)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got {device}; leave it None (auto)")
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    iters = default_iters(device) if iters is None else iters
    act_iters = max(iters // 4, 1) if act_iters is None else act_iters
    lr_w, lr_a = default_lrs(method, iters, act_iters, lr_rule, convention)
    weight_lr = lr_w if weight_lr is None else weight_lr
    act_lr = lr_a if act_lr is None else act_lr
    if device_budget is None and device.type == "cuda":
        device_budget = torch.cuda.mem_get_info(device)[0] // 3
    calib = [x for x in _batches(calib_data, calib_batch_size)]
    if not calib:
        raise ValueError("calib_data is empty; pass calibration images (the papers use 1,024 training images)")

    t_start = time.perf_counter()
    with full_precision():
        fp = fold_batchnorm(model)
        for p in fp.parameters():
            p.requires_grad_(False)
        qmodel = copy.deepcopy(fp)
        order = execution_order(qmodel, calib[0].to(device))
        sites = paper_sites(qmodel) if paper else None
        bits_of = layer_bits(order, wbits, abits, first_last_bits, None if paper else bits_by_layer)
        if paper:
            wbits_of = _weight_bits(order, wbits, abits, first_last_bits, bits_by_layer)
            bits_of = {n: (wbits_of[n], bits_of[n][1]) for n in order}
        units = find_units(qmodel, order, blocks=method != "adaround")
        if method != "adaround" and all(len(ls) == 1 and u == ls[0] for u, ls in units):
            warnings.warn(f"{type(model).__name__} has no block this toolkit knows (residual, inverted-residual or "
                          f"transformer block): {method} reconstructs layer by layer", stacklevel=2)
        if paper:
            weights, acts = _attach_paper(qmodel, fp, order, bits_of, sites, calib, device, range_method, seed,
                                          abits, first_last_bits)
        else:
            weights, acts = _attach(qmodel, fp, order, bits_of, calib, device, range_method, seed)
        common = dict(qmodel=qmodel, fp=fp, weights=weights, acts=acts, calib=calib, device=device,
                      budget=device_budget, batch_size=batch_size, gen=torch.Generator().manual_seed(seed),
                      weight_lr=weight_lr, act_lr=act_lr, reg_weight=reg_weight, beta=beta, warmup=warmup,
                      cuda_graph=use_graph, sites=sites)
        p_float = (1.0 - drop_prob) if paper else drop_prob  # the quantizers' drop_prob is always P(float)
        stages = _stages(method, iters, act_iters, (p_float, torch.Generator(device=device).manual_seed(seed + 1)))
        log: list[dict] = []
        total = len(units) * sum(s["iters"] for s in stages)
        bar = tqdm(total=total, desc=f"{method} W{wbits}A{abits}", unit="step", disable=not progress, leave=False)
        try:
            for stage in stages:
                _set_acts(acts, enabled=stage.pop("acts"))
                for unit, layers in units:
                    log.append(_reconstruct_unit(unit, layers, **stage, bar=bar, **common))
        finally:
            bar.close()
        info = _finalize(qmodel, order, bits_of, weights, acts, paper)
    qmodel.eval()
    qmodel.ptq_convention = convention
    qmodel.ptq_layers = info
    qmodel.ptq_method = qmodel.ptq_variant = method  # ptq_variant: the older name, kept for readers of it
    qmodel.ptq_bn_reestimated = []
    notes = sorted({u["cuda_graph_note"] for u in log if u.get("cuda_graph_note")})
    qmodel.ptq_recon = {
        "method": method, "iters": iters, "act_iters": act_iters if method == "brecq" else None,
        "batch_size": batch_size, "calib_size": sum(len(x) for x in calib), "range_method": range_method,
        "weight_lr": weight_lr, "act_lr": act_lr if method != "adaround" else None, "reg_weight": reg_weight,
        "beta": list(beta), "warmup": warmup, "drop_prob": drop_prob if method == "qdrop" else None, "seed": seed,
        "drop_prob_meaning": (None if method != "qdrop" else "probability an element stays quantized (QDrop's code)"
                              if paper else "probability an element is left in float"),
        "convention": convention, "lr_rule": lr_rule,
        "qdrop_mix": (None if method != "qdrop" else "block input mixed between the quantized and the float model's, "
                      "every activation quantizer of the block mixed, the block output quantized in the loss"
                      if paper else "each quantizer's output mixed with its own float input"),
        "cuda_graph": any(u["cuda_graph"] for u in log),
        "cuda_graph_note": "; ".join(notes) or (None if use_graph else
                                                 "CUDA graphs need a CUDA device" if device.type != "cuda"
                                                 else "cuda_graph=False"),
        "units": log, "time_s": time.perf_counter() - t_start,
    }
    return qmodel


def _check_settings(wbits, abits, first_last_bits, method, range_method, batch_size, calib_batch_size, iters,
                    act_iters, drop_prob, warmup, weight_lr, act_lr, reg_weight, cuda_graph) -> None:
    """:func:`reconstruct`'s settings, validated (a ValueError naming the bad one)."""
    check_bits(wbits, "weight bits")
    check_bits(abits, "activation bits")
    if first_last_bits is not None:
        check_bits(first_last_bits, "first/last layer bits")
    if method not in RECON_METHODS:
        raise ValueError(f"unknown reconstruction method {method!r}; valid: {', '.join(RECON_METHODS)} "
                         f"(rtn and rtn+bn are dnq.quant.quantize)")
    if range_method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {range_method!r}; valid: {', '.join(RANGE_METHODS)}")
    for name, v in (("batch_size", batch_size), ("calib_batch_size", calib_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name, v in (("iters", iters), ("act_iters", act_iters)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer (steps per block), got {v!r}")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be in [0, 1), got {warmup!r}")
    for name, v in (("weight_lr", weight_lr), ("act_lr", act_lr), ("reg_weight", reg_weight)):
        if v is None and name != "reg_weight":
            continue
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True, False or None (auto), got {cuda_graph!r}")


def _stages(method: str, iters: int, act_iters: int, drop) -> list[dict]:
    """The reconstruction stages of ``method``, each over every unit: whether the activation
    quantizers are on, what is learned, and QDrop's ``(drop probability, generator)``."""
    if method == "qdrop":  # rounding and step sizes together, activations on, dropped at random
        return [dict(stage="joint", acts=True, iters=iters, learn_v=True, learn_s=True, drop=drop)]
    stages = [dict(stage="weights", acts=False, iters=iters, learn_v=True, learn_s=False, drop=None)]
    if method == "brecq":
        stages.append(dict(stage="activations", acts=True, iters=act_iters, learn_v=False, learn_s=True, drop=None))
    return stages


def _attach(qmodel, fp, order, bits_of, calib, device, range_method, seed):
    """Weight parametrizations (soft rounding) and LSQ input quantizers, ranges from the float model."""
    # 65k sampled values per layer: enough for one per-tensor scale, and fast for the MSE search
    observers, _, _ = observe_inputs(fp, [(n, fp.get_submodule(n)) for n in order], calib, device,
                                     max_samples=1 << 16, seed=seed)
    mods = dict(qmodel.named_modules())
    weights, acts = {}, {}
    for n in order:
        layer = mods[n]
        wb, ab = bits_of[n]
        layer.weight.requires_grad_(False)
        wq = AdaRoundWeight(layer.weight, wb, "symmetric", range_method).to(device)
        parametrize.register_parametrization(layer, "weight", wq, unsafe=True)
        weights[n] = wq
        lo, hi = observers[n].range(ab, range_method)
        s, z, qmin, qmax = act_qparams(lo, hi, ab)
        aq = LSQActQuantizer(s, z, qmin, qmax, ab).to(device)
        layer.input_quantizer = aq
        layer.register_forward_pre_hook(_quantize_input_hook)
        acts[n] = aq
    for p in qmodel.parameters():
        p.requires_grad_(False)
    return weights, acts


def _set_acts(acts, enabled: bool) -> None:
    for a in acts.values():
        a.enabled = enabled


_recon_loss = recon_loss
"""The output error of a unit (:func:`dnq.recon_step.recon_loss`); the steps look it up here at each unit."""


def _evaluate(forward, cache: InputCache) -> float:
    """The output error over every cached input (batches of 256, no gradients)."""
    n, tot = len(cache), 0.0
    with torch.no_grad():
        for i in range(0, n, 256):
            idx = torch.arange(i, min(i + 256, n))
            tot += float(_recon_loss(forward(cache.batch("qx", idx)), cache.batch("fy", idx))) * len(idx)
    return tot / n


def _unit_forward(qmodel, unit: str, end: str | None, act: str | None):
    """The unit's output as the convention defines it: the unit, then the module it ends at (its
    activation module and output quantizer, paper convention), then its activation."""
    qunit = qmodel.get_submodule(unit)
    tail = None if end is None else qmodel.get_submodule(end)
    fn = _ACTS.get(act)

    def forward(x):
        y = qunit(x)
        if tail is not None:
            y = tail(y)
        return y if fn is None else fn(y)
    return forward


_ACTS = _PRE_ACTS  # the activations a unit's output can end in (the paper convention's, dnq.act_sites)


def _reconstruct_unit(unit, layers, *, qmodel, fp, weights, acts, calib, device, budget, batch_size, gen, iters,
                      learn_v, learn_s, weight_lr, act_lr, reg_weight, beta, warmup, drop, stage, bar=None,
                      cuda_graph=False, sites=None) -> dict:
    t0 = time.perf_counter()
    qunit = qmodel.get_submodule(unit)
    paper = sites is not None
    own, end, act = unit_tail(sites, unit) if paper else ([], None, None)
    quants = [acts[x.name] for x in own] if paper else [acts[n] for n in layers]
    cache = InputCache(device, budget)
    _capture(qmodel, unit, calib, device, cache, "qx", output=False)  # earlier units are hard-rounded already
    _capture(fp, end or unit, calib, device, cache, "fy", output=True)  # the float model's sites: float, same tail
    mix = paper and drop is not None
    if mix:  # QDrop's code: the block input mixed between the quantized and the float model's
        _capture(fp, unit, calib, device, cache, "fx", output=False)
    cache.finish()
    if act is not None:
        cache.tensors["fy"] = _ACTS[act](cache.tensors["fy"])
    forward = _unit_forward(qmodel, unit, end, act)
    soft = [weights[n] for n in layers] if learn_v else []
    scales = [q.scale for q in quants if q.enabled] if learn_s else []
    was = qunit.training
    qunit.eval()  # eval throughout: a float BatchNorm left unfolded keeps its statistics; drops follow the generator
    for n in layers:  # the baseline of the rounding: round to nearest
        weights[n].mode = "nearest" if learn_v else "hard"
    before = _evaluate(forward, cache)
    for n in layers:
        weights[n].mode = "soft" if learn_v else "hard"
    if drop is not None:
        for q in quants:
            q.drop_prob, q.generator = drop
    for p in scales:
        p.requires_grad_(True)
    step = None
    if soft or scales:
        step = UnitStep(qunit, cache.tensors["qx"], cache.tensors["fy"], device=device, iters=iters,
                        batch_size=batch_size, generator=gen, soft=soft, scales=scales, weight_lr=weight_lr,
                        act_lr=act_lr, reg_weight=reg_weight, beta=beta, warmup=warmup, loss_fn=_recon_loss,
                        name=f"{stage} reconstruction of unit {unit!r} (layers {layers})", cuda_graph=cuda_graph,
                        forward=forward, fx=cache.tensors.get("fx") if mix else None,
                        mix=(1.0 - drop[0], drop[1]) if mix else None, positive_scales=paper)
        if bar is not None:
            bar.set_postfix_str(f"{unit} {stage}", refresh=False)
        step.run(bar)
    h = torch.cat([w.h().detach().flatten() for w in soft]) if soft else None
    for q in quants:
        q.generator, q.drop_prob = None, 0.0
        if q.scale.detach() <= 0:
            with torch.no_grad():
                q.scale.abs_().clamp_min_(_EPS if paper else 1e-8)
    for n in layers:
        weights[n].mode = "hard"
    for p in scales:
        p.requires_grad_(False)
    after = _evaluate(forward, cache)
    qunit.train(was)
    return {"unit": unit, "stage": stage, "layers": list(layers), "sites": [x.name for x in own] if paper else None,
            "steps": 0 if step is None else step.steps, "cached": len(cache), "streamed": cache.streamed,
            "loss_before": before, "loss_after": after,
            "h_binary": None if h is None else float(((h == 0) | (h == 1)).float().mean()),
            "cuda_graph": step is not None and step.captured,
            "cuda_graph_note": None if step is None else step.why_eager, "time_s": time.perf_counter() - t0}


_EPS = float(torch.finfo(torch.float32).eps)


def _attach_paper(qmodel, fp, order, bits_of, sites, calib, device, range_method, seed, abits, first_last_bits):
    """The paper convention's quantizers: asymmetric per-channel AdaRound weights on 2^b levels,
    LSQ quantizers at the sites (QDrop's LSQ: N of the gradient scale over the whole batch), and
    float sites on ``fp`` (their activation only) so that its unit outputs are the targets."""
    observers, _ = observe_sites(fp, sites, calib, device, max_samples=1 << 16, seed=seed)
    weights = {}
    for n in order:
        layer = qmodel.get_submodule(n)
        layer.weight.requires_grad_(False)
        qp = paper_weight_qparams(layer.weight, bits_of[n][0], range_method)
        wq = AdaRoundWeight(layer.weight, bits_of[n][0], qparams=qp).to(device)
        parametrize.register_parametrization(layer, "weight", wq, unsafe=True)
        weights[n] = wq
    bits = site_bits(sites, abits, first_last_bits)
    acts = {}
    for x in sites:
        lo, hi = paper_act_range(observers[x.name], bits[x.name], range_method)
        sc, z, qmin, qmax = act_qparams(lo, hi, bits[x.name])
        acts[x.name] = LSQActQuantizer(sc, z, qmin, qmax, bits[x.name]).to(device)
        acts[x.name].grad_numel = "tensor"
    attach_sites(qmodel, sites, acts)
    attach_sites(fp, sites, {})
    for p in qmodel.parameters():
        p.requires_grad_(False)
    return weights, acts


@torch.no_grad()
def _finalize(qmodel, order, bits_of, weights, acts, paper: bool = False) -> list[dict]:
    """Write the hard-rounded weights into the layers and freeze the activation quantizers."""
    mods = dict(qmodel.named_modules())
    info = []
    for n in order:
        layer = mods[n]
        weights[n].mode = "hard"
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        layer.weight.requires_grad_(True)
        wq = weights[n]
        record_weight_grid(layer, wq.scale, wq.zero_point, wq.qmin, wq.qmax, wq.bits)
        wb, ab = bits_of[n]
        if paper:
            info.append({"layer": n, "wbits": wb})
            continue
        lsq = acts[n]
        layer.input_quantizer = lsq.frozen().to(layer.weight.device)
        info.append({"layer": n, "wbits": wb, "abits": ab, "act_scale": float(layer.input_quantizer.scale),
                     "act_zero_point": float(layer.input_quantizer.zero_point)})
    if paper:
        sites = []
        for m in qmodel.modules():
            for attr in ("output_site", "input_site"):
                sq = getattr(m, attr, None)
                if sq is not None and isinstance(sq.quantizer, LSQActQuantizer):
                    sq.quantizer = sq.quantizer.frozen().to(sq.quantizer.scale.device)
        for name, q in acts.items():
            sites.append({"site": name, "abits": q.bits, "act_scale": float(q.scale.detach().abs()),
                          "act_zero_point": float(q.zero_point)})
        qmodel.ptq_sites = sites
    for p in qmodel.parameters():
        p.requires_grad_(True)
    return info


__all__ = ["CPU_ITERS", "DESCRIPTIONS", "LR_RULES", "PAPER_CALIB_SIZE", "PAPER_ITERS", "PAPER_LRS", "PTQ_METHODS",
           "RECON_METHODS", "AdaRoundWeight", "InputCache", "LSQActQuantizer", "ReconstructionError", "budget_lrs",
           "check_methods", "default_iters", "default_lrs", "find_units", "lsq_fake_quantize", "reconstruct",
           "rectified_sigmoid"]
