"""Batched image augmentations for two-view self-supervised methods, run inside Ray Data.

Every function takes and returns whole batches, so one ``map_batches`` call augments
``transform_batch_size`` records with a handful of vectorised torch ops instead of a Python
loop per image: one ``grid_sample`` for crop + flip, one batched 3x3 colour matrix for
brightness, contrast, saturation, hue and grayscale, one grouped convolution for blur.

The recipes are the papers' (:func:`recipe`): SimCLR (Chen et al. 2020, appendix A): random
resized crop, flip, colour jitter with probability 0.8, grayscale 0.2, blur 0.5; BYOL (Grill et
al. 2020, table 6) with asymmetric views (blur 1.0 / 0.1, solarize 0 / 0.2), which Barlow Twins
and VICReg reuse. Strengths come from :class:`AugmentConfig`, one per view.

Randomness is per record: every random choice for a record is a counter-based hash of
(seed, epoch, record key, view, draw), so a seed and an epoch give the same views however the
records are batched, and a different epoch gives different views (see
:func:`ssl_platform.data.randomness.record_uniforms`).

Notation: B = images in the batch, C = channels, H = W = side in pixels, D = draws per view.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ssl_platform.data.randomness import batch_uniforms

# Images are scaled to [0, 1] and then to [-1, 1]; a fixed normalisation keeps train-time and
# eval-time inputs identical without a pass over the corpus to estimate statistics.
MEAN, STD = 0.5, 0.5
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, as torchvision's rgb_to_grayscale
# RGB -> YIQ. Hue is a rotation of the (I, Q) chroma plane: linear, so it folds into the colour matrix.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of one view's augmentation. The defaults are the platform's historical ones;
    :func:`recipe` gives each method's paper defaults."""

    size: int = 32                 # output side in pixels
    crop_scale_min: float = 0.3    # random resized crop: area fraction in [crop_scale_min, 1]
    flip_prob: float = 0.5         # horizontal flip
    jitter_strength: float = 0.5   # s in SimCLR's colour jitter: each amount below is multiplied by s
    jitter_prob: float = 0.8
    jitter_brightness: float = 0.8  # factor in [1 - 0.8s, 1 + 0.8s]
    jitter_contrast: float = 0.8
    jitter_saturation: float = 0.8  # colour images only
    jitter_hue: float = 0.2         # shift in [-0.2s, 0.2s] of a full turn; colour images only
    grayscale_prob: float = 0.2    # only for C == 3
    blur_prob: float = 0.5
    solarize_prob: float = 0.0     # BYOL's second view uses 0.2

    def __post_init__(self):
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability; set it between 0 and 1 (got {getattr(self, name)})")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.jitter_hue * self.jitter_strength > 0.5:
            raise ValueError("jitter_hue * jitter_strength must be at most 0.5 (half a turn of hue)")


# The papers' defaults, as (view1, view2). BYOL's jitter (brightness 0.4, contrast 0.4,
# saturation 0.2, hue 0.1) is SimCLR's at s = 0.5 with half the saturation weight.
_SIMCLR = AugmentConfig(crop_scale_min=0.08, flip_prob=0.5, jitter_strength=1.0, jitter_prob=0.8,
                        grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.0)
_BYOL = AugmentConfig(crop_scale_min=0.08, flip_prob=0.5, jitter_strength=0.5, jitter_saturation=0.4,
                      jitter_prob=0.8, grayscale_prob=0.2, blur_prob=1.0, solarize_prob=0.0)
RECIPES: dict[str, tuple[AugmentConfig, AugmentConfig]] = {
    "simclr": (_SIMCLR, _SIMCLR),
    "byol": (_BYOL, dataclasses.replace(_BYOL, blur_prob=0.1, solarize_prob=0.2)),
}
RECIPES["barlow_twins"] = RECIPES["byol"]  # Zbontar et al. 2021 reuse BYOL's views
RECIPES["vicreg"] = RECIPES["byol"]  # Bardes et al. 2022 likewise


def recipe(method: str, **overrides) -> tuple[AugmentConfig, AugmentConfig]:
    """The two view configs of ``method``'s paper, with ``overrides`` (e.g. ``size=32``) applied to both."""
    if method not in RECIPES:
        raise ValueError(f"no augmentation recipe for method {method!r}; choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown augmentation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    view1, view2 = RECIPES[method]
    return dataclasses.replace(view1, **overrides), dataclasses.replace(view2, **overrides)


# ---------------------------------------------------------------------------------------------
# Per-record randomness (the uniforms come from ssl_platform.data.randomness)

# One uniform in [0, 1) per name and view: the columns of the (B, D) draws of one view.
DRAWS = ("crop_area", "crop_ratio", "crop_x", "crop_y", "flip", "jitter", "brightness", "contrast",
         "saturation", "hue", "gray", "blur", "blur_sigma", "solarize")


def view_draws(u: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, D) uniforms -> ``{name: (B,)}`` for the names in :data:`DRAWS`."""
    return dict(zip(DRAWS, u.unbind(dim=1), strict=True))


def random_draws(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Draws for one view from a torch generator (tests, and callers without record keys)."""
    return view_draws(torch.rand(batch, len(DRAWS), generator=g))


def _between(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


# ---------------------------------------------------------------------------------------------
# The operations; x is (B, C, H, W) float in [0, 1], r the view's draws.

def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 (B, C, H, W), the encoder's input at eval time."""
    x = torch.as_tensor(images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (x - MEAN) / STD


def random_resized_crop(x: torch.Tensor, size: int, scale_min: float, flip_prob: float,
                        r: dict[str, torch.Tensor]) -> torch.Tensor:
    """Crop a random box (area fraction in [scale_min, 1], aspect in [3/4, 4/3]) and resize.

    One affine grid per image, so the whole batch is one ``grid_sample`` call; a negative x
    scale flips the crop horizontally for free.
    """
    b = x.shape[0]
    area = _between(r["crop_area"], scale_min, 1.0)
    ratio = _between(r["crop_ratio"], math.log(3 / 4), math.log(4 / 3)).exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (r["crop_x"] * 2 - 1) * (1 - w)  # centre in [-1, 1] coords, box stays inside
    cy = (r["crop_y"] * 2 - 1) * (1 - h)
    flip = torch.where(r["flip"] < flip_prob, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_transform(x: torch.Tensor, cfg: AugmentConfig, r: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter (probability ``jitter_prob``) then grayscale (``grayscale_prob``), as one op.

    Brightness, contrast, saturation and hue are each linear in the pixel (contrast adds a
    per-image constant), so their product is one (B, 3, 3) matrix plus an offset along the grey
    axis, applied with a single batched matmul. The order is fixed (brightness, contrast,
    saturation, hue) and the result is clamped once at the end, where torchvision shuffles the
    order and clamps after each step; hue turns the YIQ chroma plane rather than the HSV hue.
    """
    b, c, hgt, wid = x.shape
    s, on = cfg.jitter_strength, (r["jitter"] < cfg.jitter_prob).float()

    def factor(name: str, amount: float) -> torch.Tensor:  # (B,), 1 where the jitter is off
        f = _between(r[name], max(0.0, 1 - amount * s), 1 + amount * s)
        return 1 + on * (f - 1)

    gain = factor("brightness", cfg.jitter_brightness)
    contrast = factor("contrast", cfg.jitter_contrast)
    # Contrast blends towards the brightened image's mean grey, gain * mean(luma(x)).
    channel_means = x.mean(dim=(2, 3))  # (B, C)
    grey = channel_means @ LUMA if c == 3 else channel_means[:, 0]  # (B,)
    offset = (1 - contrast) * gain * grey  # (B,)
    if c == 1:
        y = torch.addcmul(offset.view(b, 1, 1, 1), x, (gain * contrast).view(b, 1, 1, 1))
        return y.clamp_(0, 1)
    saturation = factor("saturation", cfg.jitter_saturation)
    eye, to_grey = torch.eye(3), torch.ones(3, 1) * LUMA  # to_grey: every row is LUMA
    sat = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * to_grey  # (B, 3, 3)
    angle = 2 * math.pi * on * _between(r["hue"], -cfg.jitter_hue * s, cfg.jitter_hue * s)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    matrix = _YIQ_INV @ rot @ _YIQ @ sat * (gain * contrast)[:, None, None]  # (B, 3, 3)
    gray = r["gray"] < cfg.grayscale_prob
    matrix = torch.where(gray[:, None, None], to_grey @ matrix, matrix)
    # Grey stays grey under saturation, hue and grayscale, so the offset passes through them unchanged.
    y = torch.baddbmm(offset[:, None, None].expand(b, 3, 1), matrix, x.reshape(b, 3, hgt * wid))
    return y.view(b, 3, hgt, wid).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, prob: float, r: dict[str, torch.Tensor]) -> torch.Tensor:
    """Blur with a per-image sigma, kernel ~10% of the side (SimCLR), as one grouped conv.

    SimCLR draws sigma from [0.1, 2.0] pixels for 224-pixel images; the upper bound scales with
    the side but stays at least 1 pixel so small images still get a visible blur. Only the
    images drawn for blurring are convolved.
    """
    b, c, h, w = x.shape
    picked = (r["blur"] < prob).nonzero().squeeze(1)  # (n,)
    if picked.numel() == 0:
        return x
    n = picked.numel()
    sigma = _between(r["blur_sigma"][picked], 0.1, max(1.0, 2.0 * h / 224))
    # SimCLR's kernel spans ~10% of the side; taps beyond 4 sigma hold < 1e-4 of the weight,
    # so the batch's largest sigma bounds the radius (23 -> 17 taps at 224 px).
    radius = min(max(1, int(0.1 * h) // 2), math.ceil(4 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))  # (n, k)
    # Weights of ~1e-40 are denormal floats, which make every multiply with them ~10x slower.
    kernel = torch.where(kernel < 1e-12, 0.0, kernel)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*C, k)
    y = x[picked].reshape(1, n * c, h, w)
    y = F.pad(y, (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)  # horizontal pass
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)  # vertical pass
    out = x.clone() if n < b else torch.empty_like(x)
    out[picked] = y.view(n, c, h, w)
    return out


def random_solarize(x: torch.Tensor, prob: float, r: dict[str, torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` of the images drawn with probability ``prob``.

    Works in place on ``x`` (a view's own intermediate tensor) and returns it.
    """
    picked = (r["solarize"] < prob).nonzero().squeeze(1)
    if picked.numel() == 0:
        return x
    chosen = x[picked]
    x[picked] = torch.where(chosen >= threshold, 1 - chosen, chosen)  # x is this view's own tensor
    return x


def augment_view(images: torch.Tensor, cfg: AugmentConfig, g: torch.Generator | torch.Tensor) -> torch.Tensor:
    """One random view of a uint8 batch (B, C, H, W) -> normalised float32 (B, C, size, size).

    ``g`` is a torch generator, or the (B, D) uniforms of this view (see
    :func:`~ssl_platform.data.randomness.record_uniforms`).
    """
    b = images.shape[0]
    r = random_draws(b, g) if isinstance(g, torch.Generator) else view_draws(g)
    x = images.float().mul_(1 / 255.0)
    x = random_resized_crop(x, cfg.size, cfg.crop_scale_min, cfg.flip_prob, r)
    x = color_transform(x, cfg, r)
    x = gaussian_blur(x, cfg.blur_prob, r)
    x = random_solarize(x, cfg.solarize_prob, r)
    return x.sub_(MEAN).div_(STD)


def uint8_images(batch: dict[str, np.ndarray]) -> torch.Tensor:
    """The batch's ``image`` column as a uint8 tensor (B, C, H, W); ValueError for anything else."""
    # Copied only if read-only (as Ray hands arrays over), which torch.from_numpy would warn about.
    images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images of shape (B, C, H, W), got {tuple(images.shape)} {images.dtype}")
    return images


class TwoViewAugment:
    """``map_batches`` callable: ``{"image": uint8 (B, C, H, W), ...}`` -> ``{"view1", "view2"}``.

    Two random views of every image, float32 (B, C, size, size). Labels are dropped: the
    pretraining batch carries no supervision.

    Args:
        cfg: one :class:`AugmentConfig` for both views, or a (view1, view2) pair such as
            ``recipe("byol")``.
        seed: None draws fresh views on every call; an int makes every record's views a
            function of (seed, epoch, its ``path``/``key``/``id`` column), whatever the batching.
            Without such a column the position in the batch stands in for the key.
        epoch: mixed into the randomness so each epoch sees new views; an ``epoch`` column in
            the batch, if present, overrides it per record.
    """

    def __init__(self, cfg: AugmentConfig | Sequence[AugmentConfig], seed: int | None = None, epoch: int = 0):
        pair = (cfg, cfg) if isinstance(cfg, AugmentConfig) else tuple(cfg)
        if len(pair) != 2 or not all(isinstance(c, AugmentConfig) for c in pair):
            raise ValueError("TwoViewAugment takes one AugmentConfig or a pair (view1, view2), e.g. recipe('byol')")
        if pair[0].size != pair[1].size:
            raise ValueError(f"both views must have the same size, got {pair[0].size} and {pair[1].size}")
        self.cfgs = pair
        self.seed = seed
        self.epoch = epoch

    @property
    def cfg(self) -> AugmentConfig:
        return self.cfgs[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(1)  # one data task per CPU; no oversubscription
        images = uint8_images(batch)
        d = len(DRAWS)
        u = batch_uniforms(batch, 2 * d, self.seed, self.epoch, rows=images.shape[0])  # (B, 2D)
        return {
            "view1": augment_view(images, self.cfgs[0], u[:, :d]).numpy(),
            "view2": augment_view(images, self.cfgs[1], u[:, d:]).numpy(),
        }
