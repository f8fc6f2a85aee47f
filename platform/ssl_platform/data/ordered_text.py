"""Text corpora in the epoch's order (issue 18): BERT's sentence chunks and GPT's blocks as records.

A text corpus becomes records once, on the driver, before training; an epoch then reads them in
its order (:mod:`~ssl_platform.data.order`) like any ordered corpus:

- the documents, in a fixed order: a built-in corpus's own, or a file corpus's by (file, line or
  row), so that Ray's read order does not matter;
- GPT: their tokens, each document followed by end-of-text, cut into blocks (``pack_blocks``);
  a block is a record, read as it is;
- BERT: each document's sentences, tokenised, grouped into chunks of consecutive sentences of up
  to ``max_len - 3`` tokens (step 1 of :mod:`~ssl_platform.data.masking`, without randomness); a
  chunk is a record. Per epoch, :class:`BertChunkPairs` turns chunk ``k`` into one pair: where A
  ends, whether B is the true continuation or a segment of a chunk of another document (drawn
  from the whole corpus, not from the batch), and the masks, all from (seed, epoch, the chunk's
  key). So a global batch's rows are the same on 1 or N workers and in every attempt, and a
  resume skips chunks by position. One pair per chunk: a random B does not give its displaced
  sentences back to the next pair as the split stream's batcher does.

The corpus is held in the object store (its tokens, int64): a text corpus must fit there to be
read in order.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ssl_platform.data.masking import masked_pairs, pair_from_chunk, tokenize_documents
from ssl_platform.data.randomness import record_rng
from ssl_platform.data.tokenizer import TextTokenizer, as_tokenizer


def documents_in_order(ds) -> tuple[list[str], list[str]]:
    """(texts, keys) of a text Dataset's ``{"text", "source"}`` rows, sorted by (file, line or row):
    the same list whatever order Ray read the files in."""
    def position(source: str) -> tuple[str, int]:
        file, _, line = source.rpartition(":")
        return (file, int(line)) if line.isdigit() else (source, -1)

    rows = sorted(ds.take_all(), key=lambda r: position(str(r["source"])))
    return [str(r["text"]) for r in rows], [str(r["source"]) for r in rows]


def documents_digest(texts: list[str], keys: list[str]) -> str:
    """A hash of a file corpus's documents and their keys, for the resume fingerprint: an edited
    or moved document refuses the exact resume."""
    crc = 0
    for key, text in zip(keys, texts, strict=True):
        crc = zlib.crc32(text.encode(), zlib.crc32(key.encode(), crc))
    return f"{crc:08x}"


def bert_chunks(tok: TextTokenizer, texts: list[str], keys: list[str], max_len: int) -> dict[str, np.ndarray]:
    """The BERT records of a corpus: per chunk its sentences (a tuple of int64 token arrays), the
    range of chunk ids of its document (``doc_lo``, ``doc_hi``: never its own random B) and its key
    ``DOCUMENT#K``. A chunk that cannot make a pair (one sentence of one token) is left out."""
    budget = max_len - 3
    sentences, lo, hi, names = [], [], [], []
    for key, document in zip(keys, tokenize_documents(tok, texts), strict=True):
        first, chunk, length = len(sentences), [], 0
        document = [s for s in document if len(s)]
        for i, sentence in enumerate(document):
            chunk.append(sentence)
            length += len(sentence)
            if i == len(document) - 1 or length >= budget:
                if len(chunk) > 1 or len(chunk[0]) >= 2:
                    sentences.append(tuple(chunk))
                    names.append(f"{key}#{len(sentences) - first - 1}")
                chunk, length = [], 0
        lo += [first] * (len(sentences) - first)
        hi += [len(sentences)] * (len(sentences) - first)
    records = np.empty(len(sentences), dtype=object)
    records[:] = sentences
    return {"sentences": records, "doc_lo": np.asarray(lo, np.int64), "doc_hi": np.asarray(hi, np.int64),
            "key": np.asarray(names, dtype=object)}


class OtherChunks:
    """The chunk ids 0..n-1 but those of one document (``lo..hi-1``), as a sequence: where a random B comes from."""

    def __init__(self, n: int, lo: int, hi: int):
        self.n, self.lo, self.hi = n, lo, hi

    def __len__(self) -> int:
        return self.n - (self.hi - self.lo)

    def __getitem__(self, i: int) -> int:
        return i if i < self.lo else i + (self.hi - self.lo)


class BertChunkPairs:
    """The ordered transform of BERT's chunks: chunk ids -> one masked pair each (see the module docstring).

    Output: input_ids, token_type_ids, attention_mask, mlm_labels (B, max_len) int64, nsp_labels (B,) int64.
    """

    reads_by_id = True  # see ordered.ReadRecords: a random B comes from any chunk of the corpus

    def __init__(self, tokenizer: TextTokenizer | str | Path, max_len: int, seed: int, epoch: int = 0,
                 next_prob: float = 0.5, **mask_args: float):
        self.tokenizer, self.max_len, self.seed, self.epoch = tokenizer, max_len, seed, epoch
        self.next_prob, self.mask_args = next_prob, mask_args

    def __call__(self, ids: np.ndarray, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = self.tokenizer = as_tokenizer(self.tokenizer)
        chunks, n, rows = table["sentences"], len(table["sentences"]), []
        for i in ids:
            pair_rng, donor_rng, mask_rng = record_rng(self.seed, self.epoch, str(table["key"][i])).spawn(3)
            donors = OtherChunks(n, int(table["doc_lo"][i]), int(table["doc_hi"][i]))
            pair, _ = pair_from_chunk(list(chunks[i]), chunks, donors, self.max_len - 3, pair_rng, donor_rng,
                                       self.next_prob)
            rows.append(masked_pairs([pair], tok, self.max_len, mask_rng, self.mask_args))
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
