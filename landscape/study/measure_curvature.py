"""The curvature measurements of one trained model, on its curvature images (``H``: the Hessian
of the training loss there, in eval mode): ``trace`` (with its standard error), ``eigen`` (top
eigenvalues), ``density`` (SLQ), ``blocks`` (per-layer traces), and ``noise:<bits>``, the loss
increase from weight quantization (:func:`weight_quantization_loss`: ``Tr(H Sigma)``, its
second-order prediction and the measured increase).

Each is a function of the model's :class:`~landscape.study.context.MeasureContext` and its key
(:mod:`~landscape.study.keys`), and returns the value recorded.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape.study.context import MeasureContext
    >>> from landscape.study.keys import TraceKey
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> g = torch.Generator().manual_seed(0)
    >>> data = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))]
    >>> ctx = MeasureContext(model, ds=None, hdata=data)
    >>> t = trace(ctx, TraceKey(samples=16, batch=16, seed=0, method="hutch++", matvecs=6))
    >>> t["num_matvecs"], t["seed"]
    (6, 0)
"""

from __future__ import annotations

from dnq.quant import parse_bits, weight_error_moments

from ..density import spectral_density
from ..eigen import top_eigenvalues
from ..trace import block_traces, hessian_trace, predicted_loss_increase
from .context import MeasureContext
from .keys import BlockTraceKey, DensityKey, EigenKey, NoiseKey, TraceKey

__all__ = ["blocks", "density", "eigen", "trace", "weight_quantization_loss"]


def trace(ctx: MeasureContext, key: TraceKey) -> dict:
    """``trace``: :func:`landscape.hessian_trace` with ``key.method`` and ``key.matvecs``."""
    return hessian_trace(ctx.op(), key.matvecs, key.method, seed=key.seed, progress=ctx.progress).to_dict()


def eigen(ctx: MeasureContext, key: EigenKey) -> dict:
    """``eigen``: the top ``key.k`` eigenvalues (without the eigenvectors)."""
    res = top_eigenvalues(ctx.op(), k=key.k, tol=key.tol, seed=key.seed, progress=ctx.progress)
    d = res.to_dict()
    d.pop("eigenvectors", None)
    return d


def density(ctx: MeasureContext, key: DensityKey) -> dict:
    """``density``: the spectral density by SLQ."""
    return spectral_density(ctx.op(), key.runs, key.steps, seed=key.seed, progress=ctx.progress).to_dict()


def blocks(ctx: MeasureContext, key: BlockTraceKey) -> dict:
    """``blocks``: the trace of every layer's diagonal block."""
    return block_traces(ctx.op(), key.matvecs, seed=key.seed, progress=ctx.progress).to_dict()


def weight_quantization_loss(ctx: MeasureContext, key: NoiseKey) -> dict:
    """``noise:<bits>``: the loss increase from quantizing the weights at ``key.bits``.

    ``Tr(H Sigma)`` with ``Sigma`` the per-channel variance of the model's own weight quantization
    error ``Q(W) - W`` (:func:`dnq.quant.weight_error_moments`: symmetric per-channel min-max,
    first/last layer at ``key.first_last_bits``, BatchNorm not folded so that the error lives in
    the parameters ``H`` is taken in), the second-order prediction
    ``g.mu + 1/2 (mu^T H mu + Tr(H Sigma))`` of the loss increase
    (:func:`landscape.predicted_loss_increase`), and the measured increase ``L(Q(W)) - L(W)`` on
    the same images (weights only, eval mode).
    """
    (w, _), = parse_bits(key.bits)
    q = ctx.weight_quantized(key.bits, key.first_last_bits)
    mean, var = weight_error_moments(ctx.model, ctx.weight_bits(key.bits, key.first_last_bits))
    pred = predicted_loss_increase(ctx.op(), var, mean=mean, num_matvecs=key.matvecs, seed=key.seed,
                                   progress=ctx.progress)
    was = ctx.model.training
    ctx.model.eval()
    try:
        base, quant = ctx.loss(ctx.model), ctx.loss(q)
    finally:
        ctx.model.train(was)
    out = pred.to_dict()
    out.update({"trace_h_sigma": 2 * pred.trace_term, "trace_h_sigma_std_error": 2 * pred.trace_std_error,
                "measured": quant - base, "loss_fp": base, "loss_weight_quantized": quant, "wbits": w})
    return out
