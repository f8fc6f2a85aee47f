"""SimCLR: a ResNet encoder, an MLP projector and the NT-Xent loss on two views."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.encoders import ResNetSmall
from ssl_models.heads import ProjectionHead
from ssl_models.losses import NTXentLoss


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations").

    Args:
        in_channels: image channels.
        encoder_widths: channels of the ResNet stages; the encoder outputs ``encoder_widths[-1]``.
        blocks_per_stage: ``BasicBlock``s per ResNet stage.
        projector_width: hidden width of the projector.
        projector_dim: dimension the loss is computed in.
        temperature: NT-Xent temperature.
        gather_distributed: score anchors against the negatives of all ranks.

    Shape:
        - batch["view1"], batch["view2"]: (B, C, H, W), two augmentations of the same images.
        - batch["image"] (for ``embed``): (B, C, H, W).
        - ``embed`` output: (B, feature_dim).
    """

    def __init__(self, in_channels: int = 1, encoder_widths: Sequence[int] = (32, 64, 128),
                 blocks_per_stage: int = 1, projector_width: int = 512, projector_dim: int = 128,
                 temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        self.encoder = ResNetSmall(in_channels, tuple(encoder_widths), blocks_per_stage)
        self.feature_dim = self.encoder.feature_dim
        self.projector = ProjectionHead(self.feature_dim, projector_width, projector_dim)
        self.criterion = NTXentLoss(temperature, gather_distributed)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        view1, view2 = batch["view1"], batch["view2"]  # (B, C, H, W)
        b = view1.shape[0]
        # One encoder call on both views, so BatchNorm normalises them with the same statistics.
        z = self.projector(self.encoder(torch.cat([view1, view2])))  # (2B, projector_dim)
        z1, z2 = z[:b], z[b:]  # (B, projector_dim)
        return {
            "loss": self.criterion(z1, z2),
            "pos_cosine": F.cosine_similarity(z1, z2, dim=1).mean().detach(),
        }

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Encoder features (not projector outputs) for evaluation. (B, C, H, W) -> (B, feature_dim)."""
        return self.encoder(batch["image"])

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """SimCLR has no state outside the optimizer."""
