"""The loss surfaces of one trained model, on its curvature images: ``surface`` (a 2-D
filter-normalized surface around the weights) and ``slice:<bits>`` (the loss along ``Q(W) - W``;
``alpha = 1`` is the weight-quantized model).

Each is a function of the model's :class:`~landscape.study.context.MeasureContext` and its key
(:mod:`~landscape.study.keys`), and returns the value recorded.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape.study.context import MeasureContext
    >>> from landscape.study.keys import SliceKey
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> ctx = MeasureContext(model, ds=None, hdata=data)
    >>> s = loss_slice(ctx, SliceKey(samples=16, batch=16, seed=0, bits="W4A4", first_last_bits=8, steps=3,
    ...                              span=(0.0, 1.0)))
    >>> [round(a, 3) for a in s["alphas"]], s["ptq_alpha"]
    ([0.0, 0.5, 1.0], 1.0)
"""

from __future__ import annotations

from ..directions import quantization_direction, random_directions
from ..surface import surface_1d, surface_2d
from .context import MeasureContext
from .keys import SliceKey, SurfaceKey

__all__ = ["loss_slice", "surface"]


def surface(ctx: MeasureContext, key: SurfaceKey) -> dict:
    """``surface``: the loss on ``key.steps`` x ``key.steps`` points over ``[-span, span]`` along
    two seeded filter-normalized random directions."""
    dirs = random_directions(ctx.model, 2, "filter", seed=key.seed)
    s = surface_2d(ctx.model, ctx.loss_fn, ctx.hdata, dirs, span=(-key.span, key.span), steps=key.steps,
                   progress=ctx.progress)
    return s.to_dict()


def loss_slice(ctx: MeasureContext, key: SliceKey) -> dict:
    """``slice:<bits>``: the loss along ``Q(W) - W`` at ``key.bits`` (``ptq_alpha``, 1, is the
    weight-quantized model)."""
    d = quantization_direction(ctx.model, ctx.weight_quantized(key.bits, key.first_last_bits))
    s = surface_1d(ctx.model, ctx.loss_fn, ctx.hdata, d, span=tuple(key.span), steps=key.steps,
                   progress=ctx.progress)
    out = s.to_dict()
    out["ptq_alpha"] = 1.0
    return out
