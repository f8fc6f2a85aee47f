"""All of ``ssl_models``' distributed code: rank, world size, an all-gather with gradient and
BatchNorm over the global batch, and an all-reduce of statistics.

Everything else calls these helpers and therefore runs unchanged in a single process with no
process group, where ``rank() == 0``, ``world_size() == 1``, ``gather_with_grad`` and
``all_reduce_sum`` are the identity and :class:`GlobalBatchNorm` is plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

# All ranks' equal-sized tensors concatenated into one: all_gather_single from torch 2.14, which
# deprecates (and warns on) its older name, all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


class _GlobalBatchNormFn(torch.autograd.Function):
    """BatchNorm over every rank's samples, with torch's own BatchNorm kernels doing the per-element work.

    Forward: each rank's count, per-channel mean and sum of squared deviations, one all-gather,
    Chan et al.'s parallel combination into the global mean and biased variance, then the input
    normalised by ``torch.batch_norm`` with those statistics (one fused pass). Backward, as
    ``SyncBatchNorm`` does on GPUs: torch's BatchNorm backward with the global statistics gives
    ``dy * weight * invstd`` and this rank's sums of ``dy`` and ``dy * xhat`` in one pass; one
    all-reduce of those two sums, and one more pass adds what flows through the mean and variance::

        dx = weight * invstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)   (sums over all ranks' N samples)

    ``weight`` and ``bias`` get this rank's sums, as autograd gives them (DDP averages them).
    The earlier autograd formulation of the same equations made ~10 full-size temporaries per
    layer and step; this one makes three, which was most of a 2-worker step's extra CPU time.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, c, *[1] * (x.dim() - 2))
        count = x.new_full((1,), x.numel() / c)
        mean = x.mean(dims)
        m2 = (x - mean.view(shape)).square().sum(dims)
        local = torch.cat([count, mean, m2])  # (1 + 2C,)
        ranks = local.new_empty(world_size() * local.numel())
        _all_gather_single(ranks, local)
        ranks = ranks.view(world_size(), -1)  # (W, 1 + 2C)
        counts, means, m2s = ranks[:, :1], ranks[:, 1:1 + c], ranks[:, 1 + c:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total  # (C,)
        global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)  # (C,)
        var = global_m2 / total  # biased: what the batch is normalised with
        y = torch.batch_norm(x, weight, bias, global_mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, global_mean, var, total)
        ctx.eps = eps
        unbiased = global_m2 / (total - 1).clamp(min=1)  # for the running variance
        ctx.mark_non_differentiable(global_mean, unbiased)
        return y, global_mean, unbiased

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor, _mean: Tensor, _var: Tensor):
        x, weight, mean, var, total = ctx.saved_tensors
        c, shape = x.shape[1], (1, x.shape[1], *[1] * (x.dim() - 2))
        w = weight if weight is not None else torch.ones_like(mean)
        # dy * w * invstd, sum(dy * xhat) and sum(dy) over this rank's samples (torch's eval-mode backward).
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), x, w, mean, var, None, None, False, ctx.eps, [True, True, True])
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)  # (2C,): the sums over every rank's samples
        invstd = torch.rsqrt(var + ctx.eps)
        k = w * invstd / total
        slope = k * invstd * sums[c:]  # dx -= slope * (x - mean) + k * sum(dy)
        offset = k * sums[:c] - slope * mean
        dx.sub_(torch.addcmul(offset.view(shape), x, slope.view(shape)))
        return (dx, sum_dy_xhat if ctx.needs_input_grad[1] else None,
                sum_dy if ctx.needs_input_grad[2] else None, None)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch: every rank's samples.

    torch's ``SyncBatchNorm`` does this on GPUs only; this one runs on any backend (gloo on
    CPU, NCCL on GPU) with one small all-gather per layer forward and one small all-reduce
    backward (:class:`_GlobalBatchNormFn`). Each rank sends its count, mean and sum of squared
    deviations per channel, and every rank combines them (Chan et al.'s parallel variance) into
    the global mean and biased variance it normalises with, so the output, the loss and every
    gradient equal those of one process on the whole batch. The running statistics are updated
    with the global ones and stay equal on every rank. Without a process group, in eval mode, or
    on one rank it is plain BatchNorm; its state dict is BatchNorm's, so checkpoints load either way.

    Shape: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), like ``BatchNorm1d/2d/3d``.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 under autocast; float64 stays
        with torch.autocast(x.device.type, enabled=False):
            y, global_mean, unbiased = _GlobalBatchNormFn.apply(x32, self.weight, self.bias, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(global_mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm1d/2d/3d`` in ``module`` replaced by a :class:`GlobalBatchNorm` holding the
    same parameters and buffers (the parameter objects themselves: an optimizer built before
    still updates them). Returns ``module``, or the replacement if ``module`` is a BatchNorm."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_batchnorm(child))
    return module


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any BatchNorm layer (whose statistics depend on the batch) is in ``module``."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
