"""SimCLR: a ResNet encoder, an MLP projector and the NT-Xent loss on two views."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.encoders import build_image_encoder, image_input, stack_two_views
from ssl_models.heads import ProjectionHead
from ssl_models.losses.ntxent import NTXentLoss
from ssl_models.losses.precision import at_least_fp32
from ssl_models.spec import MethodSpec

# SimCLR's augmentation (appendix A), the same for both views: random resized crop from 8% of the
# area, flip, colour jitter of strength 1 with probability 0.8, grayscale 0.2, blur 0.5.
SIMCLR_VIEW = {"crop_scale_min": 0.08, "flip_prob": 0.5, "jitter_strength": 1.0, "jitter_prob": 0.8,
               "grayscale_prob": 0.2, "blur_prob": 0.5, "solarize_prob": 0.0}


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations").

    Args:
        in_channels: image channels.
        encoder: image encoder name: ``"resnet_small"``, ``"resnet18"`` or ``"resnet50"``.
        encoder_widths: channels of the ``resnet_small`` stages; it outputs ``encoder_widths[-1]``.
        blocks_per_stage: ``BasicBlock``s per ``resnet_small`` stage.
        small_stem: 3x3 stride-1 stem without max-pool for the torchvision ResNets (~32-px
            images); ``resnet_small`` always has it.
        projector_width: hidden width of the projector.
        projector_dim: dimension the loss is computed in.
        temperature: NT-Xent temperature.
        gather_distributed: score anchors against the negatives of all ranks.

    Shape:
        - batch["view1"], batch["view2"]: (B, C, H, W), two augmentations of the same images.
        - batch["image"] (for ``embed``): (B, C, H, W).
        - ``embed`` output: (B, feature_dim).
    """

    spec = MethodSpec(
        display_name="SimCLR", data_kind="image", batch_keys=("view1", "view2"), embeds=("image",),
        online_metric="val_knn_top1", online_mode="max",
        objective_keys=frozenset({"temperature", "gather_distributed"}), derived=("in_channels",),
        views=(SIMCLR_VIEW, SIMCLR_VIEW), views_recipe="SimCLR (Chen et al. 2020, appendix A)",
        accumulation="gradcache")

    def __init__(self, in_channels: int = 1, encoder: str = "resnet_small",
                 encoder_widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1,
                 small_stem: bool = True, projector_width: int = 512, projector_dim: int = 128,
                 temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = build_image_encoder(encoder, in_channels, strict=False, widths=tuple(encoder_widths),
                                           blocks_per_stage=blocks_per_stage, small_stem=small_stem)
        self.feature_dim = self.encoder.feature_dim
        self.projector = ProjectionHead(self.feature_dim, projector_width, projector_dim)
        self.criterion = NTXentLoss(temperature, gather_distributed)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(self.features(batch))

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The projections of both views, what the loss needs: {"z1", "z2"}, (B, projector_dim) each."""
        views = stack_two_views(batch, self.in_channels)  # (2B, C, H, W)
        z1, z2 = self.projector(self.encoder(views)).chunk(2)  # (B, projector_dim) each
        return {"z1": z1, "z2": z2}

    def objective(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """NT-Xent over the rows of ``features`` (one micro-batch's or many's) -> {"loss", "pos_cosine"}."""
        z1, z2 = features["z1"], features["z2"]
        # float32 with autocast off: under bf16 autocast the similarity matmul would run in bf16.
        with torch.autocast(z1.device.type, enabled=False):
            loss = self.criterion(at_least_fp32(z1), at_least_fp32(z2))
        return {
            "loss": loss,
            "pos_cosine": F.cosine_similarity(z1.float(), z2.float(), dim=1).mean().detach(),
        }

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Encoder features (not projector outputs) for evaluation. (B, C, H, W) -> (B, feature_dim)."""
        return self.encoder(image_input(batch, "image", self.in_channels))

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """SimCLR has no state outside the optimizer."""
