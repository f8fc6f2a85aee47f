"""Barlow Twins: a ResNet encoder, a wide projector and the cross-correlation loss on two views."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.encoders import build_image_encoder, image_input, stack_two_views
from ssl_models.heads import ProjectionHead
from ssl_models.losses.barlow_twins import BarlowTwinsLoss
from ssl_models.methods.byol import BYOL_VIEWS
from ssl_models.spec import MethodSpec


class BarlowTwins(nn.Module):
    """Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via
    Redundancy Reduction"), on the same two-view batches as SimCLR.

    The projector is the paper's: ``projector_layers`` Linear layers, BatchNorm and ReLU
    between them, the last without bias (the loss standardises each dimension anyway). The
    paper finds a wide projector matters (3 x 8192); the defaults here are small for CPU runs.
    The loss runs in float32 even under bf16 autocast.

    Args:
        in_channels, encoder, encoder_widths, blocks_per_stage, small_stem: the image encoder,
            as for ``SimCLR``.
        projector_width: hidden width of the projector (paper: 8192).
        projector_dim: dimension of the cross-correlation matrix (paper: 8192).
        projector_layers: Linear layers in the projector (paper: 3).
        lambda_: weight of the off-diagonal term (paper: 5e-3).
        gather_distributed: compute the cross-correlation over the embeddings of all ranks.

    Shape:
        - batch["view1"], batch["view2"]: (B, C, H, W), two augmentations of the same images.
        - batch["image"] (for ``embed``): (B, C, H, W).
        - ``embed`` output: (B, feature_dim).
    """

    spec = MethodSpec(
        display_name="Barlow Twins", data_kind="image", batch_keys=("view1", "view2"), embeds=("image",),
        online_metric="val_knn_top1", online_mode="max",
        objective_keys=frozenset({"lambda_", "gather_distributed"}), derived=("in_channels",),
        views=BYOL_VIEWS, accumulation="gradcache",
        views_recipe="BYOL's, as Zbontar et al. 2021 use them")

    def __init__(self, in_channels: int = 1, encoder: str = "resnet_small",
                 encoder_widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1,
                 small_stem: bool = True, projector_width: int = 512, projector_dim: int = 512,
                 projector_layers: int = 3, lambda_: float = 5e-3, gather_distributed: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = build_image_encoder(encoder, in_channels, strict=False, widths=tuple(encoder_widths),
                                           blocks_per_stage=blocks_per_stage, small_stem=small_stem)
        self.feature_dim = self.encoder.feature_dim
        self.projector = ProjectionHead(self.feature_dim, projector_width, projector_dim,
                                        num_layers=projector_layers, last_bias=False)
        self.criterion = BarlowTwinsLoss(lambda_, gather_distributed)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(self.features(batch))

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The projections of both views, what the loss needs: {"z1", "z2"}, (B, projector_dim) each."""
        views = stack_two_views(batch, self.in_channels)  # (2B, C, H, W)
        z1, z2 = self.projector(self.encoder(views)).chunk(2)  # (B, projector_dim) each
        return {"z1": z1, "z2": z2}

    def objective(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The Barlow Twins loss over the rows of ``features`` (one micro-batch's or many's): its batch
        statistics are those of all of them."""
        z1, z2 = features["z1"], features["z2"]
        terms = self.criterion.terms(z1, z2)  # float32 inside, even under autocast
        return {
            "loss": self.criterion.combine(terms),
            **{f"{name}_loss": value.detach() for name, value in terms.items()},
            "pos_cosine": F.cosine_similarity(z1.float(), z2.float(), dim=1).mean().detach(),
        }

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Encoder features (not projector outputs) for evaluation. (B, C, H, W) -> (B, feature_dim)."""
        return self.encoder(image_input(batch, "image", self.in_channels))

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """Barlow Twins has no state outside the optimizer."""
