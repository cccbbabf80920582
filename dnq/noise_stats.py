"""The quantization errors DNQ models as noise: their per-channel (weights) and per-tensor
(activations) mean and variance, measured as :class:`dnq.noise.QuantNoise` takes them at the start
of every epoch.

Example:
    The error of round-to-nearest is at most half a step ``s``, so its variance is at most ``s^2 / 4``:

    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.noise_stats import activation_error_stats, weight_error_stats
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("cnn-digits", 10, 1, 8)
    >>> mean, var = weight_error_stats(model, 8)["0"]
    >>> w = model[0].weight.detach().flatten(1)
    >>> s = w.abs().amax(1) / 127
    >>> bool((var <= s ** 2 / 4).all()), bool((var > 0).all()), mean.shape
    (True, True, torch.Size([16]))
    >>> stats, order = activation_error_stats(model, 4, torch.randn(64, 1, 8, 8))
    >>> order[0], stats[order[0]][1] > 0
    ('0', True)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dnq_landscape_common.precision import full_precision

from .quant import act_qparams, fake_quantize, quant_layers, weight_error


def weight_error_stats(model: nn.Module, bits: int,
                       bits_override: dict[str, int] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output-channel mean and variance of ``Q(W) - W`` for every Conv/Linear weight.

    ``Q`` is the symmetric max-abs per-channel quantizer at ``bits`` (or ``bits_override[name]``).
    Returns ``{layer name: (mean (C,), variance (C,))}``, variances over the channel's elements
    (population variance), computed in float32.
    """
    out = {}
    with torch.no_grad():
        for name, layer in quant_layers(model):
            b = (bits_override or {}).get(name, bits)
            err = weight_error(layer.weight, b).reshape(layer.weight.shape[0], -1)
            out[name] = (err.mean(dim=1), err.var(dim=1, unbiased=False))
    return out


@torch.no_grad()
def activation_error_stats(
        model: nn.Module, bits: int, calib_x: torch.Tensor, batch_size: int = 256,
        bits_override: dict[str, int] | None = None) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Scalar mean and variance of ``Q(x) - x`` at the input of every Conv/Linear layer.

    ``Q`` is an asymmetric per-tensor min-max quantizer whose range is calibrated on
    ``calib_x``; the error statistics are taken over the same data, in float32 (float64 sums),
    with autocast and TF32 off. The model runs in eval mode (BatchNorm running statistics) and is
    returned to its previous mode. Ranges and sums stay on the device: two host reads in all.

    Returns:
        ``({layer name: (mean, variance)}, layer names in execution order)``.
    """
    layers = dict(quant_layers(model))
    rng: dict[str, torch.Tensor] = {}  # name -> (2,) [min, max]
    acc: dict[str, torch.Tensor] = {}  # name -> (3,) float64 [sum e, sum e^2, count]
    qp: dict[str, tuple] = {}
    order: list[str] = []
    phase = "range"

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach().float()
            if phase == "range":
                if name not in order:
                    order.append(name)
                r = torch.stack([x.min(), x.max()])
                rng[name] = r if name not in rng else torch.stack([torch.minimum(rng[name][0], r[0]),
                                                                    torch.maximum(rng[name][1], r[1])])
            else:
                s, z, qmin, qmax = qp[name]
                e = fake_quantize(x, torch.tensor(s, device=x.device), torch.tensor(z, device=x.device), qmin, qmax) - x
                part = torch.stack([e.sum(dtype=torch.float64), e.double().pow(2).sum(),
                                    torch.tensor(float(e.numel()), dtype=torch.float64, device=x.device)])
                acc[name] = part if name not in acc else acc[name] + part
        return hook

    was_training = model.training
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        with full_precision():
            for phase in ("range", "error"):  # the hooks read ``phase`` from this scope
                if phase == "error":
                    bounds = torch.stack([rng[n] for n in order]).tolist() if order else []
                    for n, (lo, hi) in zip(order, bounds):
                        qp[n] = act_qparams(lo, hi, (bits_override or {}).get(n, bits))
                for x in calib_x.split(batch_size):
                    model(x.float())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    sums = torch.stack([acc[n] for n in order]).tolist() if order else []
    stats = {}
    for n, (s, s2, cnt) in zip(order, sums):
        mean = s / cnt
        stats[n] = (mean, max(s2 / cnt - mean * mean, 0.0))
    return stats, order


__all__ = ["activation_error_stats", "weight_error_stats"]
