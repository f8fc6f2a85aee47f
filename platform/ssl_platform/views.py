"""What one augmented view of an image is, and the views a method's recipe asks for.

A method declares its paper's views in ``spec.views`` (``ssl_models``): one mapping of
:class:`AugmentConfig` field -> value per view; the platform's defaults fill the rest. Two
views of one size (SimCLR, BYOL, Barlow Twins, VICReg), one view (a pretext task), or
multi-crop (DINO's 2 global + N local views of a smaller side) are all the same description:
``size_frac`` sets a view's side as a fraction of ``data.image_size``, ``crop_scale_min`` /
``crop_scale_max`` the area its crop covers.

Torch-free and Ray-free: :func:`image_views` is what ``ssl_platform.methods.validate`` checks
before Ray starts, and what the image pipeline (``data.transforms.MultiViewAugment``) runs.

    image_views(cfg, method_spec("simclr").views)  # (AugmentConfig(size=32, ...), AugmentConfig(...))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ssl_platform.config import ConfigError, ExperimentConfig

MIN_SIDE = 8  # pixels: the smallest view the encoders' stems and the augmentations handle


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of one view's augmentation. The defaults are the platform's historical ones;
    a method's ``spec.views`` (:func:`recipe`) sets its paper's."""

    size: int = 32                 # output side in pixels
    size_frac: float = 1.0         # side relative to data.image_size: multi-crop's local views are < 1
    crop_scale_min: float = 0.3    # random resized crop: area fraction in [crop_scale_min, crop_scale_max]
    crop_scale_max: float = 1.0
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
        if not 0.0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(f"the crop's area fraction [crop_scale_min, crop_scale_max] must lie in (0, 1] "
                             f"with min <= max, got [{self.crop_scale_min}, {self.crop_scale_max}]")
        if not 0.0 < self.size_frac <= 1.0:
            raise ValueError(f"size_frac is a view's side relative to the image's, in (0, 1]; got {self.size_frac}")
        if self.size < MIN_SIDE:
            raise ValueError(f"a view's side is {self.size} pixels, below the {MIN_SIDE} the encoders take; "
                             f"raise data.image_size")
        if self.jitter_hue * self.jitter_strength > 0.5:
            raise ValueError("jitter_hue * jitter_strength must be at most 0.5 (half a turn of hue)")

    @property
    def full_size(self) -> bool:
        """A view at the image's own side (not a multi-crop local view)."""
        return self.size_frac == 1.0


def recipe(method: str | Sequence[Mapping[str, Any]], **overrides) -> tuple[AugmentConfig, ...]:
    """The view configs of a method's paper, one per view, with ``overrides`` applied to every view.

    ``size`` is the side of full-size views: a view with ``size_frac`` f gets ``round(f * size)``.
    ``crop_scale_min`` is applied to the full-size views only; local views keep their recipe's
    (their crop range is what makes them local).

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
    if not method:
        raise ValueError("a recipe needs at least one view")
    configs = []
    for declared in method:
        view, frac = {**declared, **overrides}, declared.get("size_frac", 1.0)
        if frac != 1.0:  # a local view: its crop range is the recipe's
            view["crop_scale_min"] = declared.get("crop_scale_min", AugmentConfig.crop_scale_min)
        if "size" in overrides or "size" not in declared:
            view["size"] = round(overrides.get("size", AugmentConfig.size) * frac)
        configs.append(AugmentConfig(**view))
    return tuple(configs)


def image_views(cfg: ExperimentConfig, views: Sequence[Mapping[str, Any]]) -> tuple[AugmentConfig, ...]:
    """The views a run of ``cfg`` trains on: the method's ``views`` at ``data.image_size`` with the
    ``data.*`` augmentation keys that are set. A recipe that cannot be built is a ConfigError."""
    d = cfg.data
    overrides = {key: getattr(d, key) for key in ("crop_scale_min", "jitter_strength", "jitter_prob", "blur_prob",
                                                  "flip_prob") if getattr(d, key) is not None}
    try:
        return recipe(views, size=d.image_size, **overrides)
    except ValueError as e:
        raise ConfigError(f"method {cfg.method.name}'s views (spec.views) at data.image_size={d.image_size}: {e}") \
            from None


def _views_of(name: str) -> tuple[Mapping[str, Any], ...]:
    """``ssl_models.METHODS[name].spec.views``; imported here (torch) only when a name is given."""
    import ssl_models

    views = {n: getattr(getattr(cls, "spec", None), "views", ()) for n, cls in ssl_models.METHODS.items()}
    if not views.get(name):
        raise ValueError(f"no augmentation recipe for method {name!r}; choose one of "
                         f"{', '.join(n for n, v in views.items() if v)}")
    return views[name]
