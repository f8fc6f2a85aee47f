"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models import distributed


class NTXentLoss(nn.Module):
    """NT-Xent contrastive loss (Chen et al. 2020, "A Simple Framework for Contrastive
    Learning of Visual Representations", SimCLR).

    The ``2N`` embeddings of ``N`` pairs are L2-normalised. Each one is an anchor: its positive
    is the other view of the same pair and its negatives are the other ``2N - 2`` embeddings;
    the loss is the cross-entropy of the positive over ``cos(anchor, candidate) / temperature``
    with self-similarity excluded, averaged over the ``2N`` anchors.

    With ``gather_distributed`` and ``W > 1`` ranks of ``B`` pairs each (``N = W * B``), the
    local-loss recipe: each rank scores its own ``2B`` anchors against the ``2N`` candidates of
    all ranks, gathered with ``distributed.gather_with_grad``, and averages over its anchors:
    ``L_r = 1/(2B) sum_{a in rank r} l_a``. Then

    - ``mean_r L_r = 1/(2WB) sum_a l_a = L``, the single-process loss on the whole batch;
    - the gather's backward sums over ranks, so rank ``r``'s backward yields
      ``sum_s dL_s/dtheta`` through its own inputs; DDP's average over ranks of those is
      ``1/W sum_s dL_s/dtheta = dL/dtheta`` exactly. No extra scaling is needed.

    Every rank must hold the same ``B``.

    Args:
        temperature: softmax temperature; lower sharpens the distribution over candidates.
        gather_distributed: score local anchors against the candidates of all ranks when a
            process group with more than one rank exists. Without one it changes nothing.

    Shape:
        - z1: (B, D), first view's embeddings (need not be normalised).
        - z2: (B, D), second view's embeddings, row ``i`` paired with ``z1[i]``.
        - output: scalar.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.1)
        >>> loss = loss_fn(projector(encoder(view1)), projector(encoder(view2)))
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
        batch = z1.shape[0]
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)  # (B, D)

        if self.gather_distributed and distributed.world_size() > 1:
            r, world = distributed.rank(), distributed.world_size()
            c1, c2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)  # (W*B, D)
        else:
            r, world = 0, 1
            c1, c2 = z1, z2
        n = world * batch

        anchors = torch.cat([z1, z2])  # (2B, D)
        candidates = torch.cat([c1, c2])  # (2N, D): all first views, then all second views
        logits = anchors @ candidates.T / self.temperature  # (2B, 2N)

        # Local anchor i sits at row r*B + i of the gathered first views, and at N + r*B + i
        # among the second views; its positive is the same row in the other view's block.
        local = torch.arange(batch, device=z1.device) + r * batch  # (B,)
        self_cols = torch.cat([local, local + n])  # (2B,)
        pos_cols = torch.cat([local + n, local])  # (2B,)

        # masked_fill with the dtype's min, not -inf: stays finite and exact-zero after exp in
        # fp16/bf16 as well as fp32/fp64.
        is_self = F.one_hot(self_cols, 2 * n).bool()  # (2B, 2N)
        logits = logits.masked_fill(is_self, torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits, pos_cols)
