"""Batched image augmentations for two-view self-supervised methods, run inside Ray Data.

Every function takes and returns whole batches, so one ``map_batches`` call augments
``transform_batch_size`` records with a handful of vectorised torch ops instead of a Python
loop per image: one ``grid_sample`` for crop + flip, one batched 3x3 colour matrix for
brightness, contrast, saturation, hue and grayscale, one grouped convolution for blur.

The recipes are the papers', declared by each method beside its code (``spec.views`` in
``ssl_models``: SimCLR's, BYOL's asymmetric views that Barlow Twins and VICReg reuse) as
:class:`AugmentConfig` fields per view; :func:`recipe` turns them into configs.

Randomness is per record: every random choice for a record is a counter-based hash of
(seed, epoch, record key, view, draw), so a seed and an epoch give the same views however the
records are batched, and a different epoch gives different views (see
:func:`ssl_platform.data.randomness.record_uniforms`).

Notation: B = images in the batch, C = channels, H = W = side in pixels, D = draws per view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssl_platform.data.randomness import batch_uniforms

# Images are scaled to [0, 1] and then to [-1, 1]; a fixed normalisation keeps train-time and
# eval-time inputs identical without a pass over the corpus to estimate statistics.
MEAN, STD = 0.5, 0.5
# The torch operations live in ssl_platform.data.augment, imported where they run: Ray Data's
# coordinators (the split coordinator, Ray Train's dataset manager) unpickle a pipeline's
# callables without calling them, and importing torch there cost ~4 CPU-s per run. Their names
# are still reachable from here (``from ssl_platform.data.transforms import augment_view``).
KERNELS = frozenset({"view_draws", "random_draws", "to_float", "random_resized_crop", "color_transform",
                     "gaussian_blur", "random_solarize", "augment_view", "uint8_images", "LUMA"})


def __getattr__(name: str):
    if name in KERNELS:
        from ssl_platform.data import augment

        return getattr(augment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of one view's augmentation. The defaults are the platform's historical ones;
    a method's ``spec.views`` (:func:`recipe`) sets its paper's."""

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


def recipe(method: str | Sequence[Mapping[str, Any]], **overrides) -> tuple[AugmentConfig, ...]:
    """The view configs of a method's paper, one per view, with ``overrides`` (e.g. ``size=32``)
    applied to every view.

    Args:
        method: a method's name (its ``spec.views`` are read) or those views themselves: one
            mapping of :class:`AugmentConfig` field -> value per view.
    """
    if isinstance(method, str):
        method = _views_of(method)
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(overrides).union(*method) - fields)
    if unknown:
        raise ValueError(f"unknown augmentation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    return tuple(AugmentConfig(**{**view, **overrides}) for view in method)


def _views_of(name: str) -> tuple[Mapping[str, Any], ...]:
    """``ssl_models.METHODS[name].spec.views``; imported here (torch) only when a name is given."""
    import ssl_models

    views = {n: getattr(getattr(cls, "spec", None), "views", ()) for n, cls in ssl_models.METHODS.items()}
    if not views.get(name):
        raise ValueError(f"no augmentation recipe for method {name!r}; choose one of "
                         f"{', '.join(n for n, v in views.items() if v)}")
    return views[name]


# ---------------------------------------------------------------------------------------------
# Per-record randomness (the uniforms come from ssl_platform.data.randomness)

# One uniform in [0, 1) per name and view: the columns of the (B, D) draws of one view.
DRAWS = ("crop_area", "crop_ratio", "crop_x", "crop_y", "flip", "jitter", "brightness", "contrast",
         "saturation", "hue", "gray", "blur", "blur_sigma", "solarize")


class OneViewAugment:
    """``map_batches`` callable for supervised fine-tuning: ``{"image": uint8 (B, C, H, W), "label",
    "path"}`` -> ``{"image": float32 (B, C, size, size) normalised, "label"}``, one random view of
    each image (the SimCLR paper's fine-tuning augmentation is a random resized crop and flip).
    ``seed`` and ``epoch`` as :class:`TwoViewAugment`'s."""

    def __init__(self, cfg: AugmentConfig, seed: int | None = None, epoch: int = 0):
        self.cfg, self.seed, self.epoch = cfg, seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ssl_platform.data.augment import augment_view, uint8_images

        torch.set_num_threads(1)  # one data task per CPU; no oversubscription
        images = uint8_images(batch)
        u = batch_uniforms(batch, len(DRAWS), self.seed, self.epoch, rows=images.shape[0])  # (B, D)
        return {"image": augment_view(images, self.cfg, u).numpy(), "label": np.asarray(batch["label"])}


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
        import torch

        from ssl_platform.data.augment import augment_view, uint8_images

        torch.set_num_threads(1)  # one data task per CPU; no oversubscription
        images = uint8_images(batch)
        d = len(DRAWS)
        u = batch_uniforms(batch, 2 * d, self.seed, self.epoch, rows=images.shape[0])  # (B, 2D)
        return {
            "view1": augment_view(images, self.cfgs[0], u[:, :d]).numpy(),
            "view2": augment_view(images, self.cfgs[1], u[:, d:]).numpy(),
        }
