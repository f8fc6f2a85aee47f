"""The torch operations of :mod:`ssl_platform.data.transforms`: batched crops, colour, blur and
solarize on (B, C, H, W) tensors, run inside Ray Data's map tasks (see that module for the
recipes, the per-record randomness and the ``map_batches`` callable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_platform.data.transforms import DRAWS, DRAWS_SUFFIX, MEAN, STD
from ssl_platform.views import AugmentConfig

LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, as torchvision's rgb_to_grayscale
# RGB -> YIQ. Hue is a rotation of the (I, Q) chroma plane: linear, so it folds into the colour matrix.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)



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


# A view at least this wide is cut by one ``F.interpolate`` per image on the uint8 image (torch's
# separable uint8 resize); a smaller one by one float ``grid_sample`` of the whole chunk, where the
# per-call cost of a loop would dominate. One core (2026-12-05), per view of SimCLR's recipe:
# 32 px 16.1 us looped vs 7.8 sampled, 48 px 20.1 vs 17.9, 64 px 25.4 vs 33.7, 224 px 143 vs 804.
RESIZE_EACH_MIN_SIDE = 56


def crop_boxes(height: int, width: int, scale_min: float, scale_max: float,
               r: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random boxes of a batch, in whole pixels as torchvision's ``RandomResizedCrop`` picks
    them: area fraction in [scale_min, scale_max], aspect in [3/4, 4/3], each side clamped to the
    image, the position uniform over the places the box fits. Returns int64 (x0, y0, w, h), (B,) each.
    """
    area = _between(r["crop_area"], scale_min, scale_max)
    ratio = _between(r["crop_ratio"], math.log(3 / 4), math.log(4 / 3)).exp()
    w = (area * ratio).sqrt().mul(width).round().clamp(1, width)
    h = (area / ratio).sqrt().mul(height).round().clamp(1, height)
    x0 = torch.minimum((r["crop_x"] * (width - w + 1)).floor(), width - w)
    y0 = torch.minimum((r["crop_y"] * (height - h + 1)).floor(), height - h)
    return x0.long(), y0.long(), w.long(), h.long()


def random_resized_crop(images: torch.Tensor, size: int, scale_min: float, flip_prob: float,
                        r: dict[str, torch.Tensor], scale_max: float = 1.0) -> torch.Tensor:
    """Crop a random box of each uint8 image (:func:`crop_boxes`), resize it to ``size`` x ``size``
    (bilinear, half-pixel centres: ``F.interpolate`` of the box, which torchvision's
    ``resized_crop`` is) and mirror it with probability ``flip_prob``: uint8 (B, C, H, W) -> uint8
    (B, C, size, size).

    Two ways to the same views (within 1 of 255: the uint8 resize rounds its weights), picked by
    size (:data:`RESIZE_EACH_MIN_SIDE`): the box of each image through ``F.interpolate`` on uint8,
    or, for small views, the whole batch through one float ``grid_sample`` whose sampling points,
    clamped to each box, are the ones ``F.interpolate`` reads.
    """
    x0, y0, w, h = crop_boxes(images.shape[-2], images.shape[-1], scale_min, scale_max, r)
    flip = r["flip"] < flip_prob
    if size >= RESIZE_EACH_MIN_SIDE:
        return _resize_each(images, (x0, y0, w, h), flip, size)
    return quantize(_sample_boxes(images.float().mul_(1 / 255.0), (x0, y0, w, h), flip, size))


def _resize_each(images: torch.Tensor, boxes: tuple[torch.Tensor, ...], flip: torch.Tensor, size: int) -> torch.Tensor:
    out = images.new_empty((images.shape[0], images.shape[1], size, size))
    for i, (x, y, w, h, mirror) in enumerate(zip(*(b.tolist() for b in boxes), flip.tolist(), strict=True)):
        crop = F.interpolate(images[i:i + 1, :, y:y + h, x:x + w], size=(size, size), mode="bilinear",
                             align_corners=False)[0]
        out[i] = crop.flip(-1) if mirror else crop
    return out


def _sample_boxes(x: torch.Tensor, boxes: tuple[torch.Tensor, ...], flip: torch.Tensor, size: int) -> torch.Tensor:
    """``F.interpolate``'s reading of each box as one ``grid_sample`` call on float (B, C, H, W).

    Output pixel j of a box [x0, x0 + w) reads the source at x0 + (j + 0.5) w / size - 0.5, clamped
    to the box's first and last pixel centres; the box is axis-aligned, so the grid is separable
    (x depends on the column only, y on the row) and built by broadcasting. A mirrored view reads
    its columns in reverse.
    """
    x0, y0, w, h = (b.to(x.dtype) for b in boxes)
    centres = (torch.arange(size, dtype=x.dtype, device=x.device) + 0.5) / size  # (size,)

    def coords(start: torch.Tensor, extent: torch.Tensor, side: int) -> torch.Tensor:  # (B, size) in [-1, 1]
        at = start[:, None] + torch.minimum(torch.clamp(centres * extent[:, None] - 0.5, min=0), extent[:, None] - 1)
        return (2 * at + 1) / side - 1

    gx = coords(x0, w, x.shape[-1])
    gx = torch.where(flip[:, None], gx.flip(-1), gx)
    gy = coords(y0, h, x.shape[-2])
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
    luma, yiq, yiq_inv = (m.to(x.device) for m in (LUMA, _YIQ, _YIQ_INV))  # on the train worker's GPU too
    channel_means = x.mean(dim=(2, 3))  # (B, C)
    grey = channel_means @ luma if c == 3 else channel_means[:, 0]  # (B,)
    offset = (1 - contrast) * gain * grey  # (B,)
    if c == 1:
        y = torch.addcmul(offset.view(b, 1, 1, 1), x, (gain * contrast).view(b, 1, 1, 1))
        return y.clamp_(0, 1)
    saturation = factor("saturation", cfg.jitter_saturation)
    eye, to_grey = torch.eye(3, device=x.device), torch.ones(3, 1, device=x.device) * luma  # every row is LUMA
    sat = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * to_grey  # (B, 3, 3)
    angle = 2 * math.pi * on * _between(r["hue"], -cfg.jitter_hue * s, cfg.jitter_hue * s)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3, device=x.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    matrix = yiq_inv @ rot @ yiq @ sat * (gain * contrast)[:, None, None]  # (B, 3, 3)
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
    sigma_max = max(1.0, 2.0 * h / 224)
    sigma = _between(r["blur_sigma"][picked], 0.1, sigma_max)
    # SimCLR's kernel spans ~10% of the side; taps beyond 4 sigma hold < 1e-4 of the weight, so
    # the largest sigma there can be bounds the radius (23 -> 17 taps at 224 px). A function of
    # the side alone: an image's blur does not depend on the others in its batch.
    radius = min(max(1, int(0.1 * h) // 2), math.ceil(4 * sigma_max))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))  # (n, k)
    # Weights of ~1e-40 are denormal floats, which make every multiply with them ~10x slower.
    kernel = torch.where(kernel < 1e-12, 0.0, kernel)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (n, k)
    y = F.pad(x[picked], (radius,) * 4, mode="reflect")  # (n, C, h + 2 radius, w + 2 radius)
    if radius <= SHIFTED_BLUR_RADIUS:
        y = _shifted_sums(_shifted_sums(y, kernel, dim=3), kernel, dim=2)
    else:
        kernel = kernel.repeat_interleave(c, dim=0)  # (n*C, k)
        y = F.conv2d(y.reshape(1, n * c, *y.shape[2:]), kernel[:, None, None, :], groups=n * c)  # horizontal
        y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)  # vertical pass
    out = x.clone() if n < b else torch.empty_like(x)
    out[picked] = y.view(n, c, h, w)
    return out


# Up to this radius (7 taps: images up to ~70 px) the blur's passes are sums of shifted copies,
# faster than a grouped convolution (one core: 3.8 -> 2.5 us per 32-px image at radius 1, 16.6 ->
# 13.2 at 64 px and radius 3; at radius 4 they are level); the sums are the convolution's, in its order.
SHIFTED_BLUR_RADIUS = 3


def _shifted_sums(y: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass of a per-image 1-D filter, ``kernel`` (n, k), along ``dim`` (2 rows, 3 columns)
    of a padded (n, C, H, W) batch: the output is ``k - 1`` shorter there."""
    taps = kernel.shape[1]
    length = y.shape[dim] - taps + 1
    weight = kernel.view(-1, 1, 1, 1, taps).unbind(dim=-1)  # each (n, 1, 1, 1)
    out = y.narrow(dim, 0, length) * weight[0]
    for j in range(1, taps):
        out.addcmul_(y.narrow(dim, j, length), weight[j])
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
    """One random view of a uint8 batch (B, C, H, W) -> normalised float32 (B, C, size, size):
    :func:`normalise` of :func:`photometric` of :func:`geometric`, the ops a pretraining batch
    gets split between the CPU workers and the train worker's device.

    ``g`` is a torch generator, or the (B, D) uniforms of this view (see
    :func:`~ssl_platform.data.randomness.record_uniforms`).
    """
    r = random_draws(images.shape[0], g) if isinstance(g, torch.Generator) else view_draws(g)
    return normalise(photometric(geometric(images, cfg, r), cfg, r))


def geometric(images: torch.Tensor, cfg: AugmentConfig, r: dict[str, torch.Tensor]) -> torch.Tensor:
    """The random resized crop and flip of a view: uint8 (B, C, H, W) -> uint8 (B, C, size, size).

    Always on the CPU workers (it shrinks the image); rounded to uint8, so the crop that
    crosses to the device is the same whichever side runs :func:`photometric`.
    """
    return random_resized_crop(images, cfg.size, cfg.crop_scale_min, cfg.flip_prob, r, cfg.crop_scale_max)


def photometric(crops: torch.Tensor, cfg: AugmentConfig, r: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarize of a view: uint8 -> uint8, on the tensor's device
    (the CPU workers with ``data.augment_on=cpu``, the train worker's GPU with ``device``)."""
    x = crops.float().mul_(1 / 255.0)
    x = color_transform(x, cfg, r)
    x = gaussian_blur(x, cfg.blur_prob, r)
    return quantize(random_solarize(x, cfg.solarize_prob, r))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8, rounded: a view crosses the object store in a quarter of the bytes."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> the encoder's float32 input, on the images' device (as :func:`to_float`)."""
    return images.float().mul_(1 / 255.0).sub_(MEAN).div_(STD)


def finish_views(batch: dict[str, torch.Tensor], views: Sequence[AugmentConfig]) -> dict[str, torch.Tensor]:
    """The train worker's half of a pretraining batch, just before the forward, on its device.

    A view that came with its draws (``view3`` with ``view3_draws``: ``data.augment_on=device``)
    gets its :func:`photometric` ops here, with the record's own uniforms, so both placements
    give the same views; then every uint8 image (B, C, H, W) is normalised. Other tensors
    (token ids, audio, labels) pass through.
    """
    out = {}
    for key, value in batch.items():
        if key.endswith(DRAWS_SUFFIX):
            continue
        draws = batch.get(key + DRAWS_SUFFIX)
        if draws is not None:
            value = photometric(value, views[int(key.removeprefix("view")) - 1], view_draws(draws))
        out[key] = normalise(value) if value.dtype == torch.uint8 and value.ndim == 4 else value
    return out


def uint8_images(batch: dict[str, np.ndarray]) -> torch.Tensor:
    """The batch's ``image`` column as a uint8 tensor (B, C, H, W); ValueError for anything else."""
    # Copied only if read-only (as Ray hands arrays over), which torch.from_numpy would warn about.
    images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images of shape (B, C, H, W), got {tuple(images.shape)} {images.dtype}")
    return images
