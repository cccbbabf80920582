"""The reconstruction's cache of a unit's inputs and targets over the calibration set.

:class:`InputCache` keeps the tensors on the device within a byte budget and in host memory past
it; :func:`_capture` fills it by running a model over the calibration batches and stopping each
pass at the unit.

Example:
    >>> import torch, torch.nn as nn
    >>> from dnq.recon_cache import InputCache, _capture
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> cache = InputCache(torch.device("cpu"), None)
    >>> _capture(model, "2", [torch.randn(5, 4), torch.randn(3, 4)], "cpu", cache, "qx", output=False)
    >>> cache.finish()
    >>> len(cache), tuple(cache.tensors["qx"].shape)
    (8, (8, 3))
"""

from __future__ import annotations

import torch
import torch.nn as nn


class InputCache:
    """Cached tensors (the inputs and targets of one unit over the calibration set), kept on
    ``device`` while their total size is within ``budget`` bytes and in host memory otherwise
    (pinned when the device is a GPU), gathered per batch and moved to the device."""

    def __init__(self, device: torch.device, budget: int | None):
        self.device, self.budget, self.used, self.streamed = device, budget, 0, []
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, key: str, t: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append(t.detach())

    def finish(self) -> None:
        for k, parts in self.parts.items():
            t = torch.cat(parts)
            size = t.numel() * t.element_size()
            if self.budget is not None and self.used + size > self.budget:
                self.streamed.append(k)
                t = t.cpu()
                if self.device.type == "cuda":
                    t = t.pin_memory()
            else:
                self.used += size
            self.tensors[k] = t
        self.parts.clear()

    def batch(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        t = self.tensors[key]
        return t[idx.to(t.device)].to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))


class _Stop(Exception):
    pass


def _capture(model: nn.Module, name: str, calib: list[torch.Tensor], device, cache: InputCache, key: str,
             output: bool) -> None:
    """Run ``model`` over the calibration batches and cache the input (``output=False``; before the
    module's own pre-hooks) or the output (after its hooks) of its module ``name`` under ``key``,
    stopping each pass there."""
    mod = model.get_submodule(name)

    def pre(m, args):
        cache.add(key, args[0])
        raise _Stop

    def post(m, args, out):
        cache.add(key, out)
        raise _Stop

    handle = mod.register_forward_hook(post) if output else mod.register_forward_pre_hook(pre, prepend=True)
    try:
        with torch.no_grad():
            for x in calib:
                try:
                    model(x.to(device))
                except _Stop:
                    pass
    finally:
        handle.remove()


__all__ = ["InputCache"]
