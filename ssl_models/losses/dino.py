"""DINO's self-distillation loss: cross-entropy from a centred, sharpened teacher to the student."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models import distributed


class DINOLoss(nn.Module):
    """The loss of DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers", algorithm 1).

    For every pair (teacher view ``t``, student view ``s``) with ``s != t``: the cross-entropy
    ``-sum_k P_t[k] log P_s[k]`` between the teacher's centred, sharpened distribution
    ``P_t = softmax((g_t - center) / teacher_temp)`` (no gradient) and the student's
    ``P_s = softmax(g_s / student_temp)``, averaged over the batch; the loss is the mean of those
    per-pair means (the official code's ``total_loss / n_loss_terms``). The teacher sees the
    ``G`` global views only, the student every view, the globals first.

    The centre is an EMA of the teacher's mean output, ``center <- m * center + (1 - m) * mean``,
    the mean taken over every teacher row of the **global** batch. Unlike the paper's code, which
    updates it inside the loss on each forward, ``forward`` only adds the teacher's rows to a
    running sum and count (in training mode) and :meth:`update_center` (the method's
    ``on_train_step_end``, once per optimizer step) all-reduces them over ranks and moves the
    centre. So every forward of one optimizer step uses the same centre, and W ranks of B/W
    samples, k accumulated micro-batches of B/k or one process of B give the same loss and the
    same centre. With one rank and one micro-batch it is the paper's update.

    The running sum and count are plain attributes, not buffers: DDP broadcasts buffers from
    rank 0 before each forward, which would overwrite the other ranks' partial sums. ``center``
    is a buffer (equal on every rank), so checkpoints carry it.

    Args:
        out_dim: K, the number of prototypes (the head's output dimension).
        teacher_temp: the teacher's temperature (paper: 0.04 after a warmup from 0.04; sharpening).
        student_temp: the student's temperature (paper: 0.1).
        center_momentum: m of the centre's EMA (paper: 0.9).
        global_views: G, the teacher's views, which are also the student's first G.

    Shape:
        - student: (V * B, K), view-major: rows ``[v*B:(v+1)*B]`` are view ``v``, globals first.
        - teacher: (G * B, K), view-major, the same images in the same order.
        - output: scalar.
    """

    def __init__(self, out_dim: int, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9, global_views: int = 2):
        super().__init__()
        if teacher_temp <= 0 or student_temp <= 0:
            raise ValueError(f"temperatures must be positive, got teacher_temp={teacher_temp}, "
                             f"student_temp={student_temp}")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if global_views < 1:
            raise ValueError(f"need at least one global view, got {global_views}")
        self.teacher_temp, self.student_temp = teacher_temp, student_temp
        self.center_momentum, self.global_views = center_momentum, global_views
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._sum: Tensor | None = None  # (1, K): the teacher rows since the last update_center
        self._count: Tensor | None = None  # (): how many

    def teacher_probs(self, teacher: Tensor) -> Tensor:
        """The teacher's centred, sharpened distribution. (N, K) -> (N, K), without gradient."""
        return F.softmax((_float(teacher.detach()) - self.center) / self.teacher_temp, dim=-1)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.dim() != 2 or teacher.dim() != 2 or student.shape[1] != teacher.shape[1]:
            raise ValueError(f"student and teacher outputs must be (N, K) with one K, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if teacher.shape[0] % self.global_views:
            raise ValueError(f"the teacher's {teacher.shape[0]} rows are not {self.global_views} views of one batch")
        batch = teacher.shape[0] // self.global_views
        views = student.shape[0] // batch if batch else 0
        if not batch or student.shape[0] != views * batch or views < self.global_views:
            raise ValueError(f"the student's {student.shape[0]} rows are not V >= {self.global_views} views of "
                             f"the teacher's batch of {batch}")
        with torch.autocast(student.device.type, enabled=False):
            targets = self.teacher_probs(teacher).chunk(self.global_views)  # G x (B, K)
            log_probs = F.log_softmax(_float(student) / self.student_temp, dim=-1).chunk(views)  # V x (B, K)
            terms = [-(q * log_probs[s]).sum(dim=-1).mean()
                     for t, q in enumerate(targets) for s in range(views) if s != t]
        if self.training:
            self.accumulate(teacher)
        return torch.stack(terms).mean()

    @torch.no_grad()
    def accumulate(self, teacher: Tensor) -> None:
        """Add the teacher's rows (N, K) to the sum the next :meth:`update_center` averages."""
        total = _float(teacher.detach()).sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher.shape[0]), dtype=total.dtype, device=total.device)
        if self._sum is None:
            self._sum, self._count = total, count
        else:
            self._sum, self._count = self._sum + total, self._count + count

    @torch.no_grad()
    def update_center(self) -> None:
        """``center <- m * center + (1 - m) * mean`` of the teacher rows accumulated since the last
        call, on all ranks together (every rank must call it); then the sums start again."""
        if self._sum is None:  # this rank saw no forward: it still joins the all-reduce
            self._sum = torch.zeros_like(self.center)
            self._count = self.center.new_zeros(())
        stats = distributed.all_reduce_sum(torch.cat([self._sum.flatten(), self._count.reshape(1)]))
        self._sum = self._count = None
        if stats[-1] > 0:
            mean = (stats[:-1] / stats[-1]).to(self.center.dtype).reshape(self.center.shape)
            self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


def _float(x: Tensor) -> Tensor:
    """float32, or float64 kept: a bf16 logit divided by 0.04 would lose its digits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
