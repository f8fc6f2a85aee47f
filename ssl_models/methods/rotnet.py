"""RotNet: an image encoder learns by telling which of four rotations an image was turned by."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.encoders import build_image_encoder, image_input
from ssl_models.heads import ProjectionHead
from ssl_models.losses.precision import at_least_fp32
from ssl_models.spec import MethodSpec

NUM_ROTATIONS = 4  # 0, 90, 180 and 270 degrees (the paper's choice; its CIFAR-10 ablation tried 2 and 8)

# One mild view: the pretext task is the rotation, not invariance between views, so the view only
# needs the usual light augmentation (a horizontal flip leaves the rotation's label well defined):
# a random resized crop from half the area or more, a flip and a light colour jitter; no
# grayscale, blur or solarize.
ROTNET_VIEW = {"crop_scale_min": 0.5, "flip_prob": 0.5, "jitter_strength": 0.5, "jitter_prob": 0.8,
               "grayscale_prob": 0.0, "blur_prob": 0.0, "solarize_prob": 0.0}


def rotate_four_ways(images: Tensor) -> tuple[Tensor, Tensor]:
    """Every image at each of the four rotations, and which rotation each row is.

    Row ``k * B + i`` is image ``i`` turned ``k`` times by 90 degrees counter-clockwise
    (``torch.rot90(images[i], k, dims=(1, 2))``) and its label is ``k``.

    Shape:
        - images: (B, C, S, S), square (a quarter turn of a non-square image changes its shape).
        - output: (4B, C, S, S) and labels (4B,) int64 in ``0..3``.
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"RotNet rotates square images (B, C, S, S), got {tuple(images.shape)}; "
                         f"crop the views to a square size")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(len(images))
    return rotated, labels


class RotNet(nn.Module):
    """RotNet (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image
    Rotations").

    Each image of the batch is turned by 0, 90, 180 and 270 degrees (all four, as the paper
    trains: it found that feeding the four rotations of an image together beats sampling one);
    the encoder embeds the 4B rotated images in one pass (BatchNorm sees all four rotations) and
    a classifier head predicts which rotation each one is. The loss is the cross-entropy of that
    4-way classification, averaged over the 4B images. The encoder is the one the other image
    methods use (``build_image_encoder``); the paper's is a Network-In-Network.

    Args:
        in_channels, encoder, encoder_widths, blocks_per_stage, small_stem: the image encoder,
            as for ``SimCLR``.
        classifier_width: hidden width of the rotation classifier.
        classifier_layers: Linear layers of the classifier (``ProjectionHead``: Linear-BN-ReLU
            blocks, then a Linear to 4 logits); 1 is a linear classifier on the encoder features.

    Shape:
        - batch["view1"]: (B, C, S, S), one augmentation of each image, square.
        - batch["image"] (for ``embed``): (B, C, H, W).
        - ``forward`` output: ``"loss"`` (scalar) and ``"rotation_acc"`` (detached top-1 accuracy
          of the rotation classifier on the 4B images).
        - ``embed`` output: (B, feature_dim).
    """

    spec = MethodSpec(
        display_name="RotNet", data_kind="image", batch_keys=("view1",), embeds=("image",),
        online_metric="val_knn_top1", online_mode="max", derived=("in_channels",),
        views=(ROTNET_VIEW,),
        views_recipe="RotNet (Gidaris et al. 2018): one mild view (crop, flip, light jitter), rotated in forward",
        accumulation="mean")

    def __init__(self, in_channels: int = 1, encoder: str = "resnet_small",
                 encoder_widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1,
                 small_stem: bool = True, classifier_width: int = 256, classifier_layers: int = 2):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = build_image_encoder(encoder, in_channels, strict=False, widths=tuple(encoder_widths),
                                           blocks_per_stage=blocks_per_stage, small_stem=small_stem)
        self.feature_dim = self.encoder.feature_dim
        self.classifier = ProjectionHead(self.feature_dim, classifier_width, NUM_ROTATIONS,
                                         num_layers=classifier_layers)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        rotated, labels = rotate_four_ways(image_input(batch, "view1", self.in_channels))  # (4B, C, S, S), (4B,)
        logits = at_least_fp32(self.classifier(self.encoder(rotated)))  # (4B, 4); float32 under autocast
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "rotation_acc": accuracy.detach()}

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Encoder features (not classifier outputs) for evaluation. (B, C, H, W) -> (B, feature_dim)."""
        return self.encoder(image_input(batch, "image", self.in_channels))

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """RotNet has no state outside the optimizer."""
