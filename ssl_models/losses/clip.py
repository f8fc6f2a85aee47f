"""CLIP's symmetric image-text InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models import distributed


class CLIPLoss(nn.Module):
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, "Learning Transferable Visual Models
    From Natural Language Supervision").

    Image ``i`` and text ``i`` are a positive pair; every other text (image) in the batch is a
    negative. The loss is the mean of the image->text and text->image cross-entropies over
    ``logit_scale * cos(image, text)``. Numerically the same as ``open_clip.loss.ClipLoss``.

    With ``gather_distributed`` and ``W > 1`` ranks of ``B`` pairs each, the local-loss recipe
    (open_clip's ``local_loss=True, gather_with_grad=True``): this rank's ``B`` images are
    scored against the ``W*B`` texts of all ranks and its ``B`` texts against all images, both
    gathered with ``distributed.gather_with_grad``; the positive of local pair ``i`` sits at
    column ``rank*B + i``. Why two ranks on a split batch give exactly the single-process loss
    and gradients:

    - each rank averages over its own ``B`` anchors per direction, so
      ``mean_r L_r = L``, the loss of one process on the whole ``W*B`` batch;
    - the gather's backward sums over ranks, so rank ``r``'s backward brings back
      ``sum_s dL_s/dx_r`` to its own features, and DDP's average over ranks of the parameter
      gradients is ``1/W sum_s dL_s/dtheta = dL/dtheta``. ``logit_scale`` is replicated and
      used by every rank, so its averaged gradient is ``mean_r dL_r/ds = dL/ds`` as well.
      No extra ``* W`` or ``/ W`` is needed.

    How others got it wrong: a gather whose backward keeps only this rank's own slice of its
    own gradient (lightly-ai/lightly#1528) drops the ``s != r`` terms, so two ranks no longer
    train like one. open_clip#616 is the confusion over whether a gather with gradient "scales
    the gradient by W": it does, relative to a plain gather, and that is what makes it right.
    ``tests/test_clip.py`` measures open_clip's four settings on gloo: with
    ``gather_with_grad`` (``torch.distributed.nn.all_gather``, whose backward also sums over
    ranks) both the local and the global loss give the exact gradient; without it the global
    loss gives the towers ``1/W`` of their gradient (the logit scale all of it), and the local
    loss detaches every candidate, so a feature only gets the gradient of its anchor role.

    Every rank must hold the same ``B``. Without a process group (or with one rank) the flag
    changes nothing.

    Args:
        gather_distributed: score local anchors against the candidates of all ranks when a
            process group with more than one rank exists.

    Shape:
        - image_features: (B, D), L2-normalised image embeddings.
        - text_features: (B, D), L2-normalised text embeddings, row ``i`` paired with image ``i``.
        - logit_scale: scalar (or one-element) tensor, the already exponentiated scale
          (``1 / temperature``).
        - output: scalar.

    Example:
        >>> loss_fn = CLIPLoss()
        >>> loss = loss_fn(F.normalize(img_emb, dim=1), F.normalize(txt_emb, dim=1), scale.exp())
    """

    def __init__(self, gather_distributed: bool = False):
        super().__init__()
        self.gather_distributed = gather_distributed

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError("image_features and text_features must both be (B, D), got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        logit_scale = torch.as_tensor(logit_scale, device=image_features.device)
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        logit_scale = logit_scale.reshape(())  # open_clip's nonscalar_logit_scale gives shape (1,)
        batch = image_features.shape[0]

        if self.gather_distributed and distributed.world_size() > 1:
            r = distributed.rank()
            all_images = distributed.gather_with_grad(image_features)  # (W*B, D)
            all_texts = distributed.gather_with_grad(text_features)  # (W*B, D)
        else:
            r = 0  # without the gather the candidates are local, so are the labels (lightly#1177)
            all_images, all_texts = image_features, text_features

        # Same expression order as open_clip's ClipLoss, so the two agree to the last bit or so.
        logits_per_image = logit_scale * image_features @ all_texts.T  # (B, W*B)
        logits_per_text = logit_scale * text_features @ all_images.T  # (B, W*B)
        labels = torch.arange(batch, device=image_features.device) + r * batch  # (B,)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
