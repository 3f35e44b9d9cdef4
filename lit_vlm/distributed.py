"""Distributed helpers shared by losses and evaluation (plain torch.distributed, no Lightning).

Model code stays single-device code: these helpers are no-ops when no process group is
initialised, so every loss works unchanged in one process and under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) without one."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 -> [world * B, ...], keeping gradients.

    The backward pass sums, over ranks, the gradient each rank's loss sends to this rank's slice
    (``torch.distributed.nn.functional.all_gather``), so "local rows against the global batch" losses
    averaged by DDP give exactly the gradients of one process holding the whole global batch.
    Every rank must pass the same batch size B.
    """
    if not is_distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)  # [W*B, ...]


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (a list ordered by rank); ``[obj]`` without DDP."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
