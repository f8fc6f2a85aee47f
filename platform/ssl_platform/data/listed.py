"""File corpora (``data.path``) in the epoch's order: every record listed once on the driver,
read by id where it is transformed (issue 18).

The listing is an :class:`~ssl_platform.data.ordered.OrderedCorpus`'s records: per record, where
it is and its small fields, never its image or audio bytes. Train workers then read their ids of
the epoch's order (:mod:`~ssl_platform.data.order`) like those of a built-in corpus:

| corpus | a record | listed on the driver | read by id |
|---|---|---|---|
| image or audio folder | a file | its path (sorted; the label from its folder) | the file |
| parquet, path column | a row | the path and the label or caption | the file it names |
| parquet, image-bytes column | a row | file, row group, row, the label or caption | the row group's image column |
| WebDataset .tar shards | a sample | shard, offset and size of its image, its .cls and .txt | the image (one seek) |
| CSV / TSV image-caption pairs | a row | the image path and the caption | the image file |

Ids follow the listing (files sorted, rows and samples in file order), so the order's shards (64
consecutive ids) lie in one file or a few neighbouring ones, and a window of 8 shards is what a
reader touches at once. A resume skips ids by position: nothing before them is listed again,
read or decoded.

**Positions count records listed, not records decoded.** The listing does not open the images or
clips, so a corrupt image, an empty file or an undecodable clip is found where it is decoded:
skipped and counted as always (``data.strict=true`` fails naming it), and its slot in the global
batch taken by another record, :func:`fill_ids` drawn from (seed, epoch, the skipped record's id)
(the next draw when that one fails too), under the key ``fill/<id>``, so it gets views of its own.
Batches keep their size and their records whatever the number of workers and in every attempt,
and a record that fails is counted each time it is read (every epoch). A
.tar that is not readable is one "unreadable shard" at listing, its samples before the fault
listed; a malformed CSV line is one "malformed row" at listing.

Audio: a record is a file, cropped from the whole recording (``data.max_audio_seconds`` does not
cut it into several records here).
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from ssl_platform.data.images import DecodeRecords, RecordSpec, table_columns
from ssl_platform.data.ordered import OrderedCorpus, ordered_corpus
from ssl_platform.data.skips import SkipReporter
from ssl_platform.data.sources import IMAGE_SUFFIXES, SHARD_ERRORS, folder_classes, locate

FILL_TRIES = 16  # draws for a skipped record's slot before the corpus is called unusable
FETCH_THREADS = 8  # concurrent file reads (hides object-store latency)
PROBE_RECORDS = 64  # records the driver decodes to refuse a corpus with none usable


# ----------------------------------------------------------------------------- reading listed records


@dataclass(frozen=True)
class ListedReader:
    """Reads listed records by id and decodes them; rows carry ``slot`` (their place among the ids).

    ``fetch``: "file" (the bytes of the file in column ``path``), "row" (a parquet row's image
    cell), "member" (a tar member at ``offset``/``size`` of ``shard``) or "ref" (nothing: the
    decoder reads the path the row names). The fetched bytes go to column ``column``.
    """

    fs: pafs.FileSystem
    fetch: str
    column: str
    decode: Callable[[dict], dict]  # DecodeRecords / DecodeAudio, built with slots

    def read(self, ids: np.ndarray, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {c: _strings(v[ids]) if v.dtype.kind == "S" else v[ids] for c, v in table.items()}
        if self.fetch != "ref":
            batch[self.column] = FETCHERS[self.fetch](self.fs, batch, self.column)
        return self.decode(batch)


def _file_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except (OSError, ValueError):  # vanished, no permission: the decoder counts a missing record
        return None


def fetch_files(fs: pafs.FileSystem, batch: dict, column: str) -> np.ndarray:
    paths = [str(p) for p in batch["path"]]
    with ThreadPoolExecutor(max(1, min(FETCH_THREADS, len(paths)))) as pool:
        return _objects(list(pool.map(partial(_file_bytes, fs), paths)))


def fetch_members(fs: pafs.FileSystem, batch: dict, column: str) -> np.ndarray:
    out: list[bytes | None] = [None] * len(batch["shard"])
    for shard in dict.fromkeys(batch["shard"]):  # one open per shard of the block
        rows = [i for i, s in enumerate(batch["shard"]) if s == shard and batch["size"][i] >= 0]
        try:
            with fs.open_input_file(str(shard)) as f:
                for i in rows:
                    f.seek(int(batch["offset"][i]))
                    out[i] = f.read(int(batch["size"][i]))
        except OSError:
            pass  # left None: "missing image", counted by the decoder
    return _objects(out)


class RowGroupCache:
    """The image cells of the parquet row groups this process read last, up to ``capacity`` bytes.

    A block's ids come from one window of the order (8 shards of 64 rows), shuffled, so a block
    needs a few rows of each of several row groups, and the next block of the window needs others
    of the same groups: keeping them saves reading a row group once per block that touches it."""

    def __init__(self, capacity: int = 64 * 2**20):
        self.capacity, self.groups, self.size = capacity, OrderedDict(), 0

    def get(self, fs: pafs.FileSystem, file: str, group: int, column: str):
        import pyarrow.parquet as pq

        key = (file, group, column)
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        with fs.open_input_file(file) as f:
            cells = pq.ParquetFile(f).read_row_group(group, columns=[column]).column(0)
        self.groups[key], self.size = cells, self.size + cells.nbytes
        while self.size > self.capacity and len(self.groups) > 1:
            self.size -= self.groups.popitem(last=False)[1].nbytes
        return cells


ROW_GROUPS = RowGroupCache()  # per process: Ray Data's tasks of a worker process share it


def fetch_rows(fs: pafs.FileSystem, batch: dict, column: str) -> np.ndarray:
    out: list[Any] = [None] * len(batch["file"])
    for i, (file, group, row) in enumerate(zip(batch["file"], batch["group"], batch["row"], strict=True)):
        with suppress(OSError, ValueError):  # left None: "missing image", counted by the decoder
            out[i] = ROW_GROUPS.get(fs, str(file), int(group), column)[int(row)].as_py()
    return _objects(out)


FETCHERS = {"file": fetch_files, "member": fetch_members, "row": fetch_rows}


def packed(records: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The listing as it goes to the object store: columns of text only (paths, keys) as UTF-8
    bytes arrays, which every data task maps without a copy, where an object array would be
    unpickled whole by each task (a million paths: ~100 MB per block of 256 records)."""
    def pack(values: np.ndarray) -> np.ndarray:
        if values.dtype != object or not len(values) or not all(isinstance(v, str) for v in values):
            return values
        return np.array([v.encode("utf-8") for v in values], dtype=bytes)

    return {c: pack(v) for c, v in records.items()}


def _strings(values: np.ndarray) -> np.ndarray:
    """A packed text column's rows as an object array of str again."""
    return _objects([v.decode("utf-8") for v in values])


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def fill_ids(num_records: int, seed: int, epoch: int, record: int) -> np.ndarray:
    """(FILL_TRIES,) the records that, in turn, may take the slot of ``record`` if it fails to decode."""
    return np.random.default_rng([seed % 2**63, epoch, record, 0x66696C6C]).integers(num_records, size=FILL_TRIES)


class ReadListed:
    """The ordered transform of a listed corpus: ids -> decoded records (failed ones' slots
    filled, see the module docstring) -> the method's transform of ``epoch`` (``finish(epoch=e)``)."""

    reads_by_id = True  # see ordered.ReadRecords

    def __init__(self, reader: ListedReader, finish: Callable[..., Callable], seed: int, epoch: int = 0):
        self.reader, self.finish, self.seed, self.epoch = reader, finish(epoch=epoch), seed, epoch

    def __call__(self, ids: np.ndarray, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.finish(self.decoded(ids, table))

    def decoded(self, ids: np.ndarray, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoded row per id, in the ids' order (``slot`` dropped)."""
        parts = [self.reader.read(ids, table)]
        for slot in sorted(set(range(len(ids))) - set(parts[0]["slot"].tolist())):
            parts.append(self._fill(int(ids[slot]), slot, table))
        rows = {k: _concat([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(rows.pop("slot"), kind="stable")
        return {k: v[order] for k, v in rows.items()}

    def _fill(self, record: int, slot: int, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        num_records = len(next(iter(table.values())))
        for candidate in fill_ids(num_records, self.seed, self.epoch, record):
            row = self.reader.read(np.array([candidate]), table)
            if len(row["slot"]):
                row["slot"][:] = slot
                row["path"] = _objects([f"fill/{record}"])  # views of its own, not the filler's
                return row
        raise ValueError(f"{FILL_TRIES} records in a row failed to decode while filling the place of record "
                         f"{record}: most of the corpus is unusable; run `sslp data inspect` on it")


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    if arrays[0].dtype == object:  # ragged (audio clips): never let numpy stack them into 2-D
        return _objects([x for a in arrays for x in a])
    return np.concatenate(arrays)


# ----------------------------------------------------------------------------- listing (on the driver)


@dataclass(frozen=True)
class Listing:
    """A file corpus's records, as listed, and how to read them."""

    source: str
    fmt: str
    records: dict[str, np.ndarray]  # one entry per column, one row per record
    reader: ListedReader

    def __len__(self) -> int:
        return len(next(iter(self.records.values())))


def list_image_corpus(source: str, *, size: int, channels: int, reporter: SkipReporter, fmt: str = "auto",
                      image_column: str = "image", path_column: str = "path", label_column: str = "label",
                      caption_column: str | None = None) -> Listing:
    """The records of an image (or, with ``caption_column``, image-caption) corpus, as
    :func:`~ssl_platform.data.images.read_image_corpus` and ``read_caption_corpus`` read them."""
    from ssl_platform.data.captions import CAPTION_FORMATS
    from ssl_platform.data.images import IMAGE_FORMATS
    from ssl_platform.data.sources import detect_format

    formats = CAPTION_FORMATS if caption_column else IMAGE_FORMATS
    loc = locate(source, what="image-caption corpus" if caption_column else "image corpus")
    if fmt == "auto":
        fmt = detect_format(loc, source, formats)
    if fmt not in formats:
        raise ValueError(f"unknown {'image-caption' if caption_column else 'image'} corpus format {fmt!r}; use auto, "
                         f"{', '.join(formats)}")
    if fmt == "folder":
        paths = loc.files(IMAGE_SUFFIXES)
        records = {"path": _objects(paths), "key": _objects([loc.scheme + p for p in paths])}
        spec = RecordSpec(key_column="path", bytes_column="bytes", root=loc.root, scheme=loc.scheme, slots=True,
                          class_names=folder_classes(paths, loc.root))
        fetch, column = "file", "bytes"
    elif fmt == "webdataset":
        records = list_shards(loc, reporter)
        spec = RecordSpec(key_column="key", bytes_column="image", slots=True, label_column=None if caption_column else
                          "cls", caption_column="txt" if caption_column else None)
        fetch, column = "member", "image"
    elif fmt in ("csv", "tsv"):
        records = list_delimited(loc, source, fmt, (image_column, caption_column), reporter)
        spec = RecordSpec(key_column=image_column, ref_column=image_column, root=loc.root, scheme=loc.scheme,
                          caption_column=caption_column, slots=True)
        fetch, column = "ref", ""
    else:
        extra, required = ((), (caption_column,)) if caption_column else ((label_column,), ())
        holds_bytes, columns = table_columns(loc, source, image_column, path_column if not caption_column
                                             else image_column, extra, required)
        records = list_table(loc, columns.extra if holds_bytes else [path_column if not caption_column else
                                                                     image_column, *columns.extra], holds_bytes)
        ref = path_column if not caption_column else image_column
        labels = None if caption_column else (label_column if label_column in columns.extra else None)
        spec = (RecordSpec(key_column="key", bytes_column=image_column, label_column=labels,
                           caption_column=caption_column, slots=True) if holds_bytes else
                RecordSpec(key_column=ref, ref_column=ref, root=loc.root, scheme=loc.scheme, label_column=labels,
                           caption_column=caption_column, slots=True))
        fetch, column = ("row", image_column) if holds_bytes else ("ref", "")
    reader = ListedReader(loc.fs, fetch, column, DecodeRecords(spec, size, channels, reporter, loc.fs))
    return Listing(source, fmt, records, reader)


def list_audio_corpus(source: str, *, sample_rate: int, reporter: SkipReporter, fmt: str = "auto") -> Listing:
    """The files of an audio corpus (see :func:`~ssl_platform.data.audio.list_audio_files`), one record each."""
    from ssl_platform.data.audio import DecodeAudio, list_audio_files

    files = list_audio_files(source, fmt)
    decode = DecodeAudio(reporter, sample_rate, files.root, files.class_names, slots=True)
    return Listing(str(source), fmt, {"path": _objects(list(files.paths))},
                   ListedReader(files.filesystem, "file", "bytes", decode))


def list_table(loc, columns: list[str], holds_bytes: bool) -> dict[str, np.ndarray]:
    """Parquet rows in file order: the small ``columns`` read whole; with ``holds_bytes`` also
    where each row is (file, row group, row in it) and its key ``FILE#ROW``."""
    import pyarrow.parquet as pq

    out: dict[str, list] = {c: [] for c in (*columns, *(("file", "group", "row", "key") if holds_bytes else ()))}
    for file in loc.files(("parquet",)):
        with loc.fs.open_input_file(file) as f:
            pf = pq.ParquetFile(f)
            table = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
            for c in columns:
                out[c] += table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            if holds_bytes:
                first = 0
                for group in range(pf.num_row_groups):
                    n = pf.metadata.row_group(group).num_rows
                    out["file"] += [file] * n
                    out["group"] += [group] * n
                    out["row"] += range(n)
                    out["key"] += [f"{loc.scheme}{file}#{first + r}" for r in range(n)]
                    first += n
    return {c: np.asarray(v, dtype=np.int64) if c in ("group", "row") else _objects(v) for c, v in out.items()}


def list_shards(loc, reporter: SkipReporter) -> dict[str, np.ndarray]:
    """WebDataset samples of every .tar at ``loc``, in shard and tar order: where each one's image
    member is, and its ``.cls`` / ``.txt``. Only the tar headers are read (a seekable file is not
    read past them), plus the small text members."""
    rows: list[tuple] = []
    for shard in loc.files(("tar",)):
        samples: dict[str, dict] = {}
        try:
            with loc.fs.open_input_file(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    folder, base = posixpath.split(member.name)
                    if not member.isreg() or base.startswith("."):
                        continue
                    stem, _, ext = base.partition(".")
                    sample, ext = samples.setdefault(posixpath.join(folder, stem), {}), ext.lower()
                    if ext in IMAGE_SUFFIXES:
                        sample.setdefault("image", (member.offset_data, member.size))
                    elif ext in ("cls", "label", "txt", "caption"):
                        text = tar.extractfile(member).read().decode("utf-8", "replace")
                        sample.setdefault("txt" if ext in ("txt", "caption") else "cls", text)
        except (*SHARD_ERRORS, OSError):
            reporter.skip(loc.scheme + shard, "unreadable shard")
        for key, sample in samples.items():
            offset, size = sample.get("image", (0, -1))
            rows.append((shard, offset, size, f"{loc.scheme}{shard}/{key}", sample.get("cls"), sample.get("txt")))
    reporter.flush()
    columns = list(zip(*rows, strict=True)) if rows else [()] * 6
    return {"shard": _objects(list(columns[0])), "offset": np.asarray(columns[1], np.int64),
            "size": np.asarray(columns[2], np.int64), "key": _objects(list(columns[3])),
            "cls": _objects(list(columns[4])), "txt": _objects(list(columns[5]))}


def list_delimited(loc, source: str, fmt: str, columns: tuple[str, ...], reporter: SkipReporter) -> dict:
    """The rows of every CSV/TSV file at ``loc``, in file order (malformed lines counted and left out)."""
    import pyarrow.csv as pacsv

    from ssl_platform.data.captions import delimited_options

    parse, convert = delimited_options(loc, source, fmt, columns, reporter)
    out: dict[str, list] = {c: [] for c in columns}
    for file in loc.files((fmt,)):
        with loc.fs.open_input_stream(file) as f:
            table = pacsv.read_csv(f, parse_options=parse, convert_options=convert)
        for c in columns:
            out[c] += table.column(c).to_pylist()
    reporter.flush()
    return {c: _objects(v) for c, v in out.items()}


def listed_corpus(listing: Listing, seed: int, finish: Callable[..., Callable], **settings: Any) -> OrderedCorpus:
    """The ordered corpus of a listing: ``finish(epoch=e)`` turns decoded rows into training rows.

    Refuses (ValueError) a corpus whose first records all fail to decode, before any worker starts.
    The fingerprint names the listing (its size and a hash of its keys), so a resume notices
    files added, removed or renamed."""
    n = len(listing)
    keys = next(listing.records[c] for c in ("key", "path", *listing.records) if c in listing.records)
    if not n or not len(listing.reader.read(np.arange(min(n, PROBE_RECORDS)), listing.records)["slot"]):
        raise ValueError(f"data.path={listing.source}: no usable record among the first {min(n, PROBE_RECORDS)} of "
                         f"{n} listed ({listing.fmt}); check the path and data.format, or run "
                         f"`sslp data inspect {listing.source}`")
    digest = zlib.crc32("\n".join(map(str, keys)).encode())
    read = partial(ReadListed, listing.reader, finish, seed)
    return ordered_corpus(listing.source, packed(listing.records), seed, read, format=listing.fmt,
                          listing=f"{digest:08x}", **settings)
