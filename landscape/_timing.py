"""Wall-clock timings of work on a device, for the instruments' choices between methods.

CUDA kernels run asynchronously: ``time.perf_counter()`` around a call measures the launches,
not the work. :func:`timed` waits for the device before starting the clock (so that earlier
work is not charged to this call) and before stopping it; on the CPU it is a plain timer.

Example:
    >>> from landscape._timing import best_of, timed
    >>> out, seconds = timed(lambda: sum(range(1000)), "cpu")
    >>> out, 0 <= seconds < 1  # fn's result, and the seconds it took
    (499500, True)
    >>> 0 <= best_of(lambda: sum(range(1000)), "cpu", repeat=3) < 1  # the fastest of 3 runs, after a warm-up
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for all work queued on ``device`` (nothing to wait for on the CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "synchronize"):
        accel.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """Run ``fn()`` once and time it, the device synchronized before and after.

    Args:
        fn: the work, called without arguments.
        device: where the work runs.

    Returns:
        ``(fn's result, seconds)``.
    """
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def best_of(fn: Callable[[], Any], device: torch.device | str, repeat: int = 1, warmup: bool = True) -> float:
    """The shortest of ``repeat`` :func:`timed` runs of ``fn`` (after one untimed run if ``warmup``)."""
    if warmup:
        fn()
    return min(timed(fn, device)[1] for _ in range(max(1, repeat)))
