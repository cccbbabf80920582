"""One parser of the ``--device`` option that every command and entry point shares.

``"auto"`` (CUDA when present, else the CPU), ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are
accepted; anything else, CUDA where there is none, an index past the last GPU, and a fixed
``cuda:N`` under ``torchrun`` (where every process takes the GPU of its ``LOCAL_RANK``) are
refused before any work, with a message that names the valid values or the fix.

Example:
    >>> from dnq_landscape_common.device import DeviceError, check_device, parse_device
    >>> parse_device("cpu")
    device(type='cpu')
    >>> try:
    ...     check_device("tpu")
    ... except DeviceError as e:
    ...     print(e)
    unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N
    >>> try:  # an entry point keeps its own error class (a ValueError subclass)
    ...     check_device("gpu", error=KeyError)
    ... except KeyError:
    ...     print("refused")
    refused
"""

from __future__ import annotations

import os
import re

import torch

__all__ = ["DEVICES", "DeviceError", "check_device", "parse_device", "resolve_device"]

DEVICES = "auto, cpu, cuda, cuda:N"


class DeviceError(ValueError):
    """A device name this process cannot use; the message names the valid ones or the fix."""


def check_device(device, error: type[Exception] = DeviceError) -> str:
    """``device`` itself, after checking that this process can use it.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        error: the exception class to raise (an entry point's own, e.g. a configuration error).

    Raises:
        error: an unknown name, CUDA asked for where there is none, a GPU index past the last
            one, or ``cuda:N`` under ``torchrun`` (``WORLD_SIZE > 1``).
    """
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise error(f"unknown device {device!r}; valid: {DEVICES}")
    if not device.startswith("cuda"):
        return device
    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise error(f"--device {device} under torchrun: every process takes the GPU of its LOCAL_RANK, so a fixed "
                    "cuda:N would put all ranks on one GPU; pass --device cuda (or auto) and choose GPUs with "
                    "CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise error(f"--device {device} asked for, but CUDA is not available here; use --device cpu or auto")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise error(f"--device {device} asked for, but this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})")
    return device


def device_kind(device: str) -> str:
    """``"cuda"`` or ``"cpu"``: what ``device`` (checked by :func:`check_device`) resolves to."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The ``torch.device`` of ``device`` for the process of ``local_rank`` (``"cuda"`` means
    that rank's GPU under ``torchrun``). No check: see :func:`parse_device`."""
    if device == "auto":
        device = device_kind(device)
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def parse_device(device, error: type[Exception] = DeviceError, local_rank: int = 0) -> torch.device:
    """:func:`check_device`, then :func:`resolve_device`."""
    return resolve_device(check_device(device, error), local_rank)
