"""SigLIP's pairwise sigmoid image-text loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models import distributed


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training").

    Every image-text pair of the batch is its own binary problem: ``z_ij = +1`` for image ``i``
    with its caption ``i`` and ``-1`` for every other text, logits
    ``logit_scale * <image_i, text_j> + logit_bias``, and the loss is
    ``-sum_ij log sigmoid(z_ij * logit_ij) / B``, summed over all ``B x B`` pairs and divided by
    the number of images. No softmax couples the pairs, so nothing is normalised over the batch.
    Numerically the same as ``open_clip.loss.SigLipLoss``.

    With ``gather_distributed`` and ``W > 1`` ranks of ``B`` pairs each, the local-loss recipe:
    this rank's ``B`` images are scored against the ``W*B`` texts of all ranks, gathered with
    ``distributed.gather_with_grad``; the positive of local image ``i`` sits at column
    ``rank*B + i``. The ``W`` ranks' ``B x W*B`` blocks tile the whole ``W*B x W*B`` matrix once,
    so images need no gather. Why two ranks on a split batch give exactly the single-process
    loss and gradients (the arithmetic of ``CLIPLoss``):

    - each rank divides its block's sum by its own ``B``, so ``mean_r L_r = sum_r block_r / (W*B)
      = L``, the loss of one process on the whole ``W*B`` batch (which divides by ``W*B``);
    - the gather's backward sums over ranks, so rank ``r``'s text features get back
      ``sum_s dL_s/dt_r`` and its images ``dL_r/dx_r`` (they enter no other rank's loss); DDP's
      average of the parameter gradients is then ``1/W sum_s dL_s/dtheta = dL/dtheta``. The
      scale and bias are replicated and used by every rank, so their averaged gradients are
      ``mean_r dL_r/d(scale, bias) = dL/d(scale, bias)``. No extra ``* W`` or ``/ W``.

    open_clip passes the texts round the ranks instead (``dist_impl="bidir"`` by default):
    each rank adds its images' loss against each other rank's texts, with negative labels only.
    That is the same sum; the all-gather here costs ``W*B x D`` memory per rank for text
    features, which at this platform's batch sizes is nothing beside the logits.

    Every rank must hold the same ``B``. Without a process group (or with one rank) the flag
    changes nothing.

    Args:
        gather_distributed: score local images against the texts of all ranks when a process
            group with more than one rank exists.

    Shape:
        - image_features: (B, D), L2-normalised image embeddings.
        - text_features: (B, D), L2-normalised text embeddings, row ``i`` paired with image ``i``.
        - logit_scale: scalar (or one-element) tensor, the already exponentiated scale (the
          paper's ``t``, initialised at 10).
        - logit_bias: scalar (or one-element) tensor, the paper's ``b`` (initialised at -10).
        - output: scalar.

    Example:
        >>> loss_fn = SigLIPLoss()
        >>> loss = loss_fn(F.normalize(img_emb, dim=1), F.normalize(txt_emb, dim=1), t.exp(), b)
    """

    def __init__(self, gather_distributed: bool = True):
        super().__init__()
        self.gather_distributed = gather_distributed

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor) -> Tensor:
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError("image_features and text_features must both be (B, D), got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        logit_scale, logit_bias = (_scalar(x, name, image_features.device)
                                   for x, name in ((logit_scale, "logit_scale"), (logit_bias, "logit_bias")))
        batch = image_features.shape[0]

        if self.gather_distributed and distributed.world_size() > 1:
            r = distributed.rank()
            all_texts = distributed.gather_with_grad(text_features)  # (W*B, D)
        else:
            r, all_texts = 0, text_features

        # Same expression order as open_clip's SigLipLoss.
        logits = logit_scale * image_features @ all_texts.T + logit_bias  # (B, W*B)
        labels = torch.full_like(logits, -1.0)  # (B, W*B): every pair a negative...
        labels.diagonal(offset=r * batch).fill_(1.0)  # ...but image i with text r*B + i
        return -F.logsigmoid(labels * logits).sum() / batch


def _scalar(x: Tensor | float, name: str, device: torch.device) -> Tensor:
    """``x`` as a 0-dim tensor (open_clip's nonscalar_logit_scale gives shape (1,))."""
    x = torch.as_tensor(x, device=device)
    if x.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
    return x.reshape(())
