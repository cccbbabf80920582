"""Recomputing BatchNorm running statistics: one rule for every training method.

Noise-injecting methods (DNQ, its ablations, the Gaussian baselines) and SAM's second pass run
forward passes on perturbed weights or activations; BatchNorm's running statistics accumulated
during those passes do not match the clean final weights. The trainer therefore recomputes them,
for every method alike, on the clean final weights over one pass of the training loader as it
presents batches (same augmentation), with a cumulative average, like
:func:`torch.optim.swa_utils.update_bn` (Izmailov et al., "Averaging Weights Leads to Wider
Optima and Better Generalization", UAI 2018), which SWA needs for the same reason.

Differences from ``update_bn``: only the BatchNorm layers are put in training mode (dropout and
everything else stay in eval mode, as at test time), no forward hook of the model fires noise
(the caller detaches them), the pass runs in float32 without autocast or TF32
(:func:`landscape.precision.full_precision`), and the model's modes are restored.

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.batchnorm import recompute_bn
    >>> model = build_model("cnn-digits", 10, 1, 8)
    >>> n = recompute_bn(model, [torch.randn(32, 1, 8, 8) for _ in range(4)])
    >>> n
    128
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from dnq_landscape_common.precision import full_precision


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> int:
    """Reset every BatchNorm's running statistics and recompute them over ``batches``.

    Each BatchNorm layer's running mean and (unbiased) variance become the average over the
    batches of the per-batch statistics (``momentum=None``: a cumulative average), the rule of
    :func:`torch.optim.swa_utils.update_bn`. With equal batch sizes the mean is the exact mean
    over all images seen.

    Args:
        model: the model (changed in place: its BatchNorm buffers; modes restored).
        batches: an iterable of input tensors or ``(inputs, targets)`` pairs (a
            :class:`dnq.data.BatchLoader` works as is).
        device: where to move the inputs (default: the model's device).

    Returns:
        The number of images seen (0 when the model has no BatchNorm: nothing is run).

    Raises:
        ValueError: ``batches`` is empty (the statistics would be left reset).
    """
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    if device is None:
        device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with full_precision():
            for b in batches:
                x = b[0] if isinstance(b, (tuple, list)) else b
                model(x.to(device))
                seen += len(x)
    finally:
        for bn, mom in momenta.items():
            bn.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    if not seen:
        raise ValueError("no batch to recompute the BatchNorm statistics on; give at least one batch")
    return seen
