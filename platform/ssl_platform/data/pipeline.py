"""Corpus -> Ray Dataset of raw records -> batched CPU transforms, ready for TorchTrainer.

Records stay raw (uint8 images) until ``map_batches`` augments them on CPU workers; the train
workers only see finished float batches via ``iter_torch_batches``.
"""

from __future__ import annotations

import numpy as np
import ray.data

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.builtin import ImageSplit, load_image_corpus
from ssl_platform.data.transforms import AugmentConfig, TwoViewAugment


def load_splits(cfg: ExperimentConfig) -> dict[str, ImageSplit]:
    return load_image_corpus(cfg.data.corpus, cfg.data.image_size, cfg.data.val_fraction, cfg.train.seed)


def images_to_dataset(split: ImageSplit, num_blocks: int = 8) -> ray.data.Dataset:
    """An in-memory split as a Dataset of ``{"image": uint8 (C, H, W), "label": int64}`` rows."""
    return ray.data.from_items(
        [{"image": img, "label": int(lbl)} for img, lbl in zip(split.images, split.labels)],
        override_num_blocks=num_blocks,
    )


def augment_config(cfg: ExperimentConfig) -> AugmentConfig:
    d = cfg.data
    return AugmentConfig(
        size=d.image_size,
        crop_scale_min=d.crop_scale_min,
        flip_prob=d.flip_prob,
        jitter_strength=d.jitter_strength,
        jitter_prob=d.jitter_prob,
        blur_prob=d.blur_prob,
    )


def quiet_progress() -> None:
    """Ray Data's per-operator progress bars would drown the training progress line."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def two_view_dataset(cfg: ExperimentConfig, split: ImageSplit) -> ray.data.Dataset:
    """Pretraining stream: every pass over it draws fresh random views on CPU tasks."""
    quiet_progress()
    ds = images_to_dataset(split)
    # Shuffle the block order each epoch; rows are shuffled further in the train workers'
    # local buffer, so no all-to-all shuffle is needed.
    ds = ds.randomize_block_order()
    return ds.map_batches(
        TwoViewAugment(augment_config(cfg)),
        batch_size=cfg.data.transform_batch_size,
        batch_format="numpy",
        num_cpus=1,
    )


def channels(split: ImageSplit) -> int:
    return int(np.asarray(split.images).shape[1])
