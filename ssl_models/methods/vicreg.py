"""VICReg: a ResNet encoder, an expander and the variance-invariance-covariance loss on two views."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.encoders import build_image_encoder, image_input, stack_two_views
from ssl_models.heads import ProjectionHead
from ssl_models.losses.vicreg import VICRegLoss
from ssl_models.methods.byol import BYOL_VIEWS
from ssl_models.spec import MethodSpec


class VICReg(nn.Module):
    """VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning"), on the same two-view batches as SimCLR.

    The expander is the paper's: ``expander_layers`` Linear layers, BatchNorm and ReLU between
    them, the last without bias (paper: 3 x 8192; the defaults here are small for CPU runs).
    The loss runs in float32 even under bf16 autocast.

    Args:
        in_channels, encoder, encoder_widths, blocks_per_stage, small_stem: the image encoder,
            as for ``SimCLR``.
        expander_width: hidden width of the expander (paper: 8192).
        expander_dim: dimension the loss is computed in (paper: 8192).
        expander_layers: Linear layers in the expander (paper: 3).
        sim_coeff: weight of the invariance term (paper: 25).
        std_coeff: weight of the variance term (paper: 25).
        cov_coeff: weight of the covariance term (paper: 1).
        gather_distributed: compute the variance and covariance over the embeddings of all ranks.

    Shape:
        - batch["view1"], batch["view2"]: (B, C, H, W), two augmentations of the same images.
        - batch["image"] (for ``embed``): (B, C, H, W).
        - ``embed`` output: (B, feature_dim).
    """

    spec = MethodSpec(
        display_name="VICReg", data_kind="image", batch_keys=("view1", "view2"), embeds=("image",),
        online_metric="val_knn_top1", online_mode="max",
        objective_keys=frozenset({"sim_coeff", "std_coeff", "cov_coeff", "gather_distributed"}),
        derived=("in_channels",), views=BYOL_VIEWS, accumulation="gradcache",
        views_recipe="BYOL's, as Bardes et al. 2022 use them")

    def __init__(self, in_channels: int = 1, encoder: str = "resnet_small",
                 encoder_widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1,
                 small_stem: bool = True, expander_width: int = 512, expander_dim: int = 512,
                 expander_layers: int = 3, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                 cov_coeff: float = 1.0, gather_distributed: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = build_image_encoder(encoder, in_channels, strict=False, widths=tuple(encoder_widths),
                                           blocks_per_stage=blocks_per_stage, small_stem=small_stem)
        self.feature_dim = self.encoder.feature_dim
        self.expander = ProjectionHead(self.feature_dim, expander_width, expander_dim,
                                       num_layers=expander_layers, last_bias=False)
        self.criterion = VICRegLoss(sim_coeff, std_coeff, cov_coeff, gather_distributed)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(self.features(batch))

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The expansions of both views, what the loss needs: {"z1", "z2"}, (B, expander_dim) each."""
        views = stack_two_views(batch, self.in_channels)  # (2B, C, H, W)
        z1, z2 = self.expander(self.encoder(views)).chunk(2)  # (B, expander_dim) each
        return {"z1": z1, "z2": z2}

    def objective(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The VICReg loss over the rows of ``features`` (one micro-batch's or many's): its batch
        statistics are those of all of them."""
        z1, z2 = features["z1"], features["z2"]
        terms = self.criterion.terms(z1, z2)  # float32 inside, even under autocast
        return {
            "loss": self.criterion.combine(terms),
            **{f"{name}_loss": value.detach() for name, value in terms.items()},
            "pos_cosine": F.cosine_similarity(z1.float(), z2.float(), dim=1).mean().detach(),
        }

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Encoder features (not expander outputs) for evaluation. (B, C, H, W) -> (B, feature_dim)."""
        return self.encoder(image_input(batch, "image", self.in_channels))

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """VICReg has no state outside the optimizer."""
