"""Built-in ``digit-captions`` and ``digits-m-captions``: digits paired with varied natural captions.

The images, labels and stratified train/val split are exactly the ``digits`` corpus's
(:func:`~ssl_platform.data.builtin.load_digits_splits`), or the ``digits-m`` corpus's for
``digits-m-captions`` (the digits blended on photo patches), so a CLIP model trained here can
be compared with SimCLR on the same held-out images. Each image gets one caption, a template
filled with its digit as a word ("seven") or a numeral ("7"); the template is a fixed function
of (seed, split, position), so every run sees the same pairs.

Zero-shot evaluation (:func:`zero_shot_prompts`) uses a separate set of phrasings: no prompt
is a training caption, though they share the words ("handwritten", "digit", "number") and both
the word and numeral forms of each class. Accuracy then measures whether the text tower learnt
what the class word means, not whether it memorised whole captions.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import ray.data

from ssl_platform.data.builtin import DIGIT_NAMES, load_digits_m_splits, load_digits_splits
from ssl_platform.data.images import split_dataset

# Training captions: {word} is "seven", {numeral} is "7". No template holds a digit word inside
# another word (like "someone"), and none puts "a" before the digit ("a eight").
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the number {numeral}, written by hand",
    "a photo of the digit {numeral}",
    "a scan of a hand-drawn {numeral}",
    "an ink drawing of the number {word}",
    "the digit {word}",
    "a small grayscale image of the number {word}",
    "a handwritten numeral {numeral}",
    "a pen sketch of the digit {word}",
    "a blurry low-resolution {numeral}",
)

# Zero-shot prompts, averaged per class (CLIP's prompt ensembling); none is a training caption.
ZERO_SHOT_TEMPLATES = (
    "a picture of the number {word}",
    "an image of a handwritten {numeral}",
    "the digit {numeral}, handwritten",
    "a drawing of the number {numeral}",
    "{word}, written with a pen",
)


def fill(template: str, label: int) -> str:
    return template.format(word=DIGIT_NAMES[label], numeral=str(label))


@dataclass(frozen=True)
class CaptionSplit:
    """One split: ``images`` (N, C, S, S) uint8, ``labels`` (N,) int64, ``captions`` (N,) str."""

    images: np.ndarray
    labels: np.ndarray
    captions: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def caption_digits(labels: np.ndarray, seed: int, split: str) -> np.ndarray:
    """(N,) captions: a template per image, drawn from a generator fixed by (seed, split)."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    choice = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))
    return np.array([fill(CAPTION_TEMPLATES[t], int(y)) for t, y in zip(choice, labels, strict=True)], dtype=object)


def load_digit_caption_splits(image_size: int = 32, val_fraction: float = 0.2,
                              seed: int = 0) -> dict[str, CaptionSplit]:
    """The digit-captions corpus as ``{"train": CaptionSplit, "val": CaptionSplit}`` in memory."""
    splits = load_digits_splits(image_size=image_size, val_fraction=val_fraction, seed=seed)
    return {name: CaptionSplit(s.images, s.labels, caption_digits(s.labels, seed, name), s.class_names)
            for name, s in splits.items()}


def load_digits_m_caption_splits(image_size: int = 32, val_fraction: float = 0.2,
                                 seed: int = 0) -> dict[str, CaptionSplit]:
    """The digits-m-captions corpus: ``digits-m``'s images (RGB) with the same kind of captions."""
    splits = load_digits_m_splits(image_size=image_size, val_fraction=val_fraction, seed=seed)
    return {name: CaptionSplit(s.images, s.labels, caption_digits(s.labels, seed, name), s.class_names)
            for name, s in splits.items()}


def caption_split_dataset(split: CaptionSplit, name: str = "digit-captions", num_blocks: int = 8) -> ray.data.Dataset:
    """A split as a Dataset of caption-corpus rows ``{"image", "caption", "path", "label"}``."""
    return split_dataset(split.images, name, num_blocks, caption=split.captions, label=split.labels)


# Zero-shot prompts for classes that are not all digit words (a user's labelled eval.data):
# CLIP's ImageNet prompts, abridged.
GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
                     "a photo of the {}.")


def zero_shot_prompts(class_names: tuple[str, ...] | list[str]) -> list[list[str]]:
    """Per class, the prompts whose mean text embedding is that class's zero-shot classifier.

    When every class name is a digit word ("seven"), the digit prompts, with numeral forms ("7");
    otherwise :data:`GENERIC_TEMPLATES` around each name. Shape: ``len(class_names)`` lists of
    as many prompts each.
    """
    if not all(name in DIGIT_NAMES for name in class_names):
        return [[t.format(name) for t in GENERIC_TEMPLATES] for name in class_names]
    prompts = []
    for name in class_names:
        numeral = str(DIGIT_NAMES.index(name)) if name in DIGIT_NAMES else name
        prompts.append([t.format(word=name, numeral=numeral) for t in ZERO_SHOT_TEMPLATES])
    return prompts


BUILTIN_CAPTION_CORPORA = {"digit-captions": load_digit_caption_splits,
                           "digits-m-captions": load_digits_m_caption_splits}
