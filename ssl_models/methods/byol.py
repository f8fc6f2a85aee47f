"""BYOL: an online network regresses an EMA target network's projection of the other view."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.encoders import build_image_encoder, image_input, stack_two_views
from ssl_models.heads import ProjectionHead
from ssl_models.losses.byol import BYOLLoss
from ssl_models.spec import MethodSpec

# BYOL's asymmetric views (table 6): blur 1.0 / 0.1, solarize 0 / 0.2. Its jitter (brightness 0.4,
# contrast 0.4, saturation 0.2, hue 0.1) is SimCLR's at strength 0.5 with half the saturation weight.
_BYOL_VIEW = {"crop_scale_min": 0.08, "flip_prob": 0.5, "jitter_strength": 0.5, "jitter_saturation": 0.4,
              "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 1.0, "solarize_prob": 0.0}
BYOL_VIEWS = (_BYOL_VIEW, {**_BYOL_VIEW, "blur_prob": 0.1, "solarize_prob": 0.2})


def cosine_momentum(step: int, max_steps: int, base: float = 0.996) -> float:
    """BYOL's target momentum: ``1 - (1 - base) * (cos(pi * step / (max_steps - 1)) + 1) / 2``.

    ``step`` is the 0-based index of the optimizer step just taken (``0 .. max_steps - 1``,
    what the training loop passes to ``on_train_step_end``), so the first EMA update uses
    exactly ``base`` and the last exactly 1.0. The paper writes ``k / K`` with ``k`` running
    to ``K``; with a 0-based index that never reaches ``K`` the denominator ``K - 1`` is what
    puts the paper's endpoints on the first and last steps taken.
    """
    if max_steps < 1 or not 0 <= step < max_steps:
        raise ValueError(f"need 0 <= step < max_steps, got step={step}, max_steps={max_steps}")
    if max_steps == 1:
        return 1.0  # the only step is also the last
    return 1 - (1 - base) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2


@torch.no_grad()
def ema_update(pairs: Sequence[tuple[nn.Module, nn.Module]], tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online`` for every parameter of each (online, target)
    pair of modules of one architecture (BYOL's target, DINO's teacher); buffers are left alone."""
    for online, target in pairs:
        for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
            p_target.mul_(tau).add_(p_online.detach(), alpha=1 - tau)


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning").

    The online network (encoder, projector, predictor) predicts the target network's
    projection of the other view; the target (encoder, projector) gets no gradient and
    follows the online weights as an exponential moving average,
    ``target <- tau * target + (1 - tau) * online``, in ``on_train_step_end`` with ``tau``
    from ``cosine_momentum`` (``momentum_base`` at the first step, 1.0 at the last).
    The loss is symmetric: ``BYOLLoss(p1, z2') + BYOLLoss(p2, z1')`` (paper, eq. 2-3).

    The target is a registered submodule with ``requires_grad=False``: its weights are in
    ``state_dict`` (so a checkpoint resumes it) and in ``parameters()``, but the optimizer
    builder skips parameters that need no gradient, DDP does not reduce them, and gradient
    clipping sees ``grad is None``. Use ``trainable_parameters()`` to build an optimizer by
    hand. DDP keeps the targets equal on all ranks because the online weights are.

    Args:
        in_channels, encoder, encoder_widths, blocks_per_stage, small_stem: the image encoder,
            as for ``SimCLR``.
        projector_width: hidden width of the projector (paper: 4096).
        projector_dim: dimension of the projection and prediction (paper: 256).
        predictor_width: hidden width of the predictor (paper: 4096).
        momentum_base: the EMA momentum at the first step (paper: 0.996).

    Shape:
        - batch["view1"], batch["view2"]: (B, C, H, W), two augmentations of the same images.
        - batch["image"] (for ``embed``): (B, C, H, W).
        - ``embed`` output: (B, feature_dim), from the online encoder.
    """

    spec = MethodSpec(
        display_name="BYOL", data_kind="image", batch_keys=("view1", "view2"), embeds=("image",),
        online_metric="val_knn_top1", online_mode="max",
        objective_keys=frozenset({"momentum_base"}), derived=("in_channels",),
        views=BYOL_VIEWS, views_recipe="BYOL (Grill et al. 2020, table 6): asymmetric views",
        accumulation="mean")

    def __init__(self, in_channels: int = 1, encoder: str = "resnet_small",
                 encoder_widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1,
                 small_stem: bool = True, projector_width: int = 512, projector_dim: int = 128,
                 predictor_width: int = 512, momentum_base: float = 0.996):
        super().__init__()
        if not 0 <= momentum_base <= 1:
            raise ValueError(f"momentum_base must be in [0, 1], got {momentum_base}")
        self.in_channels = in_channels
        self.momentum_base = momentum_base
        self.encoder = build_image_encoder(encoder, in_channels, strict=False, widths=tuple(encoder_widths),
                                           blocks_per_stage=blocks_per_stage, small_stem=small_stem)
        self.feature_dim = self.encoder.feature_dim
        self.projector = ProjectionHead(self.feature_dim, projector_width, projector_dim)
        self.predictor = ProjectionHead(projector_dim, predictor_width, projector_dim)
        # The target starts as a copy of the online network (paper, section 3.1).
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.criterion = BYOLLoss()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = stack_two_views(batch, self.in_channels)  # (2B, C, H, W)
        p1, p2 = self.predictor(self.projector(self.encoder(views))).chunk(2)  # (B, projector_dim) each
        with torch.no_grad():  # stop-gradient: the target only moves by the EMA
            z1, z2 = self.target_projector(self.target_encoder(views)).chunk(2)  # (B, projector_dim) each
        # Each view's prediction regresses the target's projection of the other view.
        loss = self.criterion(p1, z2) + self.criterion(p2, z1)
        cosine = F.cosine_similarity(torch.cat([p1, p2]).float(), torch.cat([z2, z1]).float(), dim=1)
        return {"loss": loss, "pos_cosine": cosine.mean().detach()}

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Online encoder features (not projector outputs). (B, C, H, W) -> (B, feature_dim)."""
        return self.encoder(image_input(batch, "image", self.in_channels))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The online network's parameters: everything but the target."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """EMA update of the target, called after ``optimizer.step()`` with the 0-based index of
        the step just taken and the total number of steps (see ``cosine_momentum``)."""
        tau = cosine_momentum(step, max_steps, self.momentum_base)
        ema_update(((self.encoder, self.target_encoder), (self.projector, self.target_projector)), tau)
