"""Corpus -> Ray Dataset of raw records -> batched CPU transforms, ready for TorchTrainer.

One builder per kind of corpus turns a config into the pretraining stream of its method:

| kind | corpus | transform (``map_batches`` on CPU) | batch keys |
|---|---|---|---|
| image | ``digits``, ``digits-m`` or ``data.path`` | ``MultiViewAugment`` (spec.views) | view1 ... viewN (uint8) |
| image-caption | ``digit-captions``, ``digits-m-captions``, ``data.path`` | ``CaptionTransform`` | image, text |
| text | ``python-docs`` or ``data.path`` | ``BertBatcher`` / ``GptBlocks`` (spec.token_batches) | input_ids, ... |
| audio | ``spoken-digits`` or ``data.path`` | ``AudioCrops`` | audio, lengths |

Records stay raw until ``map_batches`` decodes and augments them on CPU workers; the train
workers see finished batches via ``iter_torch_batches``, images as uint8 that the loop
normalises on its device (``data.augment.finish_views``). Transforms draw fresh randomness
on every pass (seed None), so each epoch sees new views and masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.data

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.skips import SkipReporter
from ssl_platform.methods import method_spec


@dataclass
class PretrainData:
    """The pretraining stream of a run and what the method's constructor needs from the data."""

    train: ray.data.Dataset
    derived: dict[str, Any]  # data-derived constructor arguments: in_channels, vocab_size, ...
    description: str  # one line for the run header
    num_records: int | None = None  # known for in-memory built-in corpora
    artifacts: dict[str, Path] = field(default_factory=dict)  # files a checkpoint must carry (tokenizer)


def configure_data_context() -> None:
    """The platform's settings of Ray Data's execution, for every Dataset this process builds
    afterwards (a Dataset keeps a copy of the context it was built under).

    - No progress bars: Ray Data's per-operator bars would drown the training progress line.
    - No per-operator resource reservation (``op_resource_reservation_enabled``): in Ray 2.60 it
      held a decode + augment ``map_batches`` on a 2-core machine to one task at a time for 80%
      of a pass (the operator's CPU budget kept falling to zero while a task ran), 43% of what
      the two cores do. Without it the operator runs one task per free CPU (`sslp bench data`
      prints both side by side); memory stays bounded by the downstream-capacity backpressure,
      which stays on.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.op_resource_reservation_enabled = False


def pretraining_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter,
                     model: dict[str, Any]) -> PretrainData:
    """The stream ``cfg.method`` trains on, from its built-in corpus or ``data.path``.

    ``model`` is the method's architecture with its defaults filled in (the caption transform
    tokenises to the text tower's ``context_length``).
    """
    configure_data_context()
    kind = method_spec(cfg.method.name).data_kind
    data = BUILDERS[kind](cfg, Path(run_dir), reporter, model)
    if data.num_records is None and not data.train.take(1):
        raise ValueError(f"data.path={cfg.data.path}: no usable {kind} record (every record was skipped or the "
                         f"corpus is empty); check the path and data.format, or run "
                         f"`sslp data inspect {cfg.data.path}`")
    return data


def _optional(**values: Any) -> dict[str, Any]:
    """The keyword arguments that are set (config fields left empty mean: the recipe's default)."""
    return {k: v for k, v in values.items() if v is not None}


def _transform(ds: ray.data.Dataset, fn: Callable, cfg: ExperimentConfig) -> ray.data.Dataset:
    # One CPU per transform task; the train workers hold only fractions (see train.resources).
    return ds.map_batches(fn, batch_size=cfg.data.transform_batch_size, batch_format="numpy", num_cpus=1)


# ----------------------------------------------------------------------------- image (the spec's views)

def image_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.builtin import load_image_corpus
    from ssl_platform.data.images import read_image_corpus, split_dataset
    from ssl_platform.data.transforms import MultiViewAugment
    from ssl_platform.views import image_views

    d = cfg.data
    if d.path:
        corpus = read_image_corpus(d.path, size=d.image_size, channels=d.channels, reporter=reporter, fmt=d.format,
                                   image_column=d.image_column, path_column=d.path_column, label_column=d.label_column)
        ds, channels, count, what = corpus.dataset, d.channels, None, f"{d.path} ({corpus.fmt})"
    else:
        split = load_image_corpus(d.corpus, d.image_size, d.val_fraction, cfg.train.seed)["train"]
        ds = split_dataset(split.images, d.corpus, label=split.labels)
        channels, count, what = split.images.shape[1], len(split), f"{d.corpus} ({len(split)} train records)"
    views = image_views(cfg, method_spec(cfg.method.name).views)
    # Shuffle the block order each epoch; rows are shuffled further in the train workers' buffer.
    # data.seed: a fixed block order and fixed views per record (reproducibility checks).
    augment = MultiViewAugment(views, seed=d.seed, placement=cfg.augment_placement())
    ds = _transform(ds.randomize_block_order(seed=d.seed), augment, cfg)
    return PretrainData(ds, {"in_channels": int(channels)}, what, count)


# ----------------------------------------------------------------------------- image-caption (CLIP)

def caption_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.captions import CaptionTransform, read_caption_corpus
    from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA, caption_split_dataset

    d = cfg.data
    if d.path:
        corpus = read_caption_corpus(d.path, size=d.image_size, channels=d.channels, reporter=reporter, fmt=d.format,
                                     image_column=d.image_column, caption_column=d.caption_column)
        ds, channels, count, what = corpus.dataset, d.channels, None, f"{d.path} ({corpus.fmt})"
    else:
        split = BUILTIN_CAPTION_CORPORA[d.corpus](d.image_size, d.val_fraction, cfg.train.seed)["train"]
        ds = caption_split_dataset(split, d.corpus)
        channels, count, what = split.images.shape[1], len(split), f"{d.corpus} ({len(split)} pairs)"
    transform = CaptionTransform(d.image_size, model["context_length"], **_optional(crop_scale_min=d.crop_scale_min,
                                                                           flip_prob=d.flip_prob))
    ds = _transform(ds.randomize_block_order(), transform, cfg)
    return PretrainData(ds, {"in_channels": int(channels), "image_size": d.image_size}, what, count)


# ----------------------------------------------------------------------------- text (masked pairs, blocks)

def text_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.masking import BertBatcher, GptBlocks
    from ssl_platform.data.text import open_text_corpus
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
    if spec.token_batches == "masked_pairs":
        batcher = BertBatcher(tokenizer, d.max_len, mask_prob=d.mask_prob, mask_token_frac=d.mask_token_frac,
                              random_token_frac=d.random_token_frac, next_prob=d.next_prob)
    else:
        batcher = GptBlocks(tokenizer, d.max_len)
    ds = _transform(ds.randomize_block_order(), batcher, cfg)
    derived = {"vocab_size": tokenizer.vocab_size, "max_len": d.max_len}
    what = f"{source} ({kind} tokenizer, {tokenizer.vocab_size} tokens)"
    return PretrainData(ds, derived, what, artifacts={"tokenizer": tokenizer_dir})


# ----------------------------------------------------------------------------- audio (CPC)

def audio_data(cfg: ExperimentConfig, run_dir: Path, reporter: SkipReporter, model: dict) -> PretrainData:
    from ssl_platform.data.audio import AudioCrops, read_audio_corpus
    from ssl_platform.data.spoken_digits import audio_to_dataset, load_spoken_digits_splits

    d = cfg.data
    if d.path:
        ds = read_audio_corpus(d.path, sample_rate=d.sample_rate, reporter=reporter, max_seconds=d.max_audio_seconds,
                               fmt=d.format)
        count, what = None, d.path
    else:
        split = load_spoken_digits_splits(d.sample_rate, d.val_fraction, cfg.train.seed)["train"]
        ds = audio_to_dataset(split)
        count, what = len(split), f"{d.corpus} ({len(split)} train clips)"
    crops = AudioCrops(d.crop_seconds, d.sample_rate, normalize=d.normalize_audio)
    ds = _transform(ds.randomize_block_order(), crops, cfg)
    return PretrainData(ds, {"sample_rate": d.sample_rate}, what, count)


BUILDERS: dict[str, Callable[[ExperimentConfig, Path, SkipReporter, dict], PretrainData]] = {
    "image": image_data, "image-caption": caption_data, "text": text_data, "audio": audio_data,
}
