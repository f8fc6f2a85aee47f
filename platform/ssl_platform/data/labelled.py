"""Labelled data for evaluation: a built-in corpus's splits, or the user's own (``eval.data``).

The image, CLIP and CPC protocols and the online metric take their labelled train/held-out
splits from here. Without ``eval.data`` they are the built-in corpus's (``data.corpus``); with
it, a labelled corpus of the user's, read with the training readers (so the same formats, and a
bad record is skipped and counted, or with ``data.strict`` fails naming it):

- SimCLR, BYOL, Barlow Twins, VICReg: an image folder with a sub-folder per class, parquet with
  integer labels in ``data.label_column``, or WebDataset shards with a ``KEY.cls``;
- CLIP: parquet or CSV/TSV with ``data.image_column``, ``data.caption_column`` and the class in
  ``data.label_column`` (names or integers), or shards with ``KEY.txt`` and ``KEY.cls``;
- CPC: an audio folder with a sub-folder per class.

Images are decoded at ``data.image_size`` with the channels the encoder was trained on. The
records are ordered by their key (path) and split by class, ``data.val_fraction`` of each held
out with ``train.seed``, so the split does not depend on how Ray read the files. The corpus is
held in the driver's memory (as the built-in ones are): thousands to tens of thousands of
examples, not a pretraining corpus.

A corpus without labels, with a single class, with a class of one example, or with no record
that decodes is refused with one line (:class:`ValueError`) before training starts: the driver
calls :func:`check_eval_data`, which reads it once per process (the end-of-run evaluation in
the same process reuses it).

    splits = image_splits(cfg)   # {"train": ImageSplit, "val": ImageSplit}
    eval_source(cfg)             # "pets/" or "digits-m": what the tables' titles name
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.skips import SkipReporter, format_summary


@dataclass
class EvalCorpus:
    """What ``eval.data`` gave: its splits, and the records skipped while reading it."""

    splits: dict
    source: str
    skipped: dict = field(default_factory=dict)  # a skip summary ({"total", "by_reason", "examples"})

    @property
    def note(self) -> str:
        """A sentence for the results' notes ("" when nothing was skipped)."""
        if not self.skipped.get("total"):
            return ""
        return f"eval.data={self.source}: {format_summary(self.skipped)}."


_CACHE: dict[tuple, EvalCorpus] = {}  # one read per process and setting (see check_eval_data)


def eval_source(cfg: ExperimentConfig) -> str:
    """What the evaluation tables are computed on: ``eval.data``, or the built-in corpus."""
    return cfg.eval.data or cfg.data.corpus


def uses_eval_data(cfg: ExperimentConfig) -> bool:
    """Whether this run's evaluation (end-of-run or online) reads ``eval.data``."""
    return bool(cfg.eval.data) and bool(cfg.eval.enabled or cfg.eval.online_every)


def check_eval_data(cfg: ExperimentConfig) -> EvalCorpus | None:
    """Read and check ``eval.data`` (on the driver, before training); ValueError in one line."""
    if not uses_eval_data(cfg):
        return None
    return eval_corpus(cfg)


def eval_corpus(cfg: ExperimentConfig) -> EvalCorpus:
    """``eval.data``'s labelled splits for ``cfg``'s method, read once per process."""
    from ssl_platform.methods import method_spec  # ssl_models and torch: not in Ray Data's tasks

    kind = method_spec(cfg.method.name).data_kind
    if kind not in READERS:
        raise ValueError(f"eval.data: {cfg.method.name} is evaluated on its own corpus's held-out split; "
                         f"remove eval.data")
    d = cfg.data
    key = (kind, cfg.eval.data, d.image_size, _channels(cfg), d.sample_rate, d.val_fraction, cfg.train.seed,
           d.label_column, d.image_column, d.path_column, d.caption_column, d.strict, cfg.eval.format)
    if key not in _CACHE:
        _CACHE.clear()  # one corpus at a time: it can be large
        _CACHE[key] = _read(cfg, kind)
    return _CACHE[key]


def image_splits(cfg: ExperimentConfig) -> tuple[dict, str]:
    """``({"train": ImageSplit, "val": ImageSplit}, note)`` of an image method's evaluation."""
    if cfg.eval.data:
        corpus = eval_corpus(cfg)
        return corpus.splits, corpus.note
    from ssl_platform.data.builtin import load_image_corpus

    d = cfg.data
    return load_image_corpus(d.corpus, d.image_size, d.val_fraction, cfg.train.seed), ""


def caption_splits(cfg: ExperimentConfig) -> tuple[dict, str]:
    """``({"train": CaptionSplit, "val": CaptionSplit}, note)`` of CLIP's evaluation."""
    if cfg.eval.data:
        corpus = eval_corpus(cfg)
        return corpus.splits, corpus.note
    from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA

    d = cfg.data
    return BUILTIN_CAPTION_CORPORA[d.corpus](d.image_size, d.val_fraction, cfg.train.seed), ""


def audio_splits(cfg: ExperimentConfig) -> tuple[dict, str]:
    """``({"train": AudioSplit, "val": AudioSplit}, note)`` of CPC's evaluation."""
    if cfg.eval.data:
        corpus = eval_corpus(cfg)
        return corpus.splits, corpus.note
    from ssl_platform.data.spoken_digits import load_spoken_digits_splits

    d = cfg.data
    return load_spoken_digits_splits(d.sample_rate, d.val_fraction, cfg.train.seed), ""


# ----------------------------------------------------------------------------- reading eval.data


def _channels(cfg: ExperimentConfig) -> int:
    from ssl_platform.methods import BUILTIN_CHANNELS

    return cfg.data.channels if cfg.data.path else BUILTIN_CHANNELS.get(cfg.data.corpus, 3)


def _read(cfg: ExperimentConfig, kind: str) -> EvalCorpus:
    """Read the whole corpus through a ledger of its own, then label, check and split it."""
    import ray

    from ssl_platform.data.skips import get_or_create_ledger, ledger_name, skip_summary

    source = cfg.eval.data
    name = ledger_name(f"{cfg.name}-eval-data")
    ledger = get_or_create_ledger(name)
    try:
        ray.get(ledger.reset.remote())
        rows = READERS[kind](cfg, SkipReporter(name, cfg.data.strict))
        skipped = skip_summary(ledger)
    finally:
        ray.kill(ledger)
    class_names = rows.pop("class_names")
    rows = _by_key(rows)
    unlabelled = rows["label"] < 0
    if unlabelled.any():  # some files outside the class folders, or rows without a label
        skipped = _add_skips(skipped, "no label", rows["key"][unlabelled], int(unlabelled.sum()))
        rows = {k: v[~unlabelled] for k, v in rows.items()}
    total = len(rows["label"]) + skipped.get("total", 0)
    if len(rows["label"]) == 0:
        if skipped.get("by_reason", {}).get("no label") == total:
            raise ValueError(f"eval.data={source} has no labels: {LABEL_HINTS[kind]}")
        raise ValueError(f"eval.data={source}: none of its {total} records can be used ({format_summary(skipped)})")
    train_idx, val_idx = stratified_split(rows["label"], class_names, cfg.data.val_fraction, cfg.train.seed, source)
    splits = {"train": SPLIT_TYPES[kind](rows, train_idx, class_names, cfg),
              "val": SPLIT_TYPES[kind](rows, val_idx, class_names, cfg)}
    corpus = EvalCorpus(splits, source, skipped)
    print(f"evaluating on eval.data={source}: {len(train_idx)} train / {len(val_idx)} held-out examples, "
          f"{len(class_names)} classes" + (f"; {format_summary(skipped)}" if skipped.get("total") else ""),
          flush=True)
    return corpus


LABEL_HINTS = {
    "image": "put each class's images in a sub-folder of its own (PATH/cat/1.png, PATH/dog/2.png), give "
             "parquet an integer label column (data.label_column=...), or shards a KEY.cls",
    "image-caption": "give each row its class in a column (data.label_column=..., class names or integers), "
                     "or shards a KEY.cls",
    "audio": "put each class's clips in a sub-folder of its own (PATH/yes/1.wav, PATH/no/2.wav)",
}


def _add_skips(summary: dict, reason: str, keys: np.ndarray, n: int) -> dict:
    by_reason = {**summary.get("by_reason", {}), reason: n}
    examples = {**summary.get("examples", {}), reason: [str(k) for k in keys[:5]]}
    return {"total": summary.get("total", 0) + n, "by_reason": by_reason, "examples": examples}


def _by_key(rows: dict) -> dict:
    """Rows ordered by their key, so the split does not depend on the order Ray read them in."""
    order = np.argsort(rows["key"].astype(str), kind="stable")
    return {k: v[order] for k, v in rows.items()}


def stratified_split(labels: np.ndarray, class_names: tuple[str, ...], val_fraction: float, seed: int,
                     source: str) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): ``round(val_fraction * n_c)`` of each class's n_c examples held out (at
    least one, and at least one left to train on), which ones fixed by ``seed``."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"eval.data={source} has one class ({class_names[classes[0]]}); a probe needs at least 2")
    if counts.min() < 2:
        lonely = class_names[classes[np.argmin(counts)]]
        raise ValueError(f"eval.data={source}: class {lonely!r} has 1 example; every class needs at least 2 "
                         f"(one to fit the probe, one held out)")
    rng = np.random.default_rng(seed)
    val = []
    for c, n in zip(classes, counts, strict=True):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.extend(members[: min(n - 1, max(1, round(val_fraction * n)))])
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def _collect(ds, columns: tuple[str, ...]) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for c in columns:
            out[c].extend(batch[c])
    return out


def _classes(values: list) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class ids and names of raw label values: integers keep their value (named by it), strings are
    sorted (numerically when they all are numbers); a blank value is unlabelled (-1)."""
    text = ["" if v is None else (v.decode() if isinstance(v, bytes) else str(v)).strip() for v in values]
    names = sorted({t for t in text if t}, key=lambda t: (0, int(t), "") if re.fullmatch(r"-?\d+", t) else (1, 0, t))
    index = {t: i for i, t in enumerate(names)}
    return np.array([index.get(t, -1) for t in text], dtype=np.int64), tuple(names)


def _read_images(cfg: ExperimentConfig, reporter: SkipReporter) -> dict:
    from ssl_platform.data.images import read_image_corpus

    d = cfg.data
    corpus = read_image_corpus(cfg.eval.data, size=d.image_size, channels=_channels(cfg), reporter=reporter,
                               fmt=cfg.eval.format, image_column=d.image_column, path_column=d.path_column,
                               label_column=d.label_column)
    rows = _collect(corpus.dataset, ("image", "label", "path"))
    labels = np.asarray(rows["label"], dtype=np.int64)
    # Folder classes, or integer labels that name themselves (ids kept: a probe only needs them distinct).
    class_names = corpus.class_names or tuple(str(i) for i in range(int(labels.max(initial=-1)) + 1))
    return {"image": _stack(rows["image"]), "label": labels, "key": np.asarray(rows["path"], dtype=object),
            "class_names": class_names}


def _read_captions(cfg: ExperimentConfig, reporter: SkipReporter) -> dict:
    from ssl_platform.data.captions import read_caption_corpus

    d = cfg.data
    corpus = read_caption_corpus(cfg.eval.data, size=d.image_size, channels=_channels(cfg), reporter=reporter,
                                 fmt=cfg.eval.format, image_column=d.image_column, caption_column=d.caption_column,
                                 label_column=d.label_column)
    rows = _collect(corpus.dataset, ("image", "caption", "class", "path"))
    labels, class_names = _classes(rows["class"])
    return {"image": _stack(rows["image"]), "caption": np.asarray(rows["caption"], dtype=object), "label": labels,
            "key": np.asarray(rows["path"], dtype=object), "class_names": class_names}


def _read_audio(cfg: ExperimentConfig, reporter: SkipReporter) -> dict:
    from ssl_platform.data.audio import audio_class_names, read_audio_corpus

    d = cfg.data
    ds = read_audio_corpus(cfg.eval.data, sample_rate=d.sample_rate, reporter=reporter,
                           max_seconds=d.max_audio_seconds, fmt=cfg.eval.format)
    rows = _collect(ds, ("audio", "label", "path"))
    audio = np.empty(len(rows["audio"]), dtype=object)
    audio[:] = [np.asarray(a, dtype=np.float32) for a in rows["audio"]]
    return {"audio": audio, "label": np.asarray(rows["label"], dtype=np.int64),
            "key": np.asarray(rows["path"], dtype=object),
            "class_names": audio_class_names(cfg.eval.data, cfg.eval.format)}


def _stack(images: list) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)


def _image_split(rows: dict, idx: np.ndarray, class_names: tuple[str, ...], cfg: ExperimentConfig):
    from ssl_platform.data.builtin import ImageSplit

    return ImageSplit(rows["image"][idx], rows["label"][idx], class_names)


def _caption_split(rows: dict, idx: np.ndarray, class_names: tuple[str, ...], cfg: ExperimentConfig):
    from ssl_platform.data.digit_captions import CaptionSplit

    return CaptionSplit(rows["image"][idx], rows["label"][idx], rows["caption"][idx], class_names)


def _audio_split(rows: dict, idx: np.ndarray, class_names: tuple[str, ...], cfg: ExperimentConfig):
    from ssl_platform.data.spoken_digits import AudioSplit

    keys = tuple(str(k) for k in rows["key"][idx])
    return AudioSplit(tuple(rows["audio"][idx]), rows["label"][idx], keys, tuple(str(Path(k).parent) for k in keys),
                      class_names, cfg.data.sample_rate)


READERS: dict[str, Callable] = {"image": _read_images, "image-caption": _read_captions, "audio": _read_audio}
SPLIT_TYPES: dict[str, Callable] = {"image": _image_split, "image-caption": _caption_split, "audio": _audio_split}
