"""Image-caption corpora -> lazy Ray Datasets of ``{"image": uint8 (C, S, S), "caption": str, "path": str}``,
and the CLIP batch transform.

Formats (local paths or pyarrow-filesystem URIs, like :mod:`ssl_platform.data.images`):

- ``parquet``: an image column holding encoded bytes (or Hugging Face's ``{"bytes", "path"}``
  struct) or a path/URI string, and a caption column;
- ``csv`` / ``tsv``: a header row naming the image (path/URI) and caption columns; paths are
  relative to the folder the corpus was named by. TSV is read without quote handling, since
  web captions are full of unbalanced quotes (CC3M's TSVs);
- ``webdataset``: .tar shards of ``KEY.jpg|png|...`` + ``KEY.txt`` samples.

A null or blank caption is skipped as "missing caption", an unreadable image as "corrupt
image" / "empty image" / "missing image", a malformed CSV line as "malformed row", a bad shard
as "unreadable shard" (see :class:`~ssl_platform.data.images.DecodeRecords`).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray.data
import torch

from ssl_platform.data.images import RecordSpec, decode_step, read_table
from ssl_platform.data.inspect import InspectLedger, report, save, scan, show
from ssl_platform.data.randomness import batch_uniforms
from ssl_platform.data.skips import SkipReporter
from ssl_platform.data.sources import Location, detect_format, locate, read_shards

CAPTION_FORMATS = {"parquet": ("parquet",), "csv": ("csv",), "tsv": ("tsv",), "webdataset": ("tar",)}


@dataclass(frozen=True)
class CaptionCorpus:
    """A lazy Dataset of ``{"image": uint8 (C, S, S), "caption": str, "path": str}`` rows."""

    dataset: ray.data.Dataset
    fmt: str
    source: str


def read_caption_corpus(source: str, *, size: int, channels: int, reporter: SkipReporter, fmt: str = "auto",
                        image_column: str = "image", caption_column: str = "caption",
                        label_column: str | None = None) -> CaptionCorpus:
    """Read image-caption pairs from parquet, CSV/TSV or WebDataset shards (see the module docstring).

    Args:
        source: a local path or URI: a file or a folder of them.
        size, channels: images become uint8 (channels, size, size) (short-side resize, centre crop).
        reporter: where bad records are skipped and counted (strict: raise naming them).
        fmt: "auto" (parquet, then csv, tsv, tar, by what the folder holds) or one of
            "parquet", "csv", "tsv", "webdataset".
        image_column: encoded image bytes, or an image path/URI (the only choice in CSV/TSV).
        caption_column: the caption text.
        label_column: when set (evaluation on labelled pairs), rows also carry "class": this
            column's value as text ("" when blank); shards take it from ``KEY.cls``.
    """
    loc = locate(source, what="image-caption corpus")
    if fmt == "auto":
        fmt = detect_format(loc, source, CAPTION_FORMATS)
    if fmt not in CAPTION_FORMATS:
        raise ValueError(f"unknown image-caption corpus format {fmt!r}; use auto, {', '.join(CAPTION_FORMATS)}")
    labelled = (label_column,) if label_column else ()
    if fmt == "parquet":
        raw, spec = read_table(loc, source, image_column, image_column, required=(caption_column, *labelled))
    elif fmt in ("csv", "tsv"):
        raw = read_delimited(loc, source, fmt, (image_column, caption_column, *labelled), reporter)
        spec = RecordSpec(key_column=image_column, ref_column=image_column, root=loc.root, scheme=loc.scheme)
    else:
        raw, spec = read_shards(loc, reporter), RecordSpec(key_column="path", bytes_column="image")
        caption_column, label_column = "txt", "cls" if label_column else None
    spec = replace(spec, caption_column=caption_column, label_column=label_column)
    return CaptionCorpus(decode_step(raw, spec, loc, size, channels, reporter), fmt, source)


class SkipMalformedRows:
    """pyarrow CSV ``invalid_row_handler``: a line with the wrong number of fields is skipped and counted."""

    def __init__(self, reporter: SkipReporter, source: str):
        self.reporter, self.source = reporter, source

    def __call__(self, row) -> str:
        self.reporter.skip(f"{self.source}: {row.text[:80]!r}", "malformed row")
        self.reporter.flush()  # rare, and this handler runs outside the decode batches
        return "skip"


def read_delimited(loc: Location, source: str, fmt: str, columns: tuple[str, ...],
                   reporter: SkipReporter) -> ray.data.Dataset:
    """Raw string rows of CSV/TSV files; the header of the first file must name ``columns``."""
    parse, convert = delimited_options(loc, source, fmt, columns, reporter)
    return ray.data.read_csv(loc.path, filesystem=loc.fs, file_extensions=[fmt], parse_options=parse,
                             convert_options=convert)


def delimited_options(loc: Location, source: str, fmt: str, columns: tuple[str, ...], reporter: SkipReporter):
    """pyarrow's (ParseOptions, ConvertOptions) of a CSV/TSV corpus: ``columns`` as strings, malformed
    lines skipped and counted; ValueError when the first file's header lacks one of ``columns``."""
    import csv

    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter = "\t" if fmt == "tsv" else ","
    first = next(iter(loc.files((fmt,))), None)
    if first is None:
        raise ValueError(f"no .{fmt} files found at {source!r}")
    with loc.fs.open_input_stream(first) as f:
        line = f.read(1 << 16).decode("utf-8", "replace").splitlines()[:1] or [""]
    header = next(csv.reader(line, delimiter=delimiter))
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{first!r} has no column {missing[0]!r} in its header ({', '.join(header)}); "
                         f"name yours with image_column=/caption_column=")
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if fmt == "tsv" else '"',
                               invalid_row_handler=SkipMalformedRows(reporter, loc.scheme + first))
    convert = pacsv.ConvertOptions(include_columns=list(columns), column_types={c: pa.string() for c in columns})
    return parse, convert


# ----------------------------------------------------------------------------- CLIP transform


class CaptionTransform:
    """``map_batches`` callable for CLIP: ``{"image": uint8 (B, C, H, W), "caption": str (B,), "path"}``
    -> ``{"image": uint8 (B, C, size, size), "text": int64 (B, context_length)}``; the train worker
    normalises the image on its device (``data.augment.finish_views``).

    Light augmentation only (CLIP, Radford et al. 2021, trained on a random square crop; open_clip
    uses a random resized crop of area 0.9..1): image-text alignment needs the caption to stay
    true of the view, so no flip by default ("a 7 on the left") and no colour change.

    Args:
        size: output side in pixels.
        context_length: tokens per caption (open_clip's tokenizer pads/truncates).
        seed: None draws fresh crops every call; an int makes every record's crop a function of
            (seed, epoch, its ``path``), whatever the batching.
        epoch: mixed into the randomness (an ``epoch`` column in the batch overrides it).
        crop_scale_min: the crop keeps this fraction of the area or more (up to all of it).
        flip_prob: probability of a horizontal flip.
    """

    def __init__(self, size: int, context_length: int = 77, seed: int | None = None, epoch: int = 0,
                 crop_scale_min: float = 0.9, flip_prob: float = 0.0):
        if not 0.0 < crop_scale_min <= 1.0 or not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"set crop_scale_min in (0, 1] and flip_prob in [0, 1] "
                             f"(got {crop_scale_min}, {flip_prob})")
        self.size, self.context_length, self.seed, self.epoch = size, context_length, seed, epoch
        self.crop_scale_min, self.flip_prob = crop_scale_min, flip_prob

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ssl_models.methods.clip import tokenize
        from ssl_platform.data.transforms import (
            DRAWS,
            by_chunks,
            random_resized_crop,
            uint8_images,
            view_draws,
        )

        torch.set_num_threads(1)  # one data task per CPU; no oversubscription
        images = uint8_images(batch)  # (B, C, H, W)
        u = batch_uniforms(batch, len(DRAWS), self.seed, self.epoch, rows=images.shape[0])  # (B, D)

        def crop(images: torch.Tensor, u: torch.Tensor) -> dict[str, np.ndarray]:
            return {"image": random_resized_crop(images, self.size, self.crop_scale_min, self.flip_prob,
                                                 view_draws(u)).numpy()}

        text = tokenize([str(c) for c in batch["caption"]], self.context_length)  # (B, L) int64
        return {**by_chunks(crop, images, u), "text": text.numpy()}


# ----------------------------------------------------------------------------- inspection


def captions_figure(images: np.ndarray, captions):
    """A grid of (transformed) images, each titled with its caption."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        show(ax, image, "\n".join(textwrap.wrap(str(caption), 28)[:3]), fontsize=8)
    fig.suptitle("images as CLIP sees them, with their captions", fontsize=9)
    return fig


def inspect_image_caption(source: str, out_dir: Path, *, strict: bool = False, size: int = 32, channels: int = 3,
                          fmt: str = "auto", seed: int = 0, context_length: int = 77, **columns: str) -> dict:
    """``sslp data inspect SOURCE --kind image-caption``: counts, skips, one CLIP batch, a PNG of captioned images.

    ``source`` is a path/URI or a built-in caption corpus (its train split). With no valid
    record, ``records`` is 0 and no figure is written (``figure`` is None): the caller stops.
    """
    from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA, caption_split_dataset

    with InspectLedger(strict) as ledger:
        if source in BUILTIN_CAPTION_CORPORA:
            ds = caption_split_dataset(BUILTIN_CAPTION_CORPORA[source](image_size=size, seed=seed)["train"], source)
        else:
            ds = read_caption_corpus(source, size=size, channels=channels, reporter=ledger.reporter, fmt=fmt,
                                     **columns).dataset
        records, batch = scan(ds)
    if not records:
        return report(0, ledger.summary)
    out = CaptionTransform(size, context_length, seed=seed)(batch)
    example = {
        "image": f"{out['image'].dtype} {tuple(out['image'].shape)} in [{out['image'].min()}, {out['image'].max()}]",
        "text": f"int64 {tuple(out['text'].shape)}; first row starts {out['text'][0, :8].tolist()}",
        "caption": [str(c) for c in batch["caption"][:4]],
        "path": [str(p) for p in batch["path"][:3]],
    }
    figure = save(captions_figure(out["image"], batch["caption"]), out_dir, "image_captions.png")
    return report(records, ledger.summary, example, figure)
