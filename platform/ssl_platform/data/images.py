"""Image corpora a user brings -> lazy Ray Datasets of decoded, fixed-size uint8 images.

Three formats, local or behind any URI pyarrow's filesystems take (``s3://``, ``gs://``):

- ``folder``: a tree of .png/.jpg/.jpeg/.bmp/.webp files. Files inside a first-level
  sub-folder are labelled by it (sorted folder names -> ids 0..K-1, torchvision's
  ``ImageFolder`` rule); files directly in the root get label -1.
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
import tarfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data.datasource import FileBasedDatasource

from ssl_platform.data.decode import decode_image_bytes
from ssl_platform.data.skips import SkipReporter

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "bmp", "webp")
SHARD_ERRORS = (tarfile.TarError, EOFError, zlib.error)  # a truncated or non-tar shard
DECODE_BATCH_SIZE = 64  # records per decode task call: small, so one bad batch costs little
SHARD_CHUNK = 64  # samples per block yielded while streaming a tar shard
FETCH_THREADS = 8  # concurrent reads of path-referenced images (hides object-store latency)
LOCATE_TIMEOUT_S = 60.0  # an object store that does not answer the first probe in this time is unreachable


# ----------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """Where a corpus lives: a pyarrow filesystem, the path inside it, and the URI scheme."""

    fs: pafs.FileSystem
    path: str  # inside ``fs``: an absolute local path, or "bucket/key" for object stores
    scheme: str  # "s3://", "gs://", ... or "" for local files; prefixed to paths users see
    is_dir: bool

    @property
    def root(self) -> str:
        """The folder that relative paths in a table and folder labels are taken from."""
        return self.path if self.is_dir else posixpath.dirname(self.path)

    def files(self) -> list[str]:
        """All files under a folder (or the file itself), skipping hidden and ``_`` names as Ray does."""
        if not self.is_dir:
            return [self.path]
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and not any(p[:1] in "._" for p in i.path[len(self.path):].split("/") if p))


def locate(source: str) -> Location:
    """Resolve a local path or URI; raise ValueError naming it if it does not exist (before any Dataset)."""
    if "://" in source:
        try:
            fs, path = pafs.FileSystem.from_uri(source)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"cannot open corpus {source!r}: {e}") from None
        scheme = "" if isinstance(fs, pafs.LocalFileSystem) else source.split("://", 1)[0] + "://"
    else:
        fs, path, scheme = pafs.LocalFileSystem(), str(Path(source).expanduser().resolve()), ""
    info = file_info(fs, path, source)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"corpus path {source!r} does not exist; check the path (or URI) and try again")
    return Location(fs, path, scheme, info.type == pafs.FileType.Directory)


def file_info(fs: pafs.FileSystem, path: str, source: str) -> pafs.FileInfo:
    """``fs.get_file_info(path)``, but an unreachable store fails within LOCATE_TIMEOUT_S instead of hanging.

    Without network or credentials, object-store clients retry for many minutes (GCS's default
    policy: 15), so the probe runs in a daemon thread that is abandoned at the deadline.
    """
    found: dict = {}

    def probe() -> None:
        try:
            found["info"] = fs.get_file_info(path)
        except Exception as e:  # pyarrow raises OSError and its own types; all mean "cannot open"
            found["error"] = e

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(LOCATE_TIMEOUT_S)
    if thread.is_alive():
        raise ValueError(f"corpus {source!r} did not answer within {LOCATE_TIMEOUT_S:g} s; check the URI, "
                         f"the network and credentials (for gs:// add ?retry_limit_seconds=15 to fail faster)")
    if "error" in found:
        raise ValueError(f"cannot open corpus {source!r}: {found['error']}")
    return found["info"]


def suffix(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else ""


def detect_format(loc: Location, source: str, rules: dict[str, tuple[str, ...]]) -> str:
    """The first format in ``rules`` (format -> file suffixes, in priority order) with a file under ``loc``.

    Priority, not majority: a parquet index of paths sits next to the images it names.
    """
    present = {suffix(f) for f in loc.files()}
    for fmt, suffixes in rules.items():
        if present.intersection(suffixes):
            return fmt
    wanted = ", ".join(f".{s}" for s in dict.fromkeys(s for ss in rules.values() for s in ss))
    raise ValueError(f"no corpus files ({wanted}) found at {source!r}; point at a folder or file that holds them")


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
    label_column: str | None = None  # integer ids (missing -> -1), or class names via class_ids
    caption_column: str | None = None  # set for image-caption corpora: rows carry "caption", not "label"
    class_ids: tuple[tuple[str, int], ...] = ()  # folder format: first path part under root -> id
    root: str = ""  # folder labels and relative refs are taken from here
    scheme: str = ""  # prefixed to keys so reports show the user's URI
    row_suffix: str | None = None  # parquet bytes rows: a column (row hash) appended to the file key


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
            keys = [f"{k}#{int(h):016x}" for k, h in zip(keys, batch[s.row_suffix])]
        keep = np.ones(len(keys), bool)
        captions = self._captions(batch, keys, keep) if s.caption_column else None
        labels = self._labels(batch, keys, keep) if not s.caption_column else None
        blobs = self._blobs(batch, keys, keep)
        empty = [i for i in np.flatnonzero(keep) if not blobs[i]]
        for i in empty:
            self.reporter.skip(keys[i], "missing image" if blobs[i] is None else "empty image")
        keep[empty] = False
        idx = np.flatnonzero(keep)
        images, failed = decode_image_bytes([blobs[i] for i in idx], self.size, self.channels)
        for j in failed:
            self.reporter.skip(keys[idx[j]], "corrupt image")
        idx = np.delete(idx, failed)
        self.reporter.flush()
        out = {"image": images, "path": np.array([keys[i] for i in idx], dtype=object)}
        if captions is not None:
            out["caption"] = np.array([captions[i] for i in idx], dtype=object)
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

    def _labels(self, batch, keys, keep) -> np.ndarray:
        s = self.spec
        if s.class_ids:  # folder format: the first folder under the root names the class
            ids = dict(s.class_ids)
            parts = [str(p)[len(s.root) + 1:].split("/") for p in batch[s.key_column]]
            return np.array([ids.get(p[0], -1) if len(p) > 1 else -1 for p in parts], np.int64)
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
                for i, blob in zip(todo, pool.map(lambda i: self._read(str(refs[i])), todo)):
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
            return pafs.FileSystem.from_uri(ref)
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
        except (OSError, pa.ArrowInvalid):
            return None


def decode_step(ds: ray.data.Dataset, spec: RecordSpec, loc: Location, size: int, channels: int,
                reporter: SkipReporter) -> ray.data.Dataset:
    return ds.map_batches(DecodeRecords(spec, size, channels, reporter, loc.fs), batch_size=DECODE_BATCH_SIZE,
                          batch_format="numpy", num_cpus=1)


# ----------------------------------------------------------------------------- WebDataset shards


def tar_samples(stream, shard: str):
    """Group a tar stream's members into WebDataset samples: ``KEY.EXT`` files sharing KEY.

    Yields ``{"path": "SHARD/KEY", "image": bytes | None, "cls": str | None, "txt": str | None}``.
    """
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            folder, base = posixpath.split(member.name)
            if not member.isreg() or base.startswith("."):
                continue
            stem, _, ext = base.partition(".")
            if posixpath.join(folder, stem) != key:
                if members:
                    yield sample_row(shard, key, members)
                key, members = posixpath.join(folder, stem), {}
            members[ext.lower()] = tar.extractfile(member).read()
    if members:
        yield sample_row(shard, key, members)


def sample_row(shard: str, key: str, members: dict[str, bytes]) -> dict:
    image = next((members[e] for e in IMAGE_SUFFIXES if e in members), None)

    def text(*exts: str) -> str | None:
        blob = next((members[e] for e in exts if e in members), None)
        return None if blob is None else blob.decode("utf-8", "replace")

    return {"path": f"{shard}/{key}", "image": image, "cls": text("cls", "label"), "txt": text("txt", "caption")}


SAMPLE_SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary()), ("cls", pa.string()), ("txt", pa.string())])


class WebDatasetShards(FileBasedDatasource):
    """Streams WebDataset .tar shards as raw samples; a shard that is not a readable tar (or
    ends early) is reported as one "unreadable shard", keeping the samples read before the fault.

    Ray's ``read_webdataset`` raises on such a shard (and PIL-decodes inside the reader), which
    would end the run; hence this reader plus :class:`DecodeRecords`.
    """

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths, *, reporter: SkipReporter, scheme: str, **kwargs):
        super().__init__(paths, **kwargs)
        self.reporter, self.scheme = reporter, scheme

    def _read_stream(self, f, path: str):
        rows = []
        try:
            for row in tar_samples(f, self.scheme + path):
                rows.append(row)
                if len(rows) == SHARD_CHUNK:
                    yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
                    rows = []
        except SHARD_ERRORS:
            self.reporter.skip(self.scheme + path, "unreadable shard")
            self.reporter.flush()
        if rows:
            yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def read_shards(loc: Location, reporter: SkipReporter) -> ray.data.Dataset:
    return ray.data.read_datasource(WebDatasetShards(loc.path, reporter=reporter, scheme=loc.scheme,
                                                     filesystem=loc.fs, file_extensions=["tar"]))


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
    loc = locate(source)
    if fmt == "auto":
        fmt = detect_format(loc, source, IMAGE_FORMATS)
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image corpus format {fmt!r}; use auto, {', '.join(IMAGE_FORMATS)}")
    class_names: tuple[str, ...] = ()
    if fmt == "folder":
        class_names = folder_classes(loc)
        raw = ray.data.read_binary_files(loc.path, filesystem=loc.fs, include_paths=True,
                                         file_extensions=list(IMAGE_SUFFIXES))
        spec = RecordSpec(key_column="path", bytes_column="bytes", root=loc.root, scheme=loc.scheme,
                          class_ids=tuple((n, i) for i, n in enumerate(class_names)))
    elif fmt == "parquet":
        raw, spec = read_table(loc, source, image_column, path_column, extra=(label_column,))
        spec = replace(spec, label_column=label_column)
    else:
        raw = read_shards(loc, reporter)
        spec = RecordSpec(key_column="path", bytes_column="image", label_column="cls")
    return ImageCorpus(decode_step(raw, spec, loc, size, channels, reporter), class_names, fmt, source)


def folder_classes(loc: Location) -> tuple[str, ...]:
    """Sorted names of the first-level sub-folders (hidden ones left out): the class names."""
    if not loc.is_dir:
        return ()
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path))
    return tuple(sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name[:1] not in "._"))


def read_table(loc: Location, source: str, image_column: str, ref_column: str, extra: tuple[str, ...] = (),
               required: tuple[str, ...] = ()) -> tuple[ray.data.Dataset, RecordSpec]:
    """Raw parquet rows with the image bytes (preferred) or path column, plus the ``extra`` columns
    present and the ``required`` ones (ValueError naming them if absent).

    ``image_column`` is used if it holds bytes (binary, or a struct with a "bytes" field),
    ``ref_column`` if it holds strings (paths/URIs); they may name the same column. Only the
    needed columns are read: an image-bytes table can be far larger than its labels. Bytes rows
    are keyed by parquet file and row hash (or the table's own "path" column), path rows by the path.
    """
    import pyarrow.parquet as pq

    first = next((f for f in loc.files() if suffix(f) == "parquet"), None)
    if first is None:
        raise ValueError(f"no .parquet files found at {source!r}")
    schema = pq.read_schema(first, filesystem=loc.fs)
    types = {f.name: f.type for f in schema}
    missing = [c for c in required if c not in types]
    if missing:
        raise ValueError(f"{source!r} has no column {missing[0]!r} (columns: {', '.join(sorted(types))}); "
                         f"name yours with the column options")
    extra = [c for c in (*extra, *required) if c in types]
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_struct)  # struct: Hugging Face's image
    if image_column in types and any(is_type(types[image_column]) for is_type in binary):
        keyed_by_file = "path" not in types  # include_paths would overwrite a "path" column of the table
        columns = [image_column, *extra, "path"] + (["row_hash"] if keyed_by_file else [])
        raw = ray.data.read_parquet(loc.path, filesystem=loc.fs, include_paths=keyed_by_file,
                                    include_row_hash=keyed_by_file).select_columns(columns)  # pushed into the scan
        spec = RecordSpec(key_column="path", bytes_column=image_column, root=loc.root, scheme=loc.scheme,
                          row_suffix="row_hash" if keyed_by_file else None)
    elif ref_column in types and (pa.types.is_string(types[ref_column]) or pa.types.is_large_string(types[ref_column])):
        raw = ray.data.read_parquet(loc.path, filesystem=loc.fs).select_columns([ref_column, *extra])
        spec = RecordSpec(key_column=ref_column, ref_column=ref_column, root=loc.root, scheme=loc.scheme)
    else:
        raise ValueError(f"{source!r} has neither an image-bytes column {image_column!r} nor a path column "
                         f"{ref_column!r} (columns: {', '.join(sorted(types))}); name yours with the column options")
    return raw, spec


# ----------------------------------------------------------------------------- inspection

INSPECT_EXAMPLES = 8  # images shown in the inspect figure


def split_dataset(images: np.ndarray, name: str, num_blocks: int = 8, **columns: np.ndarray) -> ray.data.Dataset:
    """In-memory uint8 images (N, C, S, S) of a built-in split as contract rows, paths ``NAME/000042``.

    ``columns`` are per-image extras, e.g. ``label=labels`` or ``caption=captions``.
    """
    return ray.data.from_items([{"image": img, "path": f"{name}/{i:06d}", **{k: v[i] for k, v in columns.items()}}
                                for i, img in enumerate(images)], override_num_blocks=num_blocks)


class InspectLedger:
    """A throw-away skip ledger for one ``sslp data inspect`` call; ``summary`` is set on exit.

        with InspectLedger(strict) as ledger:
            records, batch = scan(read_image_corpus(..., reporter=ledger.reporter).dataset)
        ledger.summary  # {"total": ..., "by_reason": ..., "examples": ...}
    """

    def __init__(self, strict: bool):
        import uuid

        from ssl_platform.data.skips import ledger_name

        self.name = ledger_name(f"inspect-{uuid.uuid4().hex[:8]}")
        self.reporter = SkipReporter(self.name, strict=strict)
        self.summary: dict = {}

    def __enter__(self) -> InspectLedger:
        from ssl_platform.data.skips import get_or_create_ledger

        self.actor = get_or_create_ledger(self.name)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        from ssl_platform.data.skips import skip_summary

        self.summary = skip_summary(self.actor)
        ray.kill(self.actor)  # detached: it would outlive the command otherwise


def scan(ds: ray.data.Dataset, keep: int = INSPECT_EXAMPLES) -> tuple[int, dict[str, np.ndarray]]:
    """Stream a whole Dataset once: (number of rows, the first ``keep`` rows as a numpy batch)."""
    count, first = 0, None
    for batch in ds.iter_batches(batch_size=DECODE_BATCH_SIZE, batch_format="numpy"):
        n = len(next(iter(batch.values()))) if batch else 0
        if first is None and n:
            first = {k: v[:keep] for k, v in batch.items()}
        elif first is not None and len(first["image"]) < keep and n:
            first = {k: np.concatenate([first[k], batch[k][: keep - len(first[k])]]) for k in first}
        count += n
    return count, first or {}


def show(ax, image: np.ndarray, title: str = "", fontsize: int = 7) -> None:
    """Draw one image, uint8 (C, H, W) or normalised float (C, H, W), on a matplotlib axis."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        from ssl_platform.data.transforms import MEAN, STD

        x = np.clip((x * STD + MEAN) * 255, 0, 255).astype(np.uint8)
    x = x.transpose(1, 2, 0)
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def save(fig, out_dir: Path, name: str) -> str:
    """Write a matplotlib Figure as OUT_DIR/NAME (a PNG) and return the path."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)


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
    :class:`~ssl_platform.data.transforms.AugmentConfig` (default: the stock one at ``size``);
    ``columns`` are :func:`read_image_corpus`'s column names. With no valid record,
    ``records`` is 0 and no figure is written (``figure`` is None): the caller stops.
    """
    from ssl_platform.data.builtin import IMAGE_CORPORA, load_image_corpus
    from ssl_platform.data.transforms import AugmentConfig, TwoViewAugment

    with InspectLedger(strict) as ledger:
        if source in IMAGE_CORPORA:
            split = load_image_corpus(source, size, 0.2, seed)["train"]
            ds, class_names = split_dataset(split.images, source, label=split.labels), split.class_names
        else:
            corpus = read_image_corpus(source, size=size, channels=channels, reporter=ledger.reporter, fmt=fmt,
                                       **columns)
            ds, class_names = corpus.dataset, corpus.class_names
        records, batch = scan(ds)
    result = {"records": records, "skipped": ledger.summary, "example": {}, "figure": None}
    if not records:
        return result
    augment = augment or AugmentConfig(size=size)
    # Keyed by path, so a seed shows the same views as training with that seed would draw.
    views = TwoViewAugment(augment, seed=seed)({"image": np.array(batch["image"]), "path": batch["path"]})
    result["example"] = {
        "image": f"uint8 {tuple(batch['image'].shape)}",
        **{k: f"float32 {tuple(v.shape)} in [{v.min():.2f}, {v.max():.2f}]" for k, v in views.items()},
        "label": batch["label"].tolist(),
        "path": [str(p) for p in batch["path"][:3]],
        "class_names": list(class_names),
    }
    result["figure"] = save(view_pairs_figure(batch, views, class_names), out_dir, "image_views.png")
    return result
