"""Built-in ``spoken-digits``: the words zero..nine spoken by 8 espeak-ng voices (British,
American, RP, Scottish, Caribbean and New York accents; male and female variants) at 3 speeds
and 2 pitches, 480 clips of 0.2-0.8 s, 16 kHz mono FLAC, labelled by the word.

The clips are committed as package data (``spoken_digits_data/<word>/<voice>_s<speed>_p<pitch>.flac``,
under 3 MB) so the corpus exists offline on a fresh machine and in CI without espeak-ng;
:mod:`ssl_platform.data.make_spoken_digits` regenerates them. The train/val split is stratified
by word and balanced across voices (each voice gives every word's validation set one clip
before any voice gives two), fixed by the seed, so every run and every probe sees the same
held-out clips.
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_platform.data.audio import decode_audio
from ssl_platform.data.builtin import DIGIT_NAMES

NAME = "spoken-digits"
DATA_DIR = Path(__file__).with_name("spoken_digits_data")
SAMPLE_RATE = 16_000  # the rate the clips are stored at
_CLIP = re.compile(r"^(?P<voice>.+)_s\d+_p\d+$")  # file stem -> voice


def data_dir() -> Path:
    """The folder of committed clips, or a FileNotFoundError that says how to generate them."""
    if not any(DATA_DIR.glob("*/*.flac")):
        raise FileNotFoundError(
            f"the spoken-digits clips are missing from {DATA_DIR}; generate them with "
            f"`apt-get install -y espeak-ng && python -m ssl_platform.data.make_spoken_digits {DATA_DIR}` "
            f"(or reinstall ssl-platform, which ships them)")
    return DATA_DIR


@dataclass(frozen=True)
class AudioSplit:
    """Decoded clips of one split. ``audio``: N float32 (T_i,) arrays; ``labels``: (N,) int64."""

    audio: tuple[np.ndarray, ...]
    labels: np.ndarray
    paths: tuple[str, ...]  # "spoken-digits/<word>/<file>", a key that is the same on every machine
    voices: tuple[str, ...]
    class_names: tuple[str, ...]
    sample_rate: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> AudioSplit:
        return AudioSplit(tuple(self.audio[i] for i in idx), self.labels[idx], tuple(self.paths[i] for i in idx),
                          tuple(self.voices[i] for i in idx), self.class_names, self.sample_rate)


@functools.lru_cache(maxsize=2)
def load_spoken_digits(sample_rate: int = SAMPLE_RATE) -> AudioSplit:
    """All 480 clips, decoded and resampled to ``sample_rate``, in a fixed (sorted) order."""
    root = data_dir()
    files = sorted(root.glob("*/*.flac"))
    labels = np.array([DIGIT_NAMES.index(f.parent.name) for f in files], dtype=np.int64)
    return AudioSplit(
        audio=tuple(decode_audio(f.read_bytes(), sample_rate) for f in files),
        labels=labels,
        paths=tuple(f"{NAME}/{f.parent.name}/{f.name}" for f in files),
        voices=tuple(_CLIP.match(f.stem).group("voice") for f in files),
        class_names=DIGIT_NAMES,
        sample_rate=sample_rate,
    )


def balanced_split(labels: np.ndarray, groups: list[str], val_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): round(val_fraction * n_c) clips of each class c held out, spread over
    the groups (voices) as evenly as possible, within each class and over the whole split; which
    clips, and which groups give an extra one, is fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    total: Counter[str] = Counter()  # held-out clips per group so far, over all classes
    val = []
    for c in np.unique(labels):
        pool = defaultdict(list)  # group -> its shuffled clips of class c
        for i in rng.permutation(np.flatnonzero(labels == c)):
            pool[groups[i]].append(int(i))
        tiebreak = {g: r for r, g in enumerate(rng.permutation(sorted(pool)))}
        taken: Counter[str] = Counter()
        n = len(np.flatnonzero(labels == c))
        for _ in range(min(n - 1, max(1, round(val_fraction * n)))):
            g = min((g for g in pool if pool[g]), key=lambda g: (taken[g], total[g], tiebreak[g]))
            val.append(pool[g].pop())
            taken[g] += 1
            total[g] += 1
    val_idx = np.sort(np.array(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def load_spoken_digits_splits(sample_rate: int = SAMPLE_RATE, val_fraction: float = 0.2,
                              seed: int = 0) -> dict[str, AudioSplit]:
    """The corpus as ``{"train": AudioSplit, "val": AudioSplit}`` (stratified, voice-balanced)."""
    corpus = load_spoken_digits(sample_rate)
    train_idx, val_idx = balanced_split(corpus.labels, list(corpus.voices), val_fraction, seed)
    return {"train": corpus.subset(train_idx), "val": corpus.subset(val_idx)}


def audio_to_dataset(split: AudioSplit, num_blocks: int = 8):
    """An in-memory split as a Dataset of ``{"audio": float32 (T,), "label": int64, "path": str}`` rows."""
    import ray.data

    return ray.data.from_items(
        [{"audio": a, "label": int(y), "path": p}
         for a, y, p in zip(split.audio, split.labels, split.paths, strict=True)],
        override_num_blocks=num_blocks,
    )
