"""Built-in corpora that exist offline on a fresh machine.

``digits``: scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels; Alpaydin & Kaynak,
UCI optdigits), upscaled to ``image_size`` with bilinear interpolation and stored as uint8, so
the records look like any other decoded grayscale image corpus. The train/val split is
stratified and fixed by the seed, so every run and every evaluation sees the same held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ImageSplit:
    """Decoded images of one split. ``images``: (N, C, H, W) uint8; ``labels``: (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def load_digits_splits(image_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, ImageSplit]:
    """The digits corpus as ``{"train": ImageSplit, "val": ImageSplit}``.

    Images are (N, 1, image_size, image_size) uint8 in 0..255.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = digits.target.astype(np.int64)

    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels)
    return {
        "train": ImageSplit(images[train_idx], labels[train_idx], DIGIT_NAMES),
        "val": ImageSplit(images[val_idx], labels[val_idx], DIGIT_NAMES),
    }


IMAGE_CORPORA = {"digits": load_digits_splits}


def load_image_corpus(name: str, image_size: int, val_fraction: float, seed: int) -> dict[str, ImageSplit]:
    if name not in IMAGE_CORPORA:
        raise ValueError(f"unknown built-in image corpus {name!r}; known: {', '.join(sorted(IMAGE_CORPORA))}")
    return IMAGE_CORPORA[name](image_size=image_size, val_fraction=val_fraction, seed=seed)
