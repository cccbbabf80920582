"""Small result dataclasses with ``to_dict()`` for JSON and a readable ``repr``.

Example:
    >>> import dataclasses, json, torch
    >>> from landscape.results import Result
    >>> @dataclasses.dataclass(repr=False)
    ... class Fit(Result):
    ...     slope: float
    ...     residuals: torch.Tensor
    ...     _exclude = ("residuals",)
    >>> fit = Fit(0.5, torch.zeros(1000))
    >>> fit  # a large tensor by its shape, never its contents
    Fit(slope=0.5, residuals=<Tensor (1000,)>)
    >>> json.dumps(fit.to_dict()), len(fit.to_dict(include_large=True)["residuals"])
    ('{"slope": 0.5}', 1000)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _short(v, depth: int = 0) -> str:
    """A short description of a field: small arrays and numbers as values, anything large (a
    tensor, a parameter dict, a long list) by its shape or length, never its contents."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        if v.ndim == 0 or (v.ndim == 1 and v.shape[0] <= 4):
            return np.array2string(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v), precision=5)
        return f"<{type(v).__name__} {tuple(v.shape)}>"
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        if len(v) > 4 or depth >= 2:
            return f"<dict of {len(v)}>"
        return "{" + ", ".join(f"{k}: {_short(x, depth + 1)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        if len(v) > 4 or depth >= 2:
            return f"<{type(v).__name__} of {len(v)}>"
        return "[" + ", ".join(_short(x, depth + 1) for x in v) + "]"
    if isinstance(v, str) and len(v) > 80:
        return repr(v[:77] + "...")
    return repr(v)


class Result:
    """Mixin for the result dataclasses."""

    #: fields left out of ``to_dict`` (large, parameter-shaped tensors)
    _exclude: tuple[str, ...] = ()

    def to_dict(self, include_large: bool = False) -> dict:
        """JSON-ready dictionary (tensors and arrays become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if include_large or f.name not in self._exclude}

    def __repr__(self) -> str:
        body = ", ".join(f"{f.name}={_short(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({body})"
