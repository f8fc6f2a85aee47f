"""Batched image augmentations for the multi-view self-supervised methods, run inside Ray Data.

Every function takes and returns whole batches, so one ``map_batches`` call augments
``transform_batch_size`` records, in chunks that stay in the caches (:func:`by_chunks`), with a
handful of vectorised torch ops instead of a Python loop per image: one ``grid_sample`` for
crop + flip of small views (from 56 px up, torch's uint8 resize of each image's box, several
times faster there), one batched 3x3 colour matrix for brightness, contrast, saturation, hue and
grayscale, one grouped convolution for blur.

The recipes are the papers', declared by each method beside its code (``spec.views`` in
``ssl_models``: SimCLR's, BYOL's asymmetric views that Barlow Twins and VICReg reuse) as
:class:`~ssl_platform.views.AugmentConfig` fields per view; :func:`ssl_platform.views.recipe`
turns them into configs.

Randomness is per record: every random choice for a record is a counter-based hash of
(seed, epoch, record key, view, draw), so a seed and an epoch give the same views however the
records are batched, and a different epoch gives different views (see
:func:`ssl_platform.data.randomness.record_uniforms`).

Notation: B = images in the batch, C = channels, H = W = side in pixels, D = draws per view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ssl_platform.data.randomness import batch_uniforms
from ssl_platform.views import AugmentConfig

# Images are scaled to [0, 1] and then to [-1, 1]; a fixed normalisation keeps train-time and
# eval-time inputs identical without a pass over the corpus to estimate statistics.
MEAN, STD = 0.5, 0.5
# The torch operations live in ssl_platform.data.augment, imported where they run: Ray Data's
# coordinators (the split coordinator, Ray Train's dataset manager) unpickle a pipeline's
# callables without calling them, and importing torch there cost ~4 CPU-s per run. Their names
# are still reachable from here (``from ssl_platform.data.transforms import augment_view``).
KERNELS = frozenset({"view_draws", "random_draws", "to_float", "random_resized_crop", "color_transform",
                     "gaussian_blur", "random_solarize", "augment_view", "geometric", "photometric", "quantize",
                     "normalise", "finish_views", "uint8_images", "LUMA"})


def __getattr__(name: str):
    if name in KERNELS:
        from ssl_platform.data import augment

        return getattr(augment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Values (C x H x W of each image) in one chunk of a batch's images, whose views are made
# together: the ops are memory-bound, and a working set that leaves the caches slows every one
# of them. One core, SimCLR's two views of 256-px JPEGs at 224 px (2026-12-05): batches of 128
# images made whole gave 256 views/s, of 32 584, of 8 759, of 4 832. At 2**20, 5 such images
# make a chunk, and a 256-record batch of 32-px RGB digits is one.
CHUNK_VALUES = 2**20


def by_chunks(make: Callable, images, u) -> dict[str, np.ndarray]:
    """``make(images, u)`` (a dict of arrays with a row per image) over consecutive chunks of
    the batch's rows (:data:`CHUNK_VALUES`), concatenated: the same rows as one call, since every
    record's ops depend on its own draws ``u`` alone."""
    rows = max(1, CHUNK_VALUES // max(1, math.prod(images.shape[1:])))
    if images.shape[0] <= rows:
        return make(images, u)
    parts = [make(images[i:i + rows], u[i:i + rows]) for i in range(0, images.shape[0], rows)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------------------------
# Per-record randomness (the uniforms come from ssl_platform.data.randomness)

# One uniform in [0, 1) per name and view: the columns of the (B, D) draws of one view.
DRAWS = ("crop_area", "crop_ratio", "crop_x", "crop_y", "flip", "jitter", "brightness", "contrast",
         "saturation", "hue", "gray", "blur", "blur_sigma", "solarize")
# ``data.augment_on=device``: view i travels as its uint8 crop plus ``view{i}_draws`` (B, D)
# float32, the uniforms its photometric ops use on the train worker (augment.finish_views).
DRAWS_SUFFIX = "_draws"
PLACEMENTS = ("cpu", "device")


class OneViewAugment:
    """``map_batches`` callable for supervised fine-tuning: ``{"image": uint8 (B, C, H, W), "label",
    "path"}`` -> ``{"image": float32 (B, C, size, size) normalised, "label"}``, one random view of
    each image (the SimCLR paper's fine-tuning augmentation is a random resized crop and flip).
    ``seed`` and ``epoch`` as :class:`MultiViewAugment`'s."""

    def __init__(self, cfg: AugmentConfig, seed: int | None = None, epoch: int = 0):
        self.cfg, self.seed, self.epoch = cfg, seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ssl_platform.data.augment import augment_view, uint8_images

        torch.set_num_threads(1)  # one data task per CPU; no oversubscription
        images = uint8_images(batch)
        u = batch_uniforms(batch, len(DRAWS), self.seed, self.epoch, rows=images.shape[0])  # (B, D)
        views = by_chunks(lambda x, draws: {"image": augment_view(x, self.cfg, draws).numpy()}, images, u)
        return {**views, "label": np.asarray(batch["label"])}


class MultiViewAugment:
    """``map_batches`` callable: ``{"image": uint8 (B, C, H, W), ...}`` -> ``{"view1", ..., "viewN"}``.

    One random view of every image per config, uint8 (B, C, size_i, size_i): two views of one
    size (SimCLR, BYOL), one view (a pretext task) or multi-crop (views of different sizes, DINO).
    Views cross the object store as uint8, a quarter of float32's bytes; the train worker
    normalises them on its device (:func:`~ssl_platform.data.augment.finish_views`). Labels are
    dropped: the pretraining batch carries no supervision.

    Args:
        views: one :class:`AugmentConfig` per view, e.g. ``recipe("byol", size=32)``.
        seed: None draws fresh views on every call; an int makes every record's views a
            function of (seed, epoch, its ``path``/``key``/``id`` column), whatever the batching.
            Without such a column the position in the batch stands in for the key. View i
            draws the i-th block of uniforms, so adding views never changes the earlier ones.
        epoch: mixed into the randomness so each epoch sees new views; an ``epoch`` column in
            the batch, if present, overrides it per record.
        placement: ``"cpu"`` runs every op here; ``"device"`` only the crop and flip, shipping
            each view's draws (``view{i}_draws``) so that colour, grayscale, blur and solarize
            run batched on the train worker's device, with the same result.
    """

    def __init__(self, views: Sequence[AugmentConfig], seed: int | None = None, epoch: int = 0,
                 placement: str = "cpu"):
        self.views = tuple(views)
        if not self.views or not all(isinstance(c, AugmentConfig) for c in self.views):
            raise ValueError("MultiViewAugment takes a sequence of AugmentConfig, one per view, e.g. recipe('byol')")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: use one of {', '.join(PLACEMENTS)}")
        self.seed, self.epoch, self.placement = seed, epoch, placement

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ssl_platform.data.augment import geometric, photometric, uint8_images, view_draws

        torch.set_num_threads(1)  # one data task per CPU; no oversubscription
        images = uint8_images(batch)
        d = len(DRAWS)
        u = batch_uniforms(batch, len(self.views) * d, self.seed, self.epoch, rows=images.shape[0])  # (B, N*D)

        def make(images: torch.Tensor, u: torch.Tensor) -> dict[str, np.ndarray]:
            out = {}
            for i, cfg in enumerate(self.views):
                key, draws = f"view{i + 1}", u[:, i * d:(i + 1) * d]
                crops = geometric(images, cfg, view_draws(draws))
                if self.placement == "device":
                    out[key], out[key + DRAWS_SUFFIX] = crops.numpy(), draws.numpy()
                else:
                    out[key] = photometric(crops, cfg, view_draws(draws)).numpy()
            return out

        return by_chunks(make, images, u)
