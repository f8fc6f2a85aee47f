"""All of ``ssl_models``' distributed code: rank, world size, an all-gather with gradient and
an all-reduce of statistics.

Everything else calls these helpers and therefore runs unchanged in a single process with no
process group, where ``rank() == 0``, ``world_size() == 1`` and ``gather_with_grad`` and
``all_reduce_sum`` are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes in the default process group; 1 without one."""
    return dist.get_world_size() if _initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and keeps this rank's slice.

    Rank ``r``'s tensor ``x_r`` enters every rank's loss through the gathered tensor, so its
    true gradient is ``sum_s dL_s/dx_r``. Each rank only holds ``dL_s/d(gathered)`` for its own
    ``s``; an all-reduce (SUM) of those, sliced at ``r``, is exactly ``sum_s dL_s/dx_r``.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd's buffer is not ours
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start:start + ctx.batch]  # (B, ...)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, keeping the gradient.

    Every rank must pass the same shape (equal per-rank batch ``B``); the data pipeline splits
    the global batch evenly. The backward sums gradients over ranks (see ``_GatherWithGrad``),
    so the gradient of every rank's loss reaches the local tensor.

    Shape:
        - x: (B, *)
        - output: (W * B, *), rows ``[r*B:(r+1)*B]`` from rank ``r``; ``x`` itself when W == 1.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over all ranks, in place, without gradient (statistics such as DINO's centre);
    ``x`` itself when W == 1."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
