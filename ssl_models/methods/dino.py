"""DINO: a student matches an EMA teacher's centred, sharpened distribution over prototypes, multi-crop."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_models.encoders import build_image_encoder, image_input
from ssl_models.heads import DINOHead
from ssl_models.losses.dino import DINOLoss
from ssl_models.methods.byol import cosine_momentum, ema_update
from ssl_models.spec import MethodSpec

# DINO's augmentation (Caron et al. 2021, appendix; the official main_dino.py): BYOL's colour jitter,
# grayscale and flip on every view; two global crops from 40-100% of the area, the first always blurred,
# the second blurred with probability 0.1 and solarized with 0.2; local crops from 5-40% of the area at
# 96/224 of the global side (here half), blurred with probability 0.5.
_DINO_VIEW = {"flip_prob": 0.5, "jitter_strength": 0.5, "jitter_saturation": 0.4, "jitter_prob": 0.8,
              "grayscale_prob": 0.2, "solarize_prob": 0.0}
_GLOBAL = {**_DINO_VIEW, "crop_scale_min": 0.4, "crop_scale_max": 1.0}
_LOCAL = {**_DINO_VIEW, "size_frac": 0.5, "crop_scale_min": 0.05, "crop_scale_max": 0.4, "blur_prob": 0.5}
GLOBAL_VIEWS = 2
LOCAL_VIEWS = 4
DINO_VIEWS = ({**_GLOBAL, "blur_prob": 1.0}, {**_GLOBAL, "blur_prob": 0.1, "solarize_prob": 0.2},
              *(_LOCAL,) * LOCAL_VIEWS)


class DINO(nn.Module):
    """DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"):
    self-distillation with no labels.

    The student (encoder + ``DINOHead``) sees every view: ``GLOBAL_VIEWS`` global crops and
    ``LOCAL_VIEWS`` smaller local ones (multi-crop, ``spec.views``); the teacher, an EMA copy of
    the student with no gradient, sees the global crops only. ``DINOLoss`` matches the student's
    distribution on each view to the teacher's centred, sharpened one on every other global view.
    The encoder runs once per group of same-sized views (the official ``MultiCropWrapper``), so
    BatchNorm normalises the globals and the locals separately.

    ``on_train_step_end`` moves the state kept outside the optimizer, once per optimizer step:
    the loss's centre (over the global batch, see ``DINOLoss``) and the teacher,
    ``teacher <- tau * teacher + (1 - tau) * student`` with ``tau`` from ``cosine_momentum``
    (``momentum_base`` at the first step, 1.0 at the last), as BYOL's target. The teacher keeps
    its own BatchNorm statistics. Kept simple against the paper: a fixed teacher temperature
    (no warmup), no weight-decay schedule, the last layer not frozen in the first epoch.

    Args:
        in_channels, encoder, encoder_widths, blocks_per_stage, small_stem: the image encoder,
            as for ``SimCLR``.
        head_width: hidden width of the head's MLP (paper: 2048).
        head_batchnorm: BatchNorm in the head's MLP (the official code's ``use_bn_in_head``).
        bottleneck_dim: the head's normalised embedding (paper: 256).
        out_dim: K, the prototypes (paper: 65536).
        teacher_temp: the teacher's temperature (paper: 0.04).
        student_temp: the student's temperature (paper: 0.1).
        center_momentum: the centre's EMA momentum (paper: 0.9).
        momentum_base: the teacher's EMA momentum at the first step (paper: 0.996).

    Shape:
        - batch["view1"], batch["view2"]: (B, C, H, W), the global views.
        - batch["view3"] ... batch["view6"]: (B, C, h, w), the local views (h = H / 2 with the
          spec's views; any size works, grouped by shape).
        - batch["image"] (for ``embed``): (B, C, H, W).
        - ``embed`` output: (B, feature_dim), from the student's encoder.
    """

    spec = MethodSpec(
        display_name="DINO", data_kind="image",
        batch_keys=tuple(f"view{i + 1}" for i in range(len(DINO_VIEWS))), embeds=("image",),
        online_metric="val_knn_top1", online_mode="max",
        objective_keys=frozenset({"teacher_temp", "student_temp", "center_momentum", "momentum_base"}),
        derived=("in_channels",), views=DINO_VIEWS,
        views_recipe="DINO (Caron et al. 2021): 2 global + 4 local crops, BYOL's colour",
        accumulation="mean")  # the centre sums the teacher rows of every micro-batch (DINOLoss)

    def __init__(self, in_channels: int = 1, encoder: str = "resnet_small",
                 encoder_widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1,
                 small_stem: bool = True, head_width: int = 512, head_batchnorm: bool = False,
                 bottleneck_dim: int = 128, out_dim: int = 4096, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9, momentum_base: float = 0.996):
        super().__init__()
        if not 0 <= momentum_base <= 1:
            raise ValueError(f"momentum_base must be in [0, 1], got {momentum_base}")
        self.in_channels = in_channels
        self.momentum_base = momentum_base
        self.encoder = build_image_encoder(encoder, in_channels, strict=False, widths=tuple(encoder_widths),
                                           blocks_per_stage=blocks_per_stage, small_stem=small_stem)
        self.feature_dim = self.encoder.feature_dim
        self.head = DINOHead(self.feature_dim, head_width, bottleneck_dim, out_dim, batchnorm=head_batchnorm)
        # The teacher starts as a copy of the student (paper, algorithm 1).
        self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.criterion = DINOLoss(out_dim, teacher_temp, student_temp, center_momentum, GLOBAL_VIEWS)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = [image_input(batch, key, self.in_channels) for key in self.spec.batch_keys]
        if len({v.shape[0] for v in views}) != 1:
            raise ValueError(f"DINO's views must hold one batch of images each, got batch sizes "
                             f"{[v.shape[0] for v in views]}")
        student = self.head(torch.cat([self.encoder(torch.cat(group)) for group in _same_size_runs(views)]))
        with torch.no_grad():  # the teacher only moves by the EMA
            teacher = self.teacher_head(self.teacher_encoder(torch.cat(views[:GLOBAL_VIEWS])))  # (G*B, K)
        loss = self.criterion(student, teacher)  # student (V*B, K), view-major like the teacher
        probs = self.criterion.teacher_probs(teacher)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()  # collapse to one prototype: 0
        return {"loss": loss, "teacher_entropy": entropy.detach()}

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Student encoder features (not head outputs). (B, C, H, W) -> (B, feature_dim)."""
        return self.encoder(image_input(batch, "image", self.in_channels))

    @torch.no_grad()
    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """After ``optimizer.step()`` (0-based ``step`` of ``max_steps``), on every rank: the
        centre's update over the global batch, then the teacher's EMA (see ``cosine_momentum``)."""
        self.criterion.update_center()
        ema_update(((self.encoder, self.teacher_encoder), (self.head, self.teacher_head)),
                   cosine_momentum(step, max_steps, self.momentum_base))


def _same_size_runs(views: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive views of one shape grouped, in order: [[global1, global2], [local1, ...]]."""
    runs: list[list[Tensor]] = []
    for v in views:
        if runs and runs[-1][0].shape == v.shape:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs
