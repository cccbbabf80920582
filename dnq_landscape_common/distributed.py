"""``torchrun`` helpers shared by the trainer, the study and the command lines.

Example:
    >>> from dnq_landscape_common.distributed import init_distributed, rank_and_world
    >>> init_distributed("cpu")  # not under torchrun: a single process, no group made
    (0, 1, 0, False)
    >>> rank_and_world()
    (0, 1)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

__all__ = ["exit_distributed", "init_distributed", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device_kind: str) -> tuple[int, int, int, bool]:
    """Join the process group that ``torchrun`` describes in the environment (if any): NCCL,
    bound to the ``LOCAL_RANK``'s GPU, for ``device_kind == "cuda"``, else gloo.

    Returns:
        ``(rank, world_size, local_rank, initialized_here)``; ``(0, 1, 0, False)`` outside
        ``torchrun``; a group that already exists is joined, not made (``initialized_here``
        False: the caller must not destroy it).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        # bind the group to this rank's GPU (eager NCCL init; no guessing of the device later)
        dist.init_process_group(backend, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def exit_distributed(code: int) -> None:
    """Under torchrun, end the process without C++ static destruction: after a gloo collective
    and a oneDNN convolution, PyTorch 2.14 sometimes aborts at interpreter exit ("terminate
    called without an active exception", seen in about 1 of 20 CPU runs), which torchrun would
    report as a failed run. Everything was written (atomically, fsynced) and the process group
    destroyed by then. Outside torchrun it returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
