"""VICReg: variance, invariance and covariance terms on two views' embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.losses.barlow_twins import batch_of_all_ranks, off_diagonal_square_sum


class VICRegLoss(nn.Module):
    """VICReg loss (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning", section 3), as in the paper's code:

    - invariance: mean squared error between the views, ``mean_{n,d} (z1 - z2)^2``;
    - variance: per view, ``mean_d relu(1 - sqrt(Var_n(z_d) + 1e-4))`` with the unbiased
      variance, averaged over the two views; a hinge that keeps every dimension's standard
      deviation near 1, so the embeddings cannot collapse to a point;
    - covariance: per view, ``sum_{i != j} Cov(z)_ij^2 / D`` with the unbiased covariance,
      summed over the two views; decorrelates the dimensions.

    ``loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance``.

    With ``gather_distributed`` and ``W > 1`` ranks of ``B`` pairs each, both views are gathered
    with ``distributed.gather_with_grad`` and every rank computes all three terms over the
    whole ``N = W * B`` batch, the same loss ``L`` on every rank. The gather's backward sums
    the ``W`` identical ``dL/d(gathered)`` and keeps this rank's rows (``W * dL/dz_r``); DDP's
    average over ranks then gives ``1/W * sum_r W * (dL/dtheta through rank r's samples) =
    dL/dtheta``, the single-process gradient (details in ``BarlowTwinsLoss``). Every rank must
    hold the same ``B``. Runs in float32 (or float64 for float64 input) even under autocast.

    Args:
        sim_coeff: weight of the invariance term (paper: 25).
        std_coeff: weight of the variance term (paper: 25).
        cov_coeff: weight of the covariance term (paper: 1).
        gather_distributed: compute over the embeddings of all ranks when a process group
            with more than one rank exists. Without one it changes nothing.

    Shape:
        - z1: (B, D), first view's embeddings.
        - z2: (B, D), second view's embeddings, row ``i`` paired with ``z1[i]``.
        - output: scalar.

    Example:
        >>> loss_fn = VICRegLoss()
        >>> loss = loss_fn(expander(encoder(view1)), expander(encoder(view2)))
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 gather_distributed: bool = False):
        super().__init__()
        if min(sim_coeff, std_coeff, cov_coeff) < 0:
            raise ValueError(f"coefficients must be non-negative, got sim_coeff={sim_coeff}, "
                             f"std_coeff={std_coeff}, cov_coeff={cov_coeff}")
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.combine(self.terms(z1, z2))

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """The loss from ``terms``' output, for callers that also log the terms."""
        return (self.sim_coeff * terms["invariance"] + self.std_coeff * terms["variance"]
                + self.cov_coeff * terms["covariance"])

    def terms(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        """The unweighted ``invariance``, ``variance`` and ``covariance`` terms (scalars)."""
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = batch_of_all_ranks(z1, z2, self.gather_distributed)  # (N, D)
            return {
                "invariance": F.mse_loss(z1, z2),
                "variance": (_std_hinge(z1) + _std_hinge(z2)) / 2,
                "covariance": _covariance_penalty(z1) + _covariance_penalty(z2),
            }


def _std_hinge(z: Tensor, eps: float = 1e-4) -> Tensor:
    """mean_d relu(1 - std_d) over the batch; eps keeps the sqrt's gradient finite at zero variance.

    (N, D) -> scalar.
    """
    std = torch.sqrt(z.var(dim=0) + eps)  # (D,), unbiased
    return F.relu(1 - std).mean()


def _covariance_penalty(z: Tensor) -> Tensor:
    """Squared off-diagonal covariances, summed and divided by D. (N, D) -> scalar."""
    n, d = z.shape
    centered = z - z.mean(dim=0)  # (N, D)
    cov = centered.T @ centered / (n - 1)  # (D, D)
    return off_diagonal_square_sum(cov) / d
