"""Directions in parameter space for loss surfaces.

* :func:`random_directions`: Gaussian directions, normalized per filter (Li, Xu, Taylor, Studer,
  Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018), per layer, for
  the whole model, or not at all.
* :func:`interpolation_direction`: towards a second model (``other - model``).
* :func:`quantization_direction`: ``Q(W) - W`` from a quantized copy of the model.
* :func:`eigenvector_directions`: the eigenvectors of :func:`landscape.top_eigenvalues`.

A direction is a :class:`Direction`: a dict from parameter name to a parameter-shaped tensor,
with a ``meta`` dict (kind, seed, normalization, norm) that surfaces carry into their results.

Example:
    >>> import torch.nn as nn
    >>> from landscape import random_directions
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    >>> d1, d2 = random_directions(model, n=2, normalization="filter", seed=0)
    >>> float(d1["1.weight"].abs().sum())   # BatchNorm (1-D) parameters get zero by default
    0.0
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .fp64 import dots, norms

NORMALIZATIONS = ("filter", "layer", "model", "none")


class Direction(dict):
    """A parameter-space direction: ``{parameter name: tensor}`` plus a ``meta`` dict."""

    def __init__(self, tensors: dict, **meta):
        super().__init__(tensors)
        self.meta = meta
        self.meta.setdefault("norm", self.norm())

    def norm(self) -> float:
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in self.values()))) if self else 0.0

    def __repr__(self) -> str:
        return f"Direction({len(self)} tensors, {', '.join(f'{k}={v}' for k, v in self.meta.items())})"


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _filter_normalize(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scale each output filter (slice along dim 0) of ``d`` to the norm of the matching filter of
    ``w``; an all-zero filter of ``d`` or ``w`` gives a zero filter, never a division by zero."""
    shape = (-1,) + (1,) * (d.dim() - 1)
    dn = norms(d.reshape(d.shape[0], -1).T)  # float64 sums (landscape.fp64)
    wn = norms(w.reshape(w.shape[0], -1).T)
    factor = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
    return d * factor.to(d.dtype).view(shape)


def normalize_direction(direction: dict, model: nn.Module, normalization: str = "filter",
                        include_1d: bool = False) -> dict:
    """Normalize a raw direction against the model's weights (see :func:`random_directions`)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
    params = _trainable(model)
    out = {}
    for n, d in direction.items():
        w = params[n]
        if w.dim() <= 1 and not include_1d and normalization != "none":
            out[n] = torch.zeros_like(d)
        elif normalization == "filter":
            out[n] = _filter_normalize(d, w) if w.dim() > 1 else _filter_normalize(d[None], w[None])[0]
        elif normalization == "layer":
            dn = float(norms(d.reshape(-1)))
            out[n] = d * (float(norms(w.reshape(-1))) / dn) if dn > 0 else torch.zeros_like(d)
        else:
            out[n] = d
    if normalization == "model":
        keep = [n for n in out if params[n].dim() > 1 or include_1d]
        dn = float(sum(dots(out[n].reshape(-1), out[n].reshape(-1)) for n in keep)) ** 0.5
        wn = float(sum(dots(params[n].reshape(-1), params[n].reshape(-1)) for n in keep)) ** 0.5
        for n in keep:
            out[n] = out[n] * (wn / dn) if dn > 0 else torch.zeros_like(out[n])
    return out


def random_directions(model: nn.Module, n: int = 2, normalization: str = "filter", seed: int = 0, *,
                      include_1d: bool = False) -> list[Direction]:
    """``n`` random Gaussian directions, normalized against the model's weights.

    Args:
        n: number of directions (each drawn from its own seed ``seed + i``).
        normalization: ``"filter"`` (Li et al. 2018: each filter of the direction gets the norm
            of the matching filter of the model), ``"layer"`` (each parameter tensor), ``"model"``
            (the whole vector), or ``"none"``.
        include_1d: also perturb 1-D parameters (biases, BatchNorm); by default they get zero,
            as in Li et al. When included with ``"filter"``, each is scaled as one filter.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    params = _trainable(model)
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        raw = {k: torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
               for k, p in params.items()}
        out.append(Direction(normalize_direction(raw, model, normalization, include_1d), kind="random",
                             seed=seed + i, normalization=normalization, include_1d=include_1d))
    return out


def interpolation_direction(model: nn.Module, other: nn.Module) -> Direction:
    """``other - model`` parameter by parameter (alpha = 1 is the other model)."""
    a, b = _trainable(model), dict(other.named_parameters())
    missing = [k for k in a if k not in b or b[k].shape != a[k].shape]
    if missing:
        raise ValueError(f"the two models differ in parameters {missing[:5]}; "
                         "interpolation needs the same architecture")
    return Direction({k: (b[k].detach().to(a[k]) - a[k]) for k in a}, kind="interpolation")


def quantization_direction(model: nn.Module, quantized: nn.Module) -> Direction:
    """``Q(W) - W``: the difference between a quantized copy and the model, for every parameter
    the two share by name and shape (alpha = 1 is the quantized weights). The copy must keep the
    model's parameter names (quantize without folding BatchNorm); activation quantization is not
    a weight perturbation and is not part of the direction."""
    a, q = _trainable(model), dict(quantized.named_parameters())
    shared = [k for k in a if k in q]
    if not shared:
        raise ValueError("the quantized model shares no parameter name with the model; quantize a copy that keeps "
                         "the parameter names (for BatchNorm models: without folding)")
    bad = [k for k in shared if q[k].shape != a[k].shape]
    if bad:
        raise ValueError(f"shape mismatch for {bad[:5]}")
    return Direction({k: (q[k].detach().to(a[k]) - a[k]) if k in q else torch.zeros_like(a[k]) for k in a},
                     kind="quantization")


def eigenvector_directions(eig, scale: float = 1.0) -> list[Direction]:
    """The eigenvectors of an :class:`landscape.EigenResult` as directions (unit norm times ``scale``)."""
    return [Direction({k: v * scale for k, v in vec.items()}, kind="eigenvector", eigenvalue=lam)
            for lam, vec in zip(eig.eigenvalues, eig.eigenvectors)]
