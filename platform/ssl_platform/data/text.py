"""Text corpora -> a lazy Ray Dataset of ``{"text": str, "source": str}`` documents.

Formats (picked by extension, or forced with ``fmt``; ``.gz``/``.bz2``/``.zst`` are decompressed):

- ``.txt``: one document per blank-line-separated block (``unit="document"``), or one per
  line (``unit="line"``);
- ``.jsonl``: one JSON object a line, the document in ``text_field``;
- ``.parquet``: the document in the ``text_field`` column.

``source`` may be a file, a folder (read recursively; hidden, ``_`` and other-format files ignored), a glob
(``corpus/*.txt``) or any URI pyarrow's filesystems take (``s3://bucket/corpus/``). Each
record's ``source`` names it as ``FILE:LINE`` (txt, jsonl) or ``FILE:ROW`` (parquet), which is
also the stable key its random masks are derived from.

Files are listed on the driver and streamed by Ray tasks, one file per task, in chunks of
``ROWS_PER_CHUNK`` documents, so neither a large corpus nor a large file is held whole.
Bad records go to the :class:`SkipReporter`: "undecodable record" (invalid UTF-8 or JSON),
"empty text" (an empty document, or a file with none), "unreadable file" (a file that cannot
be opened or parsed), "missing text column" (a parquet file without ``text_field``).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ssl_platform.data.inspect import InspectLedger, report, save, scan
from ssl_platform.data.skips import BadRecordError, SkipReporter
from ssl_platform.data.sources import filesystem, locate

FORMATS = ("txt", "jsonl", "parquet")
SUFFIX_FORMATS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
UNITS = ("document", "line")
ROWS_PER_CHUNK = 1024  # documents per yielded batch: bounds a reader task's memory on huge files
MAX_READ_BLOCKS = 200  # read tasks run in parallel over at most this many groups of files


# ----------------------------------------------------------------------------- listing files


def file_format(path: str, fmt: str = "auto") -> str | None:
    """"txt" | "jsonl" | "parquet" from the name (compression suffix ignored), or None if unknown."""
    if fmt != "auto":
        return fmt
    name = posixpath.basename(path).lower()
    for comp in COMPRESSION_SUFFIXES:
        name = name.removesuffix(comp)
    return SUFFIX_FORMATS.get(posixpath.splitext(name)[1])


def list_text_files(source: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """``[(file, format)]`` of a file, folder, glob or URI, sorted; ValueError naming ``source``
    when it does not exist or holds no text file. Runs on the driver, before any Dataset."""
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"unknown text format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    loc = locate(source, what="text corpus", hint="check the path (or URI)", globs=True)
    if not (loc.is_dir or loc.is_glob) and file_format(loc.path, fmt) is None:
        raise ValueError(f"cannot tell the format of {source!r} from its name; pass fmt= one of {', '.join(FORMATS)}")
    files = [(loc.scheme + p, file_format(p, fmt)) for p in loc.files()]
    files = [(p, f) for p, f in files if f is not None]
    if not files:
        raise ValueError(f"no text files (.txt, .jsonl, .parquet) at {source!r}; point at a file, folder or glob "
                         f"that holds them")
    return files


def _open(file: str, random_access: bool = False):
    fs, path, _ = filesystem(file, "text file")
    if random_access:
        return fs.open_input_file(path)
    return io.BufferedReader(fs.open_input_stream(path, compression="detect"))


# ----------------------------------------------------------------------------- per-format readers
# Each yields (text, source) for good documents and reports bad ones; none raises for bad data.


def _decode(raw: bytes, first: bool) -> str:
    line = raw.decode("utf-8").rstrip("\r\n")
    return line.removeprefix("\ufeff") if first else line


def txt_documents(stream, file: str, unit: str, reporter: SkipReporter) -> Iterator[tuple[str, str]]:
    """Documents of a text file: blank-line-separated blocks, or single lines.

    A line that is not valid UTF-8 spoils its document ("undecodable record"); a file with no
    document at all counts as one "empty text" when read by block.
    """
    block: list[str] = []
    start, bad, found = 0, False, False
    for lineno, raw in enumerate(stream, start=1):
        try:
            line = _decode(raw, lineno == 1)
        except UnicodeDecodeError:
            line = None
        if unit == "line":
            reason = "undecodable record" if line is None else "empty text" if not line.strip() else None
            if reason:
                reporter.skip(f"{file}:{lineno}", reason)
            else:
                found = True
                yield line.strip(), f"{file}:{lineno}"
            continue
        if line is not None and not line.strip():  # a blank line ends the block
            if start:
                found = True
                yield from _finish_block(block, bad, f"{file}:{start}", reporter)
            block, start, bad = [], 0, False
            continue
        start = start or lineno
        if line is None:
            bad = True
        else:
            block.append(line)
    if start:
        found = True
        yield from _finish_block(block, bad, f"{file}:{start}", reporter)
    if not found and unit == "document":
        reporter.skip(file, "empty text")


def _finish_block(lines: list[str], bad: bool, source: str, reporter: SkipReporter) -> Iterator[tuple[str, str]]:
    if bad:
        reporter.skip(source, "undecodable record")
    else:
        yield "\n".join(lines).strip(), source


def jsonl_documents(stream, file: str, text_field: str, reporter: SkipReporter) -> Iterator[tuple[str, str]]:
    """Documents of a JSON-lines file; blank lines are not records."""
    for lineno, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        source = f"{file}:{lineno}"
        try:
            record = json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            reporter.skip(source, "undecodable record")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(text, (str, type(None))):
            reporter.skip(source, "undecodable record")
        elif text is None or not text.strip():
            reporter.skip(source, "empty text")
        else:
            yield text.strip(), source


def parquet_documents(f, file: str, text_field: str, reporter: SkipReporter) -> Iterator[tuple[str, str]]:
    """Documents of a parquet file's ``text_field`` column, read one row group slice at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    if text_field not in pf.schema_arrow.names:
        reporter.skip(file, "missing text column")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=ROWS_PER_CHUNK, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            source = f"{file}:{row}"
            row += 1
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    reporter.skip(source, "undecodable record")
                    continue
            if text is None or not text.strip():
                reporter.skip(source, "empty text")
            else:
                yield text.strip(), source


def file_documents(file: str, fmt: str, *, unit: str, text_field: str,
                   reporter: SkipReporter) -> Iterator[tuple[str, str]]:
    """(text, source) of every good document of one file; an unreadable file is one skip."""
    try:
        if fmt == "parquet":
            with _open(file, random_access=True) as f:
                yield from parquet_documents(f, file, text_field, reporter)
        else:
            with _open(file) as stream:
                if fmt == "jsonl":
                    yield from jsonl_documents(stream, file, text_field, reporter)
                else:
                    yield from txt_documents(stream, file, unit, reporter)
    except BadRecordError:
        raise  # strict mode: the record's own message, not "unreadable file"
    except (OSError, EOFError, zlib.error, ValueError):
        reporter.skip(file, "unreadable file")  # vanished, no permission, truncated gzip, not parquet


def read_files(batch: dict[str, np.ndarray], *, unit: str, text_field: str,
               reporter: SkipReporter) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` generator: ``{"file", "format"}`` rows -> chunks of ``{"text", "source"}``."""
    texts, sources = [], []
    for file, fmt in zip(batch["file"], batch["format"], strict=True):
        for text, source in file_documents(str(file), str(fmt), unit=unit, text_field=text_field, reporter=reporter):
            texts.append(text)
            sources.append(source)
            if len(texts) == ROWS_PER_CHUNK:
                yield _chunk(texts, sources)
                reporter.flush()
                texts, sources = [], []
    reporter.flush()
    if texts:
        yield _chunk(texts, sources)


def _chunk(texts: list[str], sources: list[str]) -> dict[str, np.ndarray]:
    return {"text": np.array(texts, dtype=object), "source": np.array(sources, dtype=object)}


def read_text_corpus(source: str | Path, *, reporter: SkipReporter, unit: str = "document", text_field: str = "text",
                     fmt: str = "auto"):
    """A lazy Ray Dataset of ``{"text": str, "source": str}`` documents (see the module docstring).

    Args:
        source: file, folder, glob or URI; ValueError naming it if it does not exist.
        reporter: where bad records are skipped and counted (or, when strict, raised).
        unit: for .txt files, "document" (blank-line-separated blocks) or "line".
        text_field: JSON key / parquet column holding the text.
        fmt: "auto" (by extension) or one of "txt", "jsonl", "parquet" for every file.
    """
    import ray.data

    if unit not in UNITS:
        raise ValueError(f"unknown text unit {unit!r}; use 'document' (blank-line-separated blocks) or 'line'")
    files = list_text_files(str(source), fmt)
    _check_parquet_column(files, text_field)
    ds = ray.data.from_items([{"file": f, "format": k} for f, k in files],
                             override_num_blocks=min(len(files), MAX_READ_BLOCKS))
    return ds.map_batches(read_files, batch_size=1, batch_format="numpy",
                          fn_kwargs={"unit": unit, "text_field": text_field, "reporter": reporter})


def _check_parquet_column(files: list[tuple[str, str]], text_field: str) -> None:
    """A wrong ``text_field`` is a configuration error: catch it on the first parquet file, up front."""
    import pyarrow.parquet as pq

    first = next((f for f, k in files if k == "parquet"), None)
    if first is None:
        return
    try:
        with _open(first, random_access=True) as f:
            names = pq.read_schema(f).names
    except Exception:  # an unreadable file is skipped (and counted) by the readers instead
        return
    if text_field not in names:
        raise ValueError(f"parquet file {first!r} has no column {text_field!r} (columns: {', '.join(names)}); "
                         f"set the text field to the column that holds the text")


# ----------------------------------------------------------------------------- documents -> sentences

# A sentence ends at . ! or ? (closing quotes/brackets included) followed by space and a capital,
# digit or opening quote: good enough for English prose, and it keeps "e.g. this" together.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]\u201d]*\s+(?=[\"'(\[\u201cA-Z0-9])")
_SPACES = re.compile(r"\s+")


def split_sentences(text: str) -> list[str]:
    """Paragraphs (blank-line separated) -> whitespace-normalised sentences, in order."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = _SPACES.sub(" ", paragraph).strip()
        if paragraph:
            sentences += [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]
    return sentences


def in_split(source: str, split: str, *, val_fraction: float, seed: int) -> bool:
    """Whether a record (by its ``source`` key) belongs to ``split``: a fixed hash, so a document
    stays in the same split whatever the batching, the file order or the number of workers."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    u = zlib.crc32(f"{seed}/{source}".encode()) / 2**32
    return (u < val_fraction) == (split == "val")


def select_split(ds, split: str, *, val_fraction: float, seed: int):
    """The ``split`` documents of a text Dataset (see :func:`in_split`): a filter of whole batches
    (Ray Data's per-row ``filter(fn)`` warns that it is slow, on every user's console)."""
    in_split("", split, val_fraction=val_fraction, seed=seed)  # validate the name before Ray runs

    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.array([in_split(str(s), split, val_fraction=val_fraction, seed=seed) for s in batch["source"]],
                        dtype=bool)
        return {column: values[rows] for column, values in batch.items()}

    return ds.map_batches(keep, batch_format="numpy")


def open_text_corpus(source: str, *, reporter: SkipReporter, split: str | None = None, val_fraction: float = 0.1,
                     seed: int = 0, unit: str = "document", text_field: str = "text", fmt: str = "auto"):
    """A built-in corpus name (``python-docs``, ``python-stdlib``) or files (:func:`read_text_corpus`), whole or one
    split."""
    from ssl_platform.data.text_corpora import TEXT_CORPORA, text_corpus_dataset

    if source in TEXT_CORPORA:
        return text_corpus_dataset(source, split, val_fraction=val_fraction, seed=seed)
    ds = read_text_corpus(source, reporter=reporter, unit=unit, text_field=text_field, fmt=fmt)
    return ds if split is None else select_split(ds, split, val_fraction=val_fraction, seed=seed)


# ----------------------------------------------------------------------------- `sslp data inspect --kind text`


def inspect_text(source: str, out_dir: Path, *, strict: bool = False, unit: str = "document",
                 text_field: str = "text", fmt: str = "auto", vocab_size: int = 2000, max_len: int = 64,
                 num_examples: int = 4, seed: int = 0, max_tokenizer_docs: int = 5000) -> dict:
    """Count a text corpus, report its skipped records, and show BERT masking on a few documents.

    Trains a throw-away WordPiece tokenizer on the first ``max_tokenizer_docs`` documents (saved
    to ``out_dir/tokenizer``), masks one batch of up to 16 documents (BERT pairs) and packs it
    (GPT blocks), and draws ``out_dir/text_masks.png``. Returns
    ``{"records", "skipped", "example", "figure"}``; ``records == 0`` (and no figure) when no
    document is readable, for the caller to refuse the corpus. Ray must be initialised.
    """
    from ssl_platform.data.masking import BertBatcher, GptBlocks, describe_bert_batch, masked_text_figure
    from ssl_platform.data.tokenizer import TokenizerConfig, train_tokenizer

    with InspectLedger(strict) as ledger:
        ds = open_text_corpus(source, reporter=ledger.reporter, unit=unit, text_field=text_field, fmt=fmt)
        records, batch = scan(ds, keep=max_tokenizer_docs, batch_size=256)
    if not records:
        return report(0, ledger.summary)
    texts, sources = [str(t) for t in batch["text"]], [str(s) for s in batch["source"]]
    tok = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=vocab_size))
    tok.save(Path(out_dir) / "tokenizer")
    docs = {"text": np.array(texts[:16], dtype=object), "source": np.array(sources[:16], dtype=object)}
    bert = BertBatcher(tok, max_len=max_len, seed=seed)(docs)
    gpt = GptBlocks(tok, block_size=max_len)(docs)
    example = {"tokenizer": f"{tok.kind}, {tok.vocab_size} tokens", "documents": sources[:num_examples],
               **describe_bert_batch(bert, tok, num_examples),
               "gpt_batch": {k: f"int64 {v.shape}" for k, v in gpt.items()},
               "gpt_block_0": tok.decode(gpt["input_ids"][0])[:300]}
    figure = save(masked_text_figure(bert, tok, num_examples), out_dir, "text_masks.png", dpi=110, bbox_inches="tight")
    return report(records, ledger.summary, example, figure)
