"""Small tensor reductions that the trainer's quantizers and the instruments both need.

Example:
    >>> import torch
    >>> from dnq_landscape_common.tensors import channel_moments
    >>> mean, var = channel_moments(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    >>> mean.tolist(), var.tolist()
    ([2.0, 2.0], [1.0, 0.0])
"""

from __future__ import annotations

import torch

__all__ = ["channel_moments"]


def channel_moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and *population* variance (divided by ``n``) of ``t`` over each output channel
    (dimension 0), in float64, so that ``n_c (mean^2 + variance)`` is the channel's sum of
    squares; a 0-d tensor is one channel of one element.

    Returns:
        two float64 tensors of shape ``(C,)``.
    """
    e = t.detach().double()
    flat = e.reshape(e.shape[0], -1) if e.dim() > 0 else e.reshape(1, 1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=False)
