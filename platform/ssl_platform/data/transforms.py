"""Batched image augmentations for two-view self-supervised methods, run inside Ray Data.

Every function takes and returns whole batches, so one ``map_batches`` call augments
``transform_batch_size`` records with a handful of vectorised torch ops instead of a Python
loop per image. The recipe is SimCLR's (Chen et al. 2020, appendix A): random resized crop,
optional flip, colour jitter with probability 0.8, grayscale with probability 0.2 (colour
images only), Gaussian blur; strengths come from :class:`AugmentConfig`.

Notation: B = images in the batch, C = channels, H = W = side in pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Images are scaled to [0, 1] and then to [-1, 1]; a fixed normalisation keeps train-time and
# eval-time inputs identical without a pass over the corpus to estimate statistics.
MEAN, STD = 0.5, 0.5


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 32                 # output side in pixels
    crop_scale_min: float = 0.3    # random resized crop: area fraction in [crop_scale_min, 1]
    flip_prob: float = 0.5         # horizontal flip
    jitter_strength: float = 0.5   # s in SimCLR's colour jitter (0.8s brightness/contrast/saturation)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2    # only for C == 3
    blur_prob: float = 0.5
    solarize_prob: float = 0.0     # BYOL's second view uses 0.2


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 (B, C, H, W), the encoder's input at eval time."""
    x = torch.as_tensor(images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (x - MEAN) / STD


def random_resized_crop(x: torch.Tensor, size: int, scale_min: float, flip_prob: float, g: torch.Generator) -> torch.Tensor:
    """Crop a random box (area fraction in [scale_min, 1], aspect in [3/4, 4/3]) and resize.

    One affine grid per image, so the whole batch is one ``grid_sample`` call; a negative x
    scale flips the crop horizontally for free. x: (B, C, H, W) float in [0, 1].
    """
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale_min, 1.0, generator=g)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # centre in [-1, 1] coords, box stays inside
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < flip_prob, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, prob: float, g: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and (for colour images) saturation, each in [1-0.8s, 1+0.8s]."""
    b, c = x.shape[:2]
    apply = (torch.rand(b, 1, 1, 1, generator=g) < prob).float()
    amount = 0.8 * strength

    def factor() -> torch.Tensor:
        f = torch.empty(b, 1, 1, 1).uniform_(1 - amount, 1 + amount, generator=g)
        return 1 + apply * (f - 1)  # identity where the jitter is not applied

    x = x * factor()  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean  # contrast
    if c == 3:
        gray = _luma(x)
        x = (x - gray) * factor() + gray  # saturation
    return x.clamp(0, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def random_grayscale(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    if x.shape[1] != 3 or prob <= 0:
        return x
    apply = torch.rand(x.shape[0], 1, 1, 1, generator=g) < prob
    return torch.where(apply, _luma(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    """Blur with a per-image sigma, kernel ~10% of the side (SimCLR), as one grouped conv.

    SimCLR draws sigma from [0.1, 2.0] pixels for 224-pixel images; the upper bound scales with
    the side but stays at least 1 pixel so small images still get a visible blur.
    """
    b, c, h, w = x.shape
    if prob <= 0:
        return x
    k = max(3, int(0.1 * h) // 2 * 2 + 1)  # odd kernel size
    sigma = torch.empty(b).uniform_(0.1, max(1.0, 2.0 * h / 224), generator=g)
    apply = torch.rand(b, generator=g) < prob
    t = torch.arange(k, dtype=x.dtype) - k // 2
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))  # (B, k)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = torch.zeros_like(kernel)
    identity[:, k // 2] = 1.0
    kernel = torch.where(apply[:, None], kernel, identity)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k): one kernel per image channel
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)  # horizontal pass
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)  # vertical pass
    return y.reshape(b, c, h, w)


def random_solarize(x: torch.Tensor, prob: float, g: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    if prob <= 0:
        return x
    apply = torch.rand(x.shape[0], 1, 1, 1, generator=g) < prob
    return torch.where(apply & (x >= threshold), 1 - x, x)


def augment_view(images: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One random view of a uint8 batch (B, C, H, W) -> normalised float32 (B, C, size, size)."""
    x = images.float() / 255.0
    x = random_resized_crop(x, cfg.size, cfg.crop_scale_min, cfg.flip_prob, g)
    x = color_jitter(x, cfg.jitter_strength, cfg.jitter_prob, g)
    x = random_grayscale(x, cfg.grayscale_prob, g)
    x = gaussian_blur(x, cfg.blur_prob, g)
    x = random_solarize(x, cfg.solarize_prob, g)
    return (x - MEAN) / STD


class TwoViewAugment:
    """``map_batches`` callable: ``{"image": uint8 (B, C, H, W), ...}`` -> ``{"view1", "view2"}``.

    Two independent random views of every image, float32 (B, C, size, size). Labels are
    dropped: the pretraining batch carries no supervision.
    """

    def __init__(self, cfg: AugmentConfig, seed: int | None = None):
        self.cfg = cfg
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(1)  # one data task per CPU; no oversubscription
        g = torch.Generator()
        # Fresh entropy per call unless a seed is given (tests): every epoch sees new views.
        g.manual_seed(self.seed if self.seed is not None else int.from_bytes(np.random.bytes(8), "little") >> 1)
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images of shape (B, C, H, W), got {tuple(images.shape)} {images.dtype}")
        return {
            "view1": augment_view(images, self.cfg, g).numpy(),
            "view2": augment_view(images, self.cfg, g).numpy(),
        }
