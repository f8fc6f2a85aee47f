"""Barlow Twins: make the cross-correlation of two views' embeddings the identity."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_models import distributed


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins redundancy-reduction loss (Zbontar et al. 2021, "Barlow Twins:
    Self-Supervised Learning via Redundancy Reduction", eq. 1).

    Each embedding dimension is standardised over the batch (mean 0, biased variance 1, eps
    1e-5, as the paper's ``BatchNorm1d(affine=False)``), then ``C = z1n^T z2n / N`` is the
    (D, D) cross-correlation of the two views and

        loss = sum_i (1 - C_ii)^2 + lambda_ * sum_{i != j} C_ij^2

    The invariance term pulls each dimension to agree across views; the redundancy term
    decorrelates the dimensions, which is what prevents collapse.

    With ``gather_distributed`` and ``W > 1`` ranks of ``B`` pairs each, both views are gathered
    with ``distributed.gather_with_grad`` and every rank computes the loss ``L`` of the whole
    ``N = W * B`` batch (the statistics and ``C`` are batch-global, so the loss does not split
    into per-rank terms as NT-Xent's does). Then

    - every rank reports ``L``, so the mean over ranks is the single-process loss;
    - every rank holds the same ``dL/d(gathered)``; the gather's backward sums it over ranks and
      keeps rank ``r``'s rows: ``W * dL/dz_r``. Rank ``r``'s parameter gradient is therefore
      ``W * (dL/dtheta through rank r's samples)``, and DDP's average over ranks is
      ``1/W * sum_r W * (...) = dL/dtheta``, the single-process gradient, exactly.

    (BatchNorm layers in the projector still see only their rank's samples; convert them to
    ``SyncBatchNorm`` for the model, too, to match one process.) Every rank must hold the same
    ``B``. Runs in float32 (or float64 for float64 input) even under autocast.

    Args:
        lambda_: weight of the off-diagonal (redundancy) term; the paper uses 5e-3 (0.0051).
        gather_distributed: compute over the embeddings of all ranks when a process group
            with more than one rank exists. Without one it changes nothing.

    Shape:
        - z1: (B, D), first view's embeddings.
        - z2: (B, D), second view's embeddings, row ``i`` paired with ``z1[i]``.
        - output: scalar.

    Example:
        >>> loss_fn = BarlowTwinsLoss(lambda_=5e-3)
        >>> loss = loss_fn(projector(encoder(view1)), projector(encoder(view2)))
    """

    def __init__(self, lambda_: float = 5e-3, gather_distributed: bool = False):
        super().__init__()
        if lambda_ < 0:
            raise ValueError(f"lambda_ must be non-negative, got {lambda_}")
        self.lambda_ = lambda_
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.combine(self.terms(z1, z2))

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """The loss from ``terms``' output, for callers that also log the terms."""
        return terms["invariance"] + self.lambda_ * terms["redundancy"]

    def terms(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        """The unweighted terms: ``invariance`` = sum_i (1 - C_ii)^2, ``redundancy`` = sum_{i != j} C_ij^2."""
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = batch_of_all_ranks(z1, z2, self.gather_distributed)  # (N, D)
            n = z1.shape[0]
            c = standardize(z1).T @ standardize(z2) / n  # (D, D)
            on_diag = torch.diagonal(c)  # (D,)
            return {
                "invariance": (1 - on_diag).pow(2).sum(),
                "redundancy": off_diagonal_square_sum(c),
            }


def standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Each column to mean 0 and biased variance 1 over the batch, as ``BatchNorm1d(affine=False)``.

    (N, D) -> (N, D).
    """
    centered = z - z.mean(dim=0)
    return centered / torch.sqrt(centered.pow(2).mean(dim=0) + eps)


def off_diagonal_square_sum(m: Tensor) -> Tensor:
    """sum_{i != j} m_ij^2 of a square matrix; masked, not total minus diagonal, which would
    cancel digits when the diagonal dominates. (D, D) -> scalar."""
    is_diag = torch.eye(m.shape[0], dtype=torch.bool, device=m.device)  # (D, D)
    return m.masked_fill(is_diag, 0).pow(2).sum()


def batch_of_all_ranks(z1: Tensor, z2: Tensor, gather_distributed: bool) -> tuple[Tensor, Tensor]:
    """Check two views' (B, D) embeddings, raise them to float32 (float64 stays), and with
    ``gather_distributed`` concatenate them over ranks with gradient: (B, D) -> (N, D).

    For losses built on batch statistics (Barlow Twins, VICReg): every rank then computes the
    same whole-batch loss (see ``BarlowTwinsLoss`` for why DDP's gradient is then exact).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    # bf16/fp16 would lose digits in the batch means, variances and D x D sums.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z1, z2 = z1.to(dtype), z2.to(dtype)
    if gather_distributed and distributed.world_size() > 1:
        z1, z2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)  # (W*B, D)
    if z1.shape[0] < 2:
        raise ValueError(f"batch statistics need at least 2 samples, got {z1.shape[0]}; raise the batch size")
    return z1, z2
