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


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 -> [world * B, ...], without gradients.

    For tensors that carry no gradient (masks, ids). Boolean tensors travel as uint8 (not every
    backend reduces or gathers bool). Every rank must pass the same shape. ``x`` itself without DDP.
    """
    if not is_distributed():
        return x
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()  # [B, ...]
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, wire)
    out = torch.cat(parts, dim=0)  # [W*B, ...]
    return out.bool() if x.dtype == torch.bool else out


def _shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Send ``x`` to rank ``(r + shift) % W`` and return the tensor received from ``(r - shift) % W``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, (rank + shift) % world),
        dist.P2POp(dist.irecv, out, (rank - shift) % world),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


class _RingShift(torch.autograd.Function):
    """Autograd wrapper of :func:`_shift`: the backward sends the gradient the opposite way round."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: int) -> torch.Tensor:  # type: ignore[override]
        ctx.shift = shift
        return _shift(x, shift)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # the value this rank received came from rank r - shift; its gradient goes back there, and the
        # gradient of what this rank sent (to r + shift) comes back from there.
        return _shift(grad, -ctx.shift), None


def ppermute(x: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Ring exchange with gradients: send ``x`` to rank ``r + shift``, receive from rank ``r - shift``.

    The ``ppermute`` collective of JAX on a ring (ranks modulo the world size), written with
    point-to-point ``isend``/``irecv`` (``batch_isend_irecv``). The backward pass sends the incoming
    gradient to ``r - shift`` and receives the gradient for ``x`` from ``r + shift``, so a loss built on
    received tensors gives each rank exactly the gradient of its own ``x``. Every rank must call it
    the same number of times with the same shape and dtype. A no-op (returns ``x``) without a process
    group, or when ``shift`` is a multiple of the world size.

    Args:
        x: the tensor to pass on (any shape; identical shape on every rank).
        shift: how many ranks along the ring the tensor travels (negative: the other way).
    """
    if not is_distributed() or shift % dist.get_world_size() == 0:
        return x
    return _RingShift.apply(x, shift)


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (a list ordered by rank); ``[obj]`` without DDP."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
