"""Where corpus files live: a local path, glob or URI resolved to a pyarrow filesystem, its files
listed and labelled by class sub-folder, and WebDataset shards streamed as raw samples.

Every file reader (images, captions, text, audio) resolves its ``source`` here, on the driver
before any Dataset exists, so a missing path, a bad URI or an object store that does not
answer is one ValueError naming the source, and every corpus follows the same rules:

- local paths, and any URI pyarrow's filesystems take (``s3://``, ``gs://``, ``file://``); an
  object store that does not answer within ``LOCATE_TIMEOUT_S`` is reported, not waited on;
- files and folders whose name starts with ``.`` or ``_`` are not part of a folder (Ray's own
  readers skip them too); a file named on its own always is;
- class labels: the sorted first-level sub-folders that hold a corpus file are classes
  0..K-1 (torchvision's ``ImageFolder`` rule, empty folders left out); files directly in the
  root get -1.

    loc = locate("s3://bucket/pets", what="image corpus")
    paths = loc.files(("png", "jpg"))                 # sorted, in the filesystem's notation
    classes = folder_classes(paths, loc.root)         # ("cat", "dog")
    folder_labels(paths, loc.root, classes)           # array([0, 0, 1, ...])
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import posixpath
import tarfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data.datasource import FileBasedDatasource

from ssl_platform.data.skips import SkipReporter

LOCATE_TIMEOUT_S = 60.0  # an object store that does not answer the first probe in this time is unreachable
IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "bmp", "webp")
_GLOB_CHARS = "*?["


# ----------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """Where a corpus lives: a pyarrow filesystem, the path inside it, and the URI scheme.

    ``path`` is an absolute local path or "bucket/key" for object stores; for a glob
    (``is_glob``) it is the pattern. ``scheme`` ("s3://", ... or "" for local files) is
    prefixed to the paths users see.
    """

    fs: pafs.FileSystem
    path: str
    scheme: str
    is_dir: bool
    is_glob: bool = False

    @property
    def root(self) -> str:
        """The folder that relative paths and class sub-folders are taken from."""
        if self.is_glob:
            return glob_base(self.path)
        return self.path if self.is_dir else posixpath.dirname(self.path)

    def files(self, suffixes: tuple[str, ...] | None = None) -> list[str]:
        """The corpus's files, sorted, optionally only those with one of ``suffixes`` (no dot)."""
        if suffixes is None:
            return list(self._listing)
        return [f for f in self._listing if suffix(f) in suffixes]

    @functools.cached_property
    def _listing(self) -> tuple[str, ...]:
        # Listed once per Location: format detection, class names and the first-file checks share it.
        if self.is_glob:
            return tuple(sorted(self._glob()))
        if not self.is_dir:
            return (self.path,)
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return tuple(sorted(i.path for i in infos if i.type == pafs.FileType.File
                            and not hidden(i.path[len(self.path):])))

    def _glob(self) -> list[str]:
        if not self.scheme:  # local: Python's glob (``**`` recurses; hidden names need an explicit dot)
            return [p for p in glob.glob(self.path, recursive=True) if Path(p).is_file()]
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        return [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, self.path)]


def filesystem(source: str, what: str = "corpus") -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, scheme to show users: "" for local files, else e.g. "s3://").

    No I/O: a local path is made absolute (symlinks resolved), a URI parsed; a URI pyarrow
    cannot parse (or whose store needs credentials it has not got) is a ValueError.
    """
    if "://" not in source:
        return pafs.LocalFileSystem(), str(Path(source).expanduser().resolve()), ""
    try:
        fs, path = pafs.FileSystem.from_uri(source)
    except Exception as e:  # ArrowInvalid (bad URI), OSError (no credentials), ...
        raise ValueError(f"cannot open {what} {source!r}: {e}") from None
    scheme = "" if isinstance(fs, pafs.LocalFileSystem) else source.split("://", 1)[0] + "://"
    return fs, path, scheme


def locate(source: str, *, what: str = "corpus", hint: str = "check the path (or URI) and try again",
           globs: bool = False) -> Location:
    """Resolve a local path or URI (or, with ``globs``, a pattern such as ``corpus/*.txt``).

    Raises ValueError naming ``source`` (``what`` says what it is, ``hint`` what to do) when it
    does not exist, cannot be opened, or its object store does not answer: before any Dataset.
    A glob that matches nothing is not an error here; its ``files()`` are empty.
    """
    fs, path, scheme = filesystem(source, what)
    if globs and any(c in path for c in _GLOB_CHARS):
        if scheme:  # probe the store once, so that listing it later cannot hang
            file_info(fs, glob_base(path), source, what)
        return Location(fs, path, scheme, is_dir=False, is_glob=True)
    info = file_info(fs, path, source, what)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{what} {source!r} does not exist; {hint}")
    return Location(fs, path, scheme, is_dir=info.type == pafs.FileType.Directory)


def file_info(fs: pafs.FileSystem, path: str, source: str, what: str = "corpus") -> pafs.FileInfo:
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
        raise ValueError(f"{what} {source!r} did not answer within {LOCATE_TIMEOUT_S:g} s; check the URI, "
                         f"the network and credentials (for gs:// add ?retry_limit_seconds=15 to fail faster)")
    if "error" in found:
        raise ValueError(f"cannot open {what} {source!r}: {found['error']}")
    return found["info"]


def glob_base(pattern: str) -> str:
    """The folders of a glob pattern before its first wildcard: where its matches are listed from."""
    parts = pattern.split("/")
    return "/".join(parts[: next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))])


def hidden(relative: str) -> bool:
    """Whether a path relative to a corpus root passes through a name starting with "." or "_"."""
    return any(part[:1] in "._" for part in relative.split("/") if part)


def suffix(path: str) -> str:
    """The lower-cased extension without its dot ("" when the name has none)."""
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


# ----------------------------------------------------------------------------- class sub-folders


def class_folder(path: str, root: str) -> str | None:
    """The first folder of ``path`` under ``root`` (its class), or None for a file directly in the root."""
    prefix = root.rstrip("/") + "/"
    relative = path[len(prefix):] if path.startswith(prefix) else path
    return relative.split("/", 1)[0] if "/" in relative else None


def folder_classes(paths, root: str) -> tuple[str, ...]:
    """The class names of a corpus: the sorted first-level sub-folders of ``root`` holding one of ``paths``."""
    return tuple(sorted({c for c in (class_folder(str(p), root) for p in paths) if c is not None}))


def folder_labels(paths, root: str, class_names: tuple[str, ...]) -> np.ndarray:
    """(N,) int64: each path's class index in ``class_names``; -1 in the root or in a folder that is no class."""
    ids = {name: i for i, name in enumerate(class_names)}
    return np.array([ids.get(class_folder(str(p), root), -1) for p in paths], np.int64)


# ----------------------------------------------------------------------------- WebDataset shards

SHARD_ERRORS = (tarfile.TarError, EOFError, zlib.error)  # a truncated or non-tar shard
SHARD_CHUNK = 64  # samples per block yielded while streaming a tar shard
SAMPLE_SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary()), ("cls", pa.string()), ("txt", pa.string())])


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


class WebDatasetShards(FileBasedDatasource):
    """Streams WebDataset .tar shards as raw samples; a shard that is not a readable tar (or
    ends early) is reported as one "unreadable shard", keeping the samples read before the fault.

    Ray's ``read_webdataset`` raises on such a shard (and PIL-decodes inside the reader), which
    would end the run; hence this reader plus :class:`~ssl_platform.data.images.DecodeRecords`.
    """

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["tar"]

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
    """Raw ``{"path", "image", "cls", "txt"}`` samples of the .tar shards at ``loc`` (lazy)."""
    return ray.data.read_datasource(WebDatasetShards(loc.path, reporter=reporter, scheme=loc.scheme,
                                                     filesystem=loc.fs, file_extensions=["tar"]))
