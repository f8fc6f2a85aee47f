"""Image corpora a user brings -> lazy Ray Datasets of decoded, fixed-size uint8 images.

Three formats, local or behind any URI pyarrow's filesystems take (``s3://``, ``gs://``):

- ``folder``: a tree of .png/.jpg/.jpeg/.bmp/.webp files. Files inside a first-level
  sub-folder are labelled by it (the sorted names of the folders holding images -> ids
  0..K-1, see :mod:`~ssl_platform.data.sources`); files directly in the root get label -1.
- ``parquet``: one row per image with an image-bytes column (plain binary, or the
  ``{"bytes", "path"}`` struct Hugging Face datasets write) or a path column (relative to the
  folder the corpus was named by, absolute, or a URI), and an optional integer label column.
- ``webdataset``: .tar shards of samples ``KEY.jpg|png|...`` plus optional ``KEY.cls``
  (an integer label) and ``KEY.txt`` (a caption), read as a stream.

Files are read as raw bytes and decoded in ``map_batches`` by :class:`DecodeRecords`, so a
corrupt image, an empty record or an unreadable shard is skipped and counted through the
:class:`~ssl_platform.data.skips.SkipReporter` (or, strict, fails naming it) instead of
crashing inside Ray's own readers, which raise on the first bad file. Rows follow the image
contract: ``{"image": uint8 (C, S, S), "label": int64, "path": str}``.

    corpus = read_image_corpus("data/pets", size=64, channels=3, reporter=SkipReporter(name))
    corpus.dataset, corpus.class_names  # lazy Dataset, ("cat", "dog")
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from ssl_platform.data.inspect import InspectLedger, report, save, scan, show
from ssl_platform.data.skips import SkipReporter
from ssl_platform.data.sources import (
    IMAGE_SUFFIXES,
    Location,
    detect_format,
    filesystem,
    folder_classes,
    folder_labels,
    locate,
    read_shards,
)

DECODE_BATCH_SIZE = 64  # records per decode task call: small, so one bad batch costs little
FETCH_THREADS = 8  # concurrent reads of path-referenced images (hides object-store latency)


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class RecordSpec:
    """Which columns of a raw batch hold what, so one decoder serves every format.

    Exactly one of ``bytes_column`` (encoded images) and ``ref_column`` (paths/URIs to read)
    is set. ``key_column`` names each record for skip reports, seeds and the output ``path``.
    """

    key_column: str
    bytes_column: str | None = None
    ref_column: str | None = None
    label_column: str | None = None  # integer ids (missing -> -1); caption corpora: the class, as text
    caption_column: str | None = None  # set for image-caption corpora: rows carry "caption" (and "class"), not "label"
    class_names: tuple[str, ...] = ()  # folder format: the first folder under root names the class
    root: str = ""  # folder labels and relative refs are taken from here
    scheme: str = ""  # prefixed to keys so reports show the user's URI
    row_suffix: str | None = None  # parquet bytes rows: a column (row hash) appended to the file key
    slots: bool = False  # rows also carry "slot": their position in the input batch (a listed corpus fills the gaps)


class DecodeRecords:
    """``map_batches`` callable: raw records -> decoded rows, skipping (and counting) bad ones.

    Skip reasons: "missing caption" (null or blank caption), "missing image" (a null image cell
    or path, a referenced file that cannot be read, a shard sample with no image), "empty image"
    (zero-length bytes), "corrupt image" (bytes no decoder reads), "bad label" (a label that is
    not an integer).
    """

    def __init__(self, spec: RecordSpec, size: int, channels: int, reporter: SkipReporter, fs: pafs.FileSystem):
        self.spec, self.size, self.channels, self.reporter, self.fs = spec, size, channels, reporter, fs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self.spec
        if s.ref_column:  # name path-referenced images by where they were read from
            keys = [self._display(r) for r in batch[s.ref_column]]
        else:
            keys = [s.scheme + str(k) for k in batch[s.key_column]]
        if s.row_suffix:
            keys = [f"{k}#{int(h):016x}" for k, h in zip(keys, batch[s.row_suffix], strict=True)]
        keep = np.ones(len(keys), bool)
        captions = self._captions(batch, keys, keep) if s.caption_column else None
        labels = self._labels(batch, keys, keep) if not s.caption_column else None
        classes = self._class_values(batch) if s.caption_column and s.label_column else None
        blobs = self._blobs(batch, keys, keep)
        empty = [i for i in np.flatnonzero(keep) if not blobs[i]]
        for i in empty:
            self.reporter.skip(keys[i], "missing image" if blobs[i] is None else "empty image")
        keep[empty] = False
        idx = np.flatnonzero(keep)
        # Imported here, where it runs: decoding needs torchvision, and Ray Data's coordinators
        # unpickle this callable without calling it (see data.transforms).
        from ssl_platform.data.decode import decode_image_bytes

        images, failed = decode_image_bytes([blobs[i] for i in idx], self.size, self.channels)
        for j in failed:
            self.reporter.skip(keys[idx[j]], "corrupt image")
        idx = np.delete(idx, failed)
        self.reporter.flush()
        out = {"image": images, "path": np.array([keys[i] for i in idx], dtype=object)}
        if s.slots:
            out["slot"] = idx.astype(np.int64)
        if captions is not None:
            out["caption"] = np.array([captions[i] for i in idx], dtype=object)
            if classes is not None:
                out["class"] = np.array([classes[i] for i in idx], dtype=object)
        else:
            out["label"] = labels[idx]
        return out

    def _captions(self, batch, keys, keep) -> list[str]:
        captions = []
        for i, c in enumerate(batch[self.spec.caption_column]):
            c = c.decode("utf-8", "replace") if isinstance(c, bytes) else ("" if c is None else str(c))
            if not c.strip():
                self.reporter.skip(keys[i], "missing caption")
                keep[i] = False
            captions.append(c.strip())
        return captions

    def _class_values(self, batch) -> list[str]:
        """A caption corpus's class of each row as text ("" when it has none): names or integers."""
        column = self.spec.label_column
        if column not in batch:
            return [""] * len(batch[self.spec.key_column])
        return ["" if v is None or (isinstance(v, float) and np.isnan(v))
                else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip() for v in batch[column]]

    def _labels(self, batch, keys, keep) -> np.ndarray:
        s = self.spec
        if s.class_names:  # folder format
            return folder_labels(batch[s.key_column], s.root, s.class_names)
        if not s.label_column or s.label_column not in batch:
            return np.full(len(keys), -1, np.int64)
        labels = np.full(len(keys), -1, np.int64)
        for i, v in enumerate(batch[s.label_column]):
            if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, (str, bytes)) and not v.strip()):
                continue  # unlabelled
            try:
                labels[i] = int(v)
            except (TypeError, ValueError):
                self.reporter.skip(keys[i], "bad label")
                keep[i] = False
        return labels

    def _blobs(self, batch, keys, keep) -> list[bytes | None]:
        s = self.spec
        if s.bytes_column:
            values = list(batch[s.bytes_column])
            # Hugging Face image columns are {"bytes": ..., "path": ...}; fall back to the path.
            refs = [v.get("path") if isinstance(v, dict) and not v.get("bytes") else None for v in values]
            values = [v.get("bytes") if isinstance(v, dict) else v for v in values]
        else:
            values, refs = [None] * len(keys), list(batch[s.ref_column])
        todo = [i for i in np.flatnonzero(keep) if refs[i]]
        if todo:
            with ThreadPoolExecutor(min(FETCH_THREADS, len(todo))) as pool:
                for i, blob in zip(todo, pool.map(lambda i: self._read(str(refs[i])), todo), strict=True):
                    if blob is None:
                        self.reporter.skip(keys[i], "missing image")
                        keep[i] = False
                    values[i] = blob
        if s.ref_column:
            for i in np.flatnonzero(keep):
                if not refs[i]:  # a null path names no image at all
                    self.reporter.skip(keys[i], "missing image")
                    keep[i] = False
        return [None if v is None else bytes(v) for v in values]

    def _locate(self, ref: str) -> tuple[pafs.FileSystem, str]:
        if "://" in ref:
            return filesystem(ref)[:2]
        return self.fs, ref if ref.startswith("/") else posixpath.join(self.spec.root, ref)

    def _display(self, ref) -> str:
        if ref is None or "://" in str(ref):
            return str(ref)
        return self.spec.scheme + self._locate(str(ref))[1]

    def _read(self, ref: str) -> bytes | None:
        try:
            fs, path = self._locate(ref)
            with fs.open_input_file(path) as f:
                return f.read()
        except (OSError, ValueError):  # ValueError: a URI that cannot be opened (pa.ArrowInvalid is one too)
            return None


def decode_step(ds: ray.data.Dataset, spec: RecordSpec, loc: Location, size: int, channels: int,
                reporter: SkipReporter) -> ray.data.Dataset:
    return ds.map_batches(DecodeRecords(spec, size, channels, reporter, loc.fs), batch_size=DECODE_BATCH_SIZE,
                          batch_format="numpy", num_cpus=1)


# ----------------------------------------------------------------------------- image corpora

IMAGE_FORMATS = {"parquet": ("parquet",), "webdataset": ("tar",), "folder": IMAGE_SUFFIXES}


@dataclass(frozen=True)
class ImageCorpus:
    """A lazy Dataset of ``{"image": uint8 (C, S, S), "label": int64, "path": str}`` rows."""

    dataset: ray.data.Dataset
    class_names: tuple[str, ...]  # label id -> name; () when labels are bare integers or absent
    fmt: str
    source: str


def read_image_corpus(source: str, *, size: int, channels: int, reporter: SkipReporter, fmt: str = "auto",
                      image_column: str = "image", path_column: str = "path",
                      label_column: str = "label") -> ImageCorpus:
    """Read an image folder tree, parquet table(s) or WebDataset shards (see the module docstring).

    Args:
        source: a local path or URI: a folder, a .parquet file or a .tar shard.
        size, channels: every image becomes uint8 (channels, size, size): short-side resize and
            centre crop; channels 1 (grayscale) or 3 (RGB).
        reporter: where bad records are skipped and counted (strict: raise naming them).
        fmt: "auto" (parquet files win over .tar shards over image files), or one of
            "folder", "parquet", "webdataset".
        image_column, path_column, label_column: parquet column names. The image column
            (bytes) is used when present, else the path column.
    """
    loc = locate(source, what="image corpus")
    if fmt == "auto":
        fmt = detect_format(loc, source, IMAGE_FORMATS)
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image corpus format {fmt!r}; use auto, {', '.join(IMAGE_FORMATS)}")
    class_names: tuple[str, ...] = ()
    if fmt == "folder":
        class_names = folder_classes(loc.files(IMAGE_SUFFIXES), loc.root)
        raw = ray.data.read_binary_files(loc.path, filesystem=loc.fs, include_paths=True,
                                         file_extensions=list(IMAGE_SUFFIXES))
        spec = RecordSpec(key_column="path", bytes_column="bytes", root=loc.root, scheme=loc.scheme,
                          class_names=class_names)
    elif fmt == "parquet":
        raw, spec = read_table(loc, source, image_column, path_column, extra=(label_column,))
        spec = replace(spec, label_column=label_column)
    else:
        raw = read_shards(loc, reporter)
        spec = RecordSpec(key_column="path", bytes_column="image", label_column="cls")
    return ImageCorpus(decode_step(raw, spec, loc, size, channels, reporter), class_names, fmt, source)


def read_table(loc: Location, source: str, image_column: str, ref_column: str, extra: tuple[str, ...] = (),
               required: tuple[str, ...] = ()) -> tuple[ray.data.Dataset, RecordSpec]:
    """Raw parquet rows with the image bytes (preferred) or path column, plus the ``extra`` columns
    present and the ``required`` ones (ValueError naming them if absent).

    ``image_column`` is used if it holds bytes (binary, or a struct with a "bytes" field),
    ``ref_column`` if it holds strings (paths/URIs); they may name the same column. Only the
    needed columns are read: an image-bytes table can be far larger than its labels. Bytes rows
    are keyed by parquet file and row hash (or the table's own "path" column), path rows by the path.
    """
    holds_bytes, columns = table_columns(loc, source, image_column, ref_column, extra, required)
    if holds_bytes:
        keyed_by_file = "path" not in columns.types  # include_paths would overwrite a "path" column of the table
        selected = [image_column, *columns.extra, "path"] + (["row_hash"] if keyed_by_file else [])
        raw = ray.data.read_parquet(loc.path, filesystem=loc.fs, include_paths=keyed_by_file,
                                    include_row_hash=keyed_by_file).select_columns(selected)  # pushed into the scan
        spec = RecordSpec(key_column="path", bytes_column=image_column, root=loc.root, scheme=loc.scheme,
                          row_suffix="row_hash" if keyed_by_file else None)
    else:
        raw = ray.data.read_parquet(loc.path, filesystem=loc.fs).select_columns([ref_column, *columns.extra])
        spec = RecordSpec(key_column=ref_column, ref_column=ref_column, root=loc.root, scheme=loc.scheme)
    return raw, spec


@dataclass(frozen=True)
class TableColumns:
    """The columns of a parquet image table that a reader uses."""

    types: dict  # every column's arrow type
    extra: list[str]  # the extra columns present, and the required ones


def table_columns(loc: Location, source: str, image_column: str, ref_column: str, extra: tuple[str, ...] = (),
                  required: tuple[str, ...] = ()) -> tuple[bool, TableColumns]:
    """Whether the table's images are bytes in ``image_column`` (True) or paths in ``ref_column``
    (False), from the first file's schema; ValueError naming a missing required column or neither."""
    import pyarrow.parquet as pq

    first = next(iter(loc.files(("parquet",))), None)
    if first is None:
        raise ValueError(f"no .parquet files found at {source!r}")
    types = {f.name: f.type for f in pq.read_schema(first, filesystem=loc.fs)}
    missing = [c for c in required if c not in types]
    if missing:
        raise ValueError(f"{source!r} has no column {missing[0]!r} (columns: {', '.join(sorted(types))}); "
                         f"name yours with the column options")
    columns = TableColumns(types, [c for c in (*extra, *required) if c in types])
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_struct)  # struct: Hugging Face's image
    if image_column in types and any(is_type(types[image_column]) for is_type in binary):
        return True, columns
    if ref_column in types and (pa.types.is_string(types[ref_column]) or pa.types.is_large_string(types[ref_column])):
        return False, columns
    raise ValueError(f"{source!r} has neither an image-bytes column {image_column!r} nor a path column "
                     f"{ref_column!r} (columns: {', '.join(sorted(types))}); name yours with the column options")


def split_dataset(images: np.ndarray, name: str, num_blocks: int = 8, **columns: np.ndarray) -> ray.data.Dataset:
    """In-memory uint8 images (N, C, S, S) of a built-in split as contract rows, paths ``NAME/000042``.

    ``columns`` are per-image extras, e.g. ``label=labels`` or ``caption=captions``.
    """
    return ray.data.from_items([{"image": img, "path": f"{name}/{i:06d}", **{k: v[i] for k, v in columns.items()}}
                                for i, img in enumerate(images)], override_num_blocks=num_blocks)


# ----------------------------------------------------------------------------- inspection


def view_pairs_figure(batch: dict[str, np.ndarray], views: dict[str, np.ndarray], class_names):
    """Rows: the decoded image, then its two augmented views; one column per example."""
    from matplotlib.figure import Figure

    n = len(batch["image"])
    fig = Figure(figsize=(1.5 * n, 4.8), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    for j in range(n):
        label = int(batch["label"][j])
        name = class_names[label] if 0 <= label < len(class_names) else ("unlabelled" if label < 0 else str(label))
        show(axes[0, j], batch["image"][j], name)
        show(axes[1, j], views["view1"][j], "view 1")
        show(axes[2, j], views["view2"][j], "view 2")
    fig.suptitle("decoded image and two augmented views", fontsize=9)
    return fig


def inspect_image(source: str, out_dir: Path, *, strict: bool = False, size: int = 32, channels: int = 3,
                  fmt: str = "auto", seed: int = 0, augment=None, **columns: str) -> dict:
    """``sslp data inspect SOURCE --kind image``: counts, skips, one augmented batch, a PNG of view pairs.

    ``source`` is a path/URI or a built-in corpus name (its train split). ``augment`` is an
    :class:`~ssl_platform.views.AugmentConfig` (default: the stock one at ``size``);
    ``columns`` are :func:`read_image_corpus`'s column names. With no valid record,
    ``records`` is 0 and no figure is written (``figure`` is None): the caller stops.
    """
    from ssl_platform.data.builtin import IMAGE_CORPORA, load_image_corpus
    from ssl_platform.data.transforms import MultiViewAugment
    from ssl_platform.views import AugmentConfig

    with InspectLedger(strict) as ledger:
        if source in IMAGE_CORPORA:
            split = load_image_corpus(source, size, 0.2, seed)["train"]
            ds, class_names = split_dataset(split.images, source, label=split.labels), split.class_names
        else:
            corpus = read_image_corpus(source, size=size, channels=channels, reporter=ledger.reporter, fmt=fmt,
                                       **columns)
            ds, class_names = corpus.dataset, corpus.class_names
        records, batch = scan(ds)
    if not records:
        return report(0, ledger.summary)
    augment = augment or AugmentConfig(size=size)
    # Keyed by path, so a seed shows the same views as training with that seed would draw.
    views = MultiViewAugment((augment, augment), seed=seed)({"image": np.array(batch["image"]), "path": batch["path"]})
    example = {
        "image": f"uint8 {tuple(batch['image'].shape)}",
        **{k: f"{v.dtype} {tuple(v.shape)} in [{v.min()}, {v.max()}]" for k, v in views.items()},
        "label": batch["label"].tolist(),
        "path": [str(p) for p in batch["path"][:3]],
        "class_names": list(class_names),
    }
    figure = save(view_pairs_figure(batch, views, class_names), out_dir, "image_views.png")
    return report(records, ledger.summary, example, figure)
