"""Round-to-nearest PTQ under the paper convention (:mod:`dnq.convention`): the BRECQ / QDrop places and grids.

:func:`quantize_paper` is :func:`dnq.quant.quantize` with ``convention="paper"``: weights
asymmetric per output channel on ``2^b`` levels, activation quantizers at the sites of
:func:`dnq.act_sites.paper_sites` (layer and block outputs after their activation), the first and
last layer's weights and the last activation quantizer at ``first_last_bits``. ``"rtn+bn"``
re-estimates BatchNorm through the quantized model before folding, as under the ``dnq``
convention.

The ``"mse"`` range method follows QDrop's ``MSEObserver`` (:func:`paper_mse_range`): the
``L_2.4`` error over 100 candidate ranges, and for a range that straddles zero (weights) over every
zero point too; the ``dnq`` convention's ``"mse"`` is the squared error over 81 clipping ratios.
Activations are searched on a seeded subsample of at most 2^20 values of the calibration
activations (QDrop: every value of 256 images).

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.quant_paper import quantize_paper
    >>> model = build_model("cnn-digits", 10, 1, 8).eval()
    >>> q = quantize_paper(model, 2, 4, torch.randn(64, 1, 8, 8))
    >>> [(s["site"], s["abits"]) for s in q.ptq_sites]
    [('0', 4), ('3', 4), ('7', 8)]
    >>> q.ptq_convention, [l["wbits"] for l in q.ptq_layers]
    ('paper', [8, 2, 2, 8])
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from dnq_landscape_common.precision import full_precision

from .act_sites import ConventionError, Site, attach_sites, paper_sites
from .quant import (
    ActObserver,
    ActQuantizer,
    _batches,
    _channel_view,
    _foldable_pairs,
    _reestimate_and_fold,
    act_qparams,
    check_bits,
    execution_order,
    fake_quantize,
    fold_batchnorm,
    layer_bits,
    ptq_method,
    quant_layers,
    set_quantized_weight,
    weight_qparams,
)

LP_NORM = 2.4
"""QDrop's ``MSEObserver`` exponent (``p = 2.4``)."""
CANDIDATES = 100
"""QDrop's number of candidate ranges."""


def _qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int):
    """QDrop's ``calculate_qparams`` (asymmetric): scale and zero point of ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / float(qmax - qmin)).clamp_min(1e-8)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp


@torch.no_grad()
def paper_mse_range(x: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """QDrop's ``MSEObserver`` search: the range ``(lo, hi)`` minimising the mean ``|Q(x) - x|^2.4``.

    A one-sided ``x`` (all >= 0, e.g. after a ReLU) searches ``[0, i/100 max]``; otherwise
    (``perform_2D_search``) every range width ``i/100 (max - min)`` with every zero point of the
    grid. Per output channel for a weight (``per_channel``), per tensor otherwise.

    Returns:
        ``(lo, hi)``: tensors of shape (C,) per channel, 0-dim per tensor.

    Example:
        >>> lo, hi = paper_mse_range(torch.linspace(0, 1, 1001), 4, per_channel=False)
        >>> float(lo), 0.9 < float(hi) <= 1.0
        (0.0, True)
    """
    check_bits(bits)
    qmin, qmax = 0, 2 ** bits - 1
    flat = x.detach().float().reshape(x.shape[0], -1) if per_channel else x.detach().float().reshape(1, -1)
    x_min, x_max = flat.amin(1), flat.amax(1)
    best = torch.full_like(x_min, float("inf"))
    best_lo, best_hi = x_min.clone(), x_max.clone()

    chunk = max(1, (1 << 24) // flat.numel())  # candidates evaluated at once: at most 2^24 values in flight

    def score(lo, hi):  # lo, hi: (K, C) candidates -> (K, C) mean |Q(x) - x|^p per channel
        s, z = _qparams(lo, hi, qmin, qmax)
        out = []
        for k in range(0, s.shape[0], chunk):
            q = fake_quantize(flat.unsqueeze(0), s[k:k + chunk].unsqueeze(-1), z[k:k + chunk].unsqueeze(-1), qmin,
                              qmax)
            out.append((q - flat.unsqueeze(0)).abs().pow(LP_NORM).mean(-1))
        return torch.cat(out)

    one_sided = bool((flat.min() >= 0) | (flat.max() <= 0))
    width = torch.maximum(x_min.abs(), x_max) if one_sided else x_max.clamp(min=0) - x_min.clamp(max=0)
    zps = torch.arange(qmin, qmax + 1, dtype=flat.dtype, device=flat.device).unsqueeze(1)
    for i in range(1, CANDIDATES + 1):
        if one_sided:
            thres = (width / CANDIDATES * i).unsqueeze(0)
            lo = torch.zeros_like(thres) if bool(flat.min() >= 0) else -thres
            hi = thres if bool(flat.min() >= 0) else torch.zeros_like(thres)
        else:
            tmax = width / CANDIDATES * i
            delta = (tmax / float(qmax - qmin)).unsqueeze(0)
            lo, hi = -zps * delta, tmax.unsqueeze(0) - zps * delta
        sc = score(lo, hi)
        k = sc.argmin(0)
        cand = sc.gather(0, k.unsqueeze(0)).squeeze(0)
        better = cand < best
        pick_lo = lo.gather(0, k.unsqueeze(0)).squeeze(0) if lo.shape[0] > 1 else lo.squeeze(0).expand_as(best)
        pick_hi = hi.gather(0, k.unsqueeze(0)).squeeze(0) if hi.shape[0] > 1 else hi.squeeze(0).expand_as(best)
        best_lo, best_hi = torch.where(better, pick_lo, best_lo), torch.where(better, pick_hi, best_hi)
        best = torch.minimum(best, cand)
    if not per_channel:
        return best_lo[0], best_hi[0]
    return best_lo, best_hi


def paper_weight_qparams(w: torch.Tensor, bits: int, method: str = "mse", percentile: float = 99.99):
    """Per-output-channel asymmetric parameters on ``2^b`` levels: ``(scale, zero_point, 0, 2^b - 1)``.

    ``"mse"`` is QDrop's search (:func:`paper_mse_range`); ``"minmax"`` and ``"percentile"`` are
    :func:`dnq.quant.weight_qparams`' asymmetric ones.

    Example:
        >>> s, z, qmin, qmax = paper_weight_qparams(torch.tensor([[-1.0, 0.0, 2.0]]), 2, "minmax")
        >>> float(s[0]), float(z[0]), qmin, qmax   # 4 levels over [-1, 2]: -1, 0, 1, 2
        (1.0, 1.0, 0, 3)
    """
    if method != "mse":
        return weight_qparams(w, bits, "asymmetric", method, percentile)
    lo, hi = paper_mse_range(w, bits, per_channel=True)
    scale, zp = _qparams(lo, hi, 0, 2 ** bits - 1)
    return scale.to(w.dtype), zp.to(w.dtype), 0, 2 ** bits - 1


def paper_quantize_weight(w: torch.Tensor, bits: int, method: str = "mse", percentile: float = 99.99) -> torch.Tensor:
    """Round-to-nearest of ``w`` on the paper convention's per-channel asymmetric grid."""
    scale, zp, qmin, qmax = paper_weight_qparams(w, bits, method, percentile)
    return fake_quantize(w, _channel_view(scale, w), _channel_view(zp, w), qmin, qmax)


def paper_act_range(obs: ActObserver, bits: int, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """An activation site's range from its observer: QDrop's search on the observer's samples for
    ``"mse"``, the observer's own range otherwise."""
    if method != "mse":
        return obs.range(bits, method, percentile)
    if not obs.samples:
        raise RuntimeError("observer saw no data; the calibration set never reached this site")
    lo, hi = paper_mse_range(torch.cat(obs.samples), bits, per_channel=False)
    return float(lo), float(hi)


def site_bits(sites: list[Site], abits: int, first_last_bits: int | None) -> dict[str, int]:
    """Each site's bits: ``abits``, the last (feeding the classifier) at ``first_last_bits``."""
    return {s.name: (first_last_bits if s.last and first_last_bits is not None else abits) for s in sites}


@torch.no_grad()
def observe_sites(model: nn.Module, sites: list[Site], batches, device, *, max_samples: int = 1 << 20,
                  seed: int = 0) -> tuple[dict[str, ActObserver], int]:
    """Observe every site's value on a float copy of ``model`` (the model is not touched)."""
    probe = copy.deepcopy(model).eval()
    observers = {s.name: ActObserver(max_samples=max_samples, seed=seed) for s in sites}
    for name, sq in attach_sites(probe, sites, {}).items():
        sq.observer = observers[name].observe
    seen = 0
    with full_precision():
        for x in batches:
            probe(x.to(device))
            seen += len(x)
    return observers, seen


def _weight_bits(order, wbits, abits, first_last_bits, bits_by_layer) -> dict[str, int]:
    for name, b in (bits_by_layer or {}).items():
        if isinstance(b, (tuple, list)) and b[1] != abits:
            raise ConventionError(f"bits_by_layer gives {name!r} activation bits {b[1]}: under the paper convention "
                                  "activations are quantized at layer and block outputs, not per layer input; give "
                                  "weight bits only, or use the dnq convention")
    per_layer = layer_bits(order, wbits, abits, first_last_bits, bits_by_layer)
    return {n: wa[0] for n, wa in per_layer.items()}


@torch.no_grad()
def quantize_paper(model: nn.Module, wbits: int, abits: int, calib_data, *, range_method: str = "minmax",
                   act_range_method: str | None = None, first_last_bits: int | None = 8, fold_bn: bool = True,
                   percentile: float = 99.99, batch_size: int = 256, seed: int = 0, bn_reestimate: bool = False,
                   bits_by_layer: dict | None = None) -> nn.Module:
    """Round-to-nearest PTQ (``rtn`` / ``rtn+bn``) under the paper convention; the model is not touched.

    The arguments are :func:`dnq.quant.quantize`'s (weights are always asymmetric here). The
    returned model has ``ptq_layers`` (per layer: weight bits), ``ptq_sites`` (per activation site:
    its name, hooked module, bits and range), ``ptq_method``, ``ptq_bn_reestimated`` and
    ``ptq_convention == "paper"``.

    Raises:
        ConventionError: a model the paper convention cannot place quantizers on.
        ValueError: empty calibration data or a bad setting.
    """
    act_range_method = act_range_method or range_method
    method = ptq_method(bn_reestimate)
    pairs = None
    if bn_reestimate:
        qmodel = copy.deepcopy(model).eval()
        pairs = _foldable_pairs(qmodel, stacklevel=2) if fold_bn else None
        if not isinstance(calib_data, torch.Tensor):
            calib_data = list(_batches(calib_data, batch_size))
    else:
        qmodel = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    if not quant_layers(qmodel):
        raise ValueError("the model has no Conv/Linear layer to quantize")
    device = next(qmodel.parameters()).device
    batches = list(_batches(calib_data, batch_size))
    if not batches:
        raise ValueError("calib_data is empty; pass at least one calibration batch (e.g. "
                         "Dataset.calibration_inputs(256))")
    sites = paper_sites(qmodel)
    order = execution_order(qmodel, batches[0].to(device))
    wbits_of = _weight_bits(order, wbits, abits, first_last_bits, bits_by_layer)
    observers, _ = observe_sites(qmodel, sites, batches, device, seed=seed)
    for name in order:
        layer = qmodel.get_submodule(name)
        b = wbits_of[name]
        set_quantized_weight(layer, paper_weight_qparams(layer.weight, b, range_method, percentile), b)
    bits = site_bits(sites, abits, first_last_bits)
    quantizers, info = {}, []
    for s in sites:
        lo, hi = paper_act_range(observers[s.name], bits[s.name], act_range_method, percentile)
        scale, zp, qmin, qmax = act_qparams(lo, hi, bits[s.name])
        quantizers[s.name] = ActQuantizer(scale, zp, qmin, qmax, bits[s.name]).to(device)
        info.append({"site": s.name, "module": s.module, "kind": s.kind, "abits": bits[s.name], "act_lo": lo,
                     "act_hi": hi})
    attached = attach_sites(qmodel, sites, quantizers)
    reestimated: list[str] = []
    if bn_reestimate:
        reestimated = _reestimate_and_fold(qmodel, calib_data, batch_size, pairs)
        lost = [s for s in sites if not hasattr(qmodel.get_submodule(s.module), f"{s.kind}_site")]
        attach_sites(qmodel, lost, {s.name: attached[s.name] for s in lost})  # a folded BatchNorm took its hook
    qmodel.ptq_layers = [{"layer": n, "wbits": wbits_of[n]} for n in order]
    qmodel.ptq_sites = info
    qmodel.ptq_method = qmodel.ptq_variant = method
    qmodel.ptq_bn_reestimated = reestimated
    qmodel.ptq_convention = "paper"
    return qmodel


__all__ = ["CANDIDATES", "LP_NORM", "observe_sites", "paper_act_range", "paper_mse_range", "paper_quantize_weight",
           "paper_weight_qparams", "quantize_paper", "site_bits"]
