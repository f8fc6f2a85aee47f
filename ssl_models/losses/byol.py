"""BYOL's regression loss: normalised mean squared error between prediction and target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BYOLLoss(nn.Module):
    """Normalised MSE of BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach
    to Self-Supervised Learning", eq. 2): ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``, averaged
    over the batch.

    The loss is per pair, so it needs no gathering: each rank's mean over its local pairs,
    averaged over ranks by DDP, is already the whole-batch gradient. The caller computes the
    target ``z`` without gradient (BYOL's stop-gradient) and symmetrises by swapping the views.
    Runs in float32 (or float64 for float64 input) even under autocast.

    Shape:
        - p: (B, D), online predictions.
        - z: (B, D), target projections, row ``i`` paired with ``p[i]``.
        - output: scalar in [0, 4].

    Example:
        >>> loss_fn = BYOLLoss()
        >>> loss = loss_fn(p1, z2) + loss_fn(p2, z1)
    """

    def forward(self, p: Tensor, z: Tensor) -> Tensor:
        if p.shape != z.shape or p.dim() != 2:
            raise ValueError(f"p and z must both be (B, D), got {tuple(p.shape)} and {tuple(z.shape)}")
        with torch.autocast(p.device.type, enabled=False):
            # float32, or float64 kept: bf16/fp16 would lose digits in the norms and the mean.
            p, z = p.to(torch.promote_types(p.dtype, torch.float32)), z.to(torch.promote_types(z.dtype, torch.float32))
            return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()
