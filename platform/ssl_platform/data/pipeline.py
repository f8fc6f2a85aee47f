"""Corpus -> Ray Dataset of raw records -> batched CPU transforms, ready for TorchTrainer.

One builder per kind of corpus turns a config into the pretraining stream of its method:

| kind | corpus | transform (``map_batches`` on CPU) | batch keys |
|---|---|---|---|
| image | ``digits``, ``digits-m`` or ``data.path`` | ``MultiViewAugment`` (spec.views) | view1 ... viewN (uint8) |
| image-caption | ``digit-captions``, ``digits-m-captions``, ``data.path`` | ``CaptionTransform`` | image, text |
| text | ``python-docs``, ``python-stdlib``, ``data.path`` | ``BertChunkPairs`` / GPT blocks | input_ids, ... |
| audio | ``spoken-digits`` or ``data.path`` | ``AudioCrops`` | audio, lengths |

Records stay raw until ``map_batches`` decodes and augments them on CPU tasks; the train
workers see finished batches via ``iter_torch_batches``, images as uint8 that the loop
normalises on its device (``data.augment.finish_views``).

Every corpus is an :class:`~ssl_platform.data.ordered.OrderedCorpus` (``PretrainData.ordered``):
each worker reads its ids of the epoch's order (:mod:`ssl_platform.data.order`), in order, with
every record's views, crops and masks a function of (seed, epoch, key), the seed ``data.seed`` or
else ``train.seed``. A resume continues mid-epoch exactly where the checkpoint was (issue 18), and
which records a step trains on does not depend on the number of workers.

- built-in image, image-caption and audio corpora: their decoded records, in the object store;
- ``data.path`` image, image-caption and audio corpora: their listing (:mod:`ssl_platform.data.listed`),
  each record read and decoded by id where it is transformed;
- text: the training split's GPT blocks or BERT sentence chunks (:mod:`ssl_platform.data.ordered_text`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.context import configure_data_context
from ssl_platform.data.listed import list_audio_corpus, list_image_corpus, listed_corpus
from ssl_platform.data.ordered import OrderedCorpus, ordered_corpus
from ssl_platform.data.skips import SkipReporter
from ssl_platform.methods import method_spec


@dataclass
class PretrainData:
    """The pretraining stream of a run and what the method's constructor needs from the data."""

    ordered: OrderedCorpus  # the records, which each worker reads in the epoch's order (exact resume)
    derived: dict[str, Any]  # data-derived constructor arguments: in_channels, vocab_size, ...
    description: str  # one line for the run header
    artifacts: dict[str, Path] = field(default_factory=dict)  # files a checkpoint must carry (tokenizer)

    @property
    def num_records(self) -> int:
        return self.ordered.num_records


def pretraining_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter,
                     model: dict[str, Any]) -> PretrainData:
    """The stream ``cfg.method`` trains on, from its built-in corpus or ``data.path``.

    ``model`` is the method's architecture with its defaults filled in (the caption transform
    tokenises to the text tower's ``context_length``).
    """
    configure_data_context()
    kind = method_spec(cfg.method.name).data_kind
    data = BUILDERS[kind](cfg, Path(run_dir), reporter, model)
    if data.num_records == 0:
        raise ValueError(f"data.path={cfg.data.path}: no usable {kind} record (every record was skipped or the "
                         f"corpus is empty); check the path and data.format, or run "
                         f"`sslp data inspect {cfg.data.path}`")
    return data


# Records per Ray Data task (``data.transform_batch_size`` left empty). A task has a fixed cost of
# ~10 ms; two views of a 32-px image take ~0.1 ms on a core, so 256 records were ~25 ms of work and
# the cost a third of it. `sslp bench data` at 32 px, 2 cores, 32768 images (2026-12-05): 26-28k views/s
# in tasks of 256 records, 32-42k in 1024, 45-50k in 2048, 52-54k in 4096. The work per record grows
# with the pixels, so the records fall with the side's square down to 256 (~0.5 s of work at 224 px,
# where the chunked augmentation makes the batch's size not matter for the transform itself).
SMALL_IMAGE_RECORDS, SMALL_IMAGE_SIDE, DEFAULT_RECORDS = 2048, 32, 256


def transform_records(cfg: ExperimentConfig) -> int:
    """Records per ``map_batches`` call of ``cfg``'s pretraining stream: ``data.transform_batch_size``,
    else :func:`auto_transform_records`."""
    if cfg.data.transform_batch_size is not None:
        return cfg.data.transform_batch_size
    return auto_transform_records(cfg)


def auto_transform_records(cfg: ExperimentConfig) -> int:
    """What an empty ``data.transform_batch_size`` gives: for images, 2048 records at 32 px and less,
    in inverse proportion to the pixels above that (rounded down to a power of two: 1024 at 40 px,
    512 at 48-64 px), never under 256 (from 91 px on); 256 for text and audio."""
    if method_spec(cfg.method.name).data_kind not in ("image", "image-caption"):
        return DEFAULT_RECORDS
    scaled = SMALL_IMAGE_RECORDS * SMALL_IMAGE_SIDE ** 2 // max(cfg.data.image_size, SMALL_IMAGE_SIDE) ** 2
    return max(DEFAULT_RECORDS, 1 << (scaled.bit_length() - 1))  # the power of two at or below


def _optional(**values: Any) -> dict[str, Any]:
    """The keyword arguments that are set (config fields left empty mean: the recipe's default)."""
    return {k: v for k, v in values.items() if v is not None}


def order_seed(cfg: ExperimentConfig) -> int:
    """The seed of an ordered corpus's order and views: ``data.seed``, else ``train.seed``."""
    return cfg.data.seed if cfg.data.seed is not None else cfg.train.seed


# ----------------------------------------------------------------------------- image (the spec's views)

def image_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.builtin import load_image_corpus
    from ssl_platform.data.transforms import MultiViewAugment
    from ssl_platform.views import image_views

    d = cfg.data
    views = image_views(cfg, method_spec(cfg.method.name).views)
    if not d.path:  # in memory: every worker reads its ids of the epoch's order
        split = load_image_corpus(d.corpus, d.image_size, d.val_fraction, cfg.train.seed)["train"]
        seed = order_seed(cfg)
        make_views = partial(MultiViewAugment, views, seed=seed, placement=cfg.augment_placement())
        ordered = ordered_corpus(d.corpus, {"image": split.images, "path": _keys(d.corpus, len(split))}, seed,
                                 make_views, image_size=d.image_size, views=repr(views))
        return PretrainData(ordered, {"in_channels": int(split.images.shape[1])},
                            f"{d.corpus} ({len(split)} train records)")
    listing = list_image_corpus(d.path, size=d.image_size, channels=d.channels, reporter=reporter, fmt=d.format,
                                image_column=d.image_column, path_column=d.path_column, label_column=d.label_column)
    seed = order_seed(cfg)
    make_views = partial(MultiViewAugment, views, seed=seed, placement=cfg.augment_placement())
    ordered = listed_corpus(listing, seed, make_views, image_size=d.image_size, channels=d.channels, views=repr(views))
    return PretrainData(ordered, {"in_channels": int(d.channels)}, f"{d.path} ({listing.fmt}, {len(listing)} records)")


def _keys(name: str, n: int) -> np.ndarray:
    """(n,) the record keys of a built-in split, ``NAME/000042`` (those of ``images.split_dataset``)."""
    return np.array([f"{name}/{i:06d}" for i in range(n)], dtype=object)


# ----------------------------------------------------------------------------- image-caption (CLIP)

def caption_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.captions import CaptionTransform
    from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA

    d = cfg.data
    options = _optional(crop_scale_min=d.crop_scale_min, flip_prob=d.flip_prob)
    if not d.path:  # in memory: every worker reads its ids of the epoch's order
        split = BUILTIN_CAPTION_CORPORA[d.corpus](d.image_size, d.val_fraction, cfg.train.seed)["train"]
        seed = order_seed(cfg)
        make = partial(CaptionTransform, d.image_size, model["context_length"], seed=seed, **options)
        ordered = ordered_corpus(d.corpus, {"image": split.images, "caption": np.asarray(split.captions, dtype=object),
                                            "path": _keys(d.corpus, len(split))},
                                 seed, make, image_size=d.image_size, context_length=model["context_length"], **options)
        return PretrainData(ordered, {"in_channels": int(split.images.shape[1]), "image_size": d.image_size},
                            f"{d.corpus} ({len(split)} pairs)")
    listing = list_image_corpus(d.path, size=d.image_size, channels=d.channels, reporter=reporter, fmt=d.format,
                                image_column=d.image_column, caption_column=d.caption_column)
    seed = order_seed(cfg)
    make = partial(CaptionTransform, d.image_size, model["context_length"], seed=seed, **options)
    ordered = listed_corpus(listing, seed, make, image_size=d.image_size, channels=d.channels,
                            context_length=model["context_length"], **options)
    return PretrainData(ordered, {"in_channels": int(d.channels), "image_size": d.image_size},
                        f"{d.path} ({listing.fmt}, {len(listing)} pairs)")


# ----------------------------------------------------------------------------- text (masked pairs, blocks)

def text_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.masking import pack_blocks
    from ssl_platform.data.ordered import AsIs
    from ssl_platform.data.ordered_text import BertChunkPairs, bert_chunks, documents_digest, documents_in_order
    from ssl_platform.data.text import open_text_corpus
    from ssl_platform.data.text_corpora import load_text_corpus
    from ssl_platform.data.tokenizer import TokenizerConfig, load_or_train_tokenizer

    d = cfg.data
    source = d.path or d.corpus
    ds = open_text_corpus(source, reporter=reporter, split="train", val_fraction=d.val_fraction, seed=cfg.train.seed,
                          unit=d.text_unit, text_field=d.text_field, fmt=d.format)
    spec = method_spec(cfg.method.name)
    kind = d.tokenizer if d.tokenizer != "auto" else spec.tokenizer
    # Trained once per run on the training split and saved with it; a resumed run loads it.
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer = load_or_train_tokenizer(tokenizer_dir, ds, TokenizerConfig(kind=kind, vocab_size=d.vocab_size))
    derived = {"vocab_size": tokenizer.vocab_size, "max_len": d.max_len}
    what = f"{source} ({kind} tokenizer, {tokenizer.vocab_size} tokens)"
    # The training split's documents in a fixed order, cut once into the records an epoch reads in its order.
    settings = {"tokenizer": kind, "vocab_size": tokenizer.vocab_size, "max_len": d.max_len}
    if d.path:
        texts, keys = documents_in_order(ds)
        settings["documents"] = documents_digest(texts, keys)
    else:
        docs = load_text_corpus(d.corpus, d.val_fraction, cfg.train.seed)["train"]
        texts, keys = [doc.text for doc in docs], [doc.name for doc in docs]
    if spec.token_batches == "masked_pairs":  # BERT: sentence chunks, paired and masked per epoch
        records, shared = bert_chunks(tokenizer, texts, keys, d.max_len)
        masking = {"next_prob": d.next_prob, "mask_prob": d.mask_prob, "mask_token_frac": d.mask_token_frac,
                   "random_token_frac": d.random_token_frac}
        transform, unit = partial(BertChunkPairs, str(tokenizer_dir), d.max_len, order_seed(cfg), **masking), "chunks"
        settings.update(masking)
    else:  # GPT: one token stream cut into blocks, read as they are
        records = pack_blocks(tokenizer.encode_batch(texts), block_size=d.max_len, eot_id=tokenizer.eot_id,
                              pad_id=tokenizer.pad_id)
        transform, unit, shared = AsIs, "blocks", {}
    ordered = ordered_corpus(source, records, order_seed(cfg), transform, shared=shared, **settings)
    return PretrainData(ordered, derived, f"{what[:-1]}, {ordered.num_records} {unit})",
                        artifacts={"tokenizer": tokenizer_dir})


# ----------------------------------------------------------------------------- audio (CPC)

def audio_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.audio import AudioCrops
    from ssl_platform.data.spoken_digits import load_spoken_digits_splits

    d = cfg.data
    if not d.path:  # in memory: every worker reads its ids of the epoch's order
        split = load_spoken_digits_splits(d.sample_rate, d.val_fraction, cfg.train.seed)["train"]
        seed = order_seed(cfg)
        make = partial(AudioCrops, d.crop_seconds, d.sample_rate, seed=seed, normalize=d.normalize_audio)
        clips = np.empty(len(split), dtype=object)
        clips[:] = list(split.audio)  # variable lengths: one array per clip
        ordered = ordered_corpus(d.corpus, {"audio": clips, "label": split.labels,
                                            "path": np.asarray(split.paths, dtype=object)},
                                 seed, make, sample_rate=d.sample_rate, crop_seconds=d.crop_seconds,
                                 normalize=d.normalize_audio)
        return PretrainData(ordered, {"sample_rate": d.sample_rate}, f"{d.corpus} ({len(split)} train clips)")
    listing = list_audio_corpus(d.path, sample_rate=d.sample_rate, reporter=reporter, fmt=d.format)
    seed = order_seed(cfg)
    make = partial(AudioCrops, d.crop_seconds, d.sample_rate, seed=seed, normalize=d.normalize_audio)
    ordered = listed_corpus(listing, seed, make, sample_rate=d.sample_rate, crop_seconds=d.crop_seconds,
                            normalize=d.normalize_audio)
    return PretrainData(ordered, {"sample_rate": d.sample_rate}, f"{d.path} ({len(listing)} files)")


BUILDERS: dict[str, Callable[[ExperimentConfig, Path, SkipReporter, dict], PretrainData]] = {
    "image": image_data, "image-caption": caption_data, "text": text_data, "audio": audio_data,
}
