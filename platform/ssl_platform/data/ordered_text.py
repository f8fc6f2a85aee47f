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
  sentences back to the next pair as the evaluation's batcher (``masking.BertBatcher``) does.

The corpus is held in the object store (its tokens, int64): a text corpus must fit there to be
read in order.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ssl_platform.data.masking import (
    IGNORE_INDEX,
    IS_NEXT,
    NOT_NEXT,
    mask_rows,
    special_positions,
    tokenize_documents,
)
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


def bert_chunks(tok: TextTokenizer, texts: list[str], keys: list[str],
                max_len: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The BERT records of a corpus, as numbers (read zero-copy from the object store), and the
    token stream they index.

    Per chunk (the records): its key ``DOCUMENT#K``, its first sentence and number of sentences
    (``first``, ``sentences``), and the range of chunk ids of its document (``doc_lo``, ``doc_hi``:
    never its own random B). Shared: ``tokens``, every kept chunk's sentences one after another
    (int64), and ``bounds``, where each sentence starts in it (one more entry: the end). A chunk
    that cannot make a pair (one sentence of one token) is left out.
    """
    budget = max_len - 3
    sentences, first, count, lo, hi, names = [], [], [], [], [], []
    for key, document in zip(keys, tokenize_documents(tok, texts), strict=True):
        doc_first, chunk, length = len(first), [], 0
        document = [s for s in document if len(s)]
        for i, sentence in enumerate(document):
            chunk.append(sentence)
            length += len(sentence)
            if i == len(document) - 1 or length >= budget:
                if len(chunk) > 1 or len(chunk[0]) >= 2:
                    names.append(f"{key}#{len(first) - doc_first}")
                    first.append(len(sentences))
                    count.append(len(chunk))
                    sentences += chunk
                chunk, length = [], 0
        lo += [doc_first] * (len(first) - doc_first)
        hi += [len(first)] * (len(first) - doc_first)
    bounds = np.zeros(len(sentences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sentences], out=bounds[1:])
    tokens = np.concatenate(sentences).astype(np.int64) if sentences else np.zeros(0, dtype=np.int64)
    records = {"key": np.asarray(names, dtype=object), "first": np.asarray(first, np.int64),
               "sentences": np.asarray(count, np.int64), "doc_lo": np.asarray(lo, np.int64),
               "doc_hi": np.asarray(hi, np.int64)}
    return records, {"tokens": tokens, "bounds": bounds}


class BertChunkPairs:
    """The ordered transform of BERT's chunks: chunk ids -> one masked pair each (see the module docstring).

    The same rows as :func:`~ssl_platform.data.masking.pair_from_chunk` and
    :func:`~ssl_platform.data.masking.masked_pairs` make of each chunk on its own, bit for bit:
    each chunk's three generators draw the same numbers in the same order, in one loop over the
    chunks; the segments are then ranges of the token stream, and the layout, truncation and
    masks are computed for the whole batch at once.

    Output: input_ids, token_type_ids, attention_mask, mlm_labels (B, max_len) int64, nsp_labels (B,) int64.
    """

    reads_by_id = True  # see ordered.ReadRecords: a random B comes from any chunk of the corpus

    def __init__(self, tokenizer: TextTokenizer | str | Path, max_len: int, seed: int, epoch: int = 0,
                 next_prob: float = 0.5, **mask_args: float):
        self.tokenizer, self.max_len, self.seed, self.epoch = tokenizer, max_len, seed, epoch
        self.next_prob, self.mask_args = next_prob, mask_args

    def __call__(self, ids: np.ndarray, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = self.tokenizer = as_tokenizer(self.tokenizer)
        ids = np.asarray(ids, dtype=np.int64)
        bounds, first, count = table["bounds"], table["first"], table["sentences"]
        lo, hi, keys = table["doc_lo"], table["doc_hi"], table["key"]
        n, budget = len(first), self.max_len - 3
        # 1. Per chunk, its generators' draws (as pair_from_chunk makes them): where A ends, true or
        #    random B, and for a random B the donor chunk and the sentence it starts at.
        a_end, label, b_start = (np.zeros(len(ids), np.int64) for _ in range(3))
        mask_rngs = []
        b_donor = np.full(len(ids), -1, np.int64)  # -1: B is the chunk's own rest
        for r, i in enumerate(ids.tolist()):
            pair_rng, donor_rng, mask_rng = record_rng(self.seed, self.epoch, str(keys[i])).spawn(3)
            f, k = int(first[i]), int(count[i])
            if k == 1:  # cut the one sentence, so that a true continuation exists
                a_end[r] = bounds[f] + int(pair_rng.integers(1, int(bounds[f + 1] - bounds[f])))
            else:
                a_end[r] = bounds[f + int(pair_rng.integers(1, k))]
            is_next = pair_rng.random() < self.next_prob  # always drawn: the stream does not depend on the donors
            others = n - int(hi[i] - lo[i])
            if not others:
                label[r] = IGNORE_INDEX
            elif is_next:
                label[r] = IS_NEXT
            else:
                j = int(donor_rng.integers(others))
                j = j if j < lo[i] else j + int(hi[i] - lo[i])  # OtherChunks: every chunk but the document's
                label[r], b_donor[r] = NOT_NEXT, j
                b_start[r] = bounds[first[j] + int(donor_rng.integers(int(count[j])))]
            mask_rngs.append(mask_rng)
        # 2. The segments as ranges of the token stream, truncated longest-first (truncate_pair).
        chunk_start, chunk_end = bounds[first[ids]], bounds[first[ids] + count[ids]]
        la = a_end - chunk_start
        random_b = b_donor >= 0
        donor_end = bounds[first[b_donor] + count[b_donor]]  # only read where random_b
        b_start = np.where(random_b, b_start, a_end)
        lb = np.where(random_b, np.minimum(np.maximum(1, budget - la), donor_end - b_start), chunk_end - a_end)
        la, lb = truncated_lengths(la, lb, budget)
        # 3. [CLS] A [SEP] B [SEP] [PAD]..., gathered from the token stream for the whole batch.
        enc = encode_ranges(table["tokens"], a_end - la, la, b_start, lb, max_len=self.max_len, cls_id=tok.cls_id,
                            sep_id=tok.sep_id, pad_id=tok.pad_id)
        enc["nsp_labels"] = label
        special = special_positions(enc["input_ids"], enc["attention_mask"], tok.special_ids)
        enc["input_ids"], enc["mlm_labels"] = mask_rows(enc["input_ids"], special, mask_rngs,
                                                        vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                                                        special_ids=tok.special_ids, **self.mask_args)
        return enc


def truncated_lengths(la: np.ndarray, lb: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~ssl_platform.data.masking.truncate_pair`'s lengths for arrays of pairs (B,) each."""
    over = la + lb > budget
    longer_only = 2 * np.minimum(la, lb) <= budget
    a_cut = np.where(longer_only, np.where(la > lb, budget - lb, la), (budget + 1) // 2)
    b_cut = np.where(longer_only, np.where(la > lb, lb, budget - la), budget // 2)
    return np.where(over, a_cut, la), np.where(over, b_cut, lb)


def encode_ranges(tokens: np.ndarray, a_start: np.ndarray, la: np.ndarray, b_start: np.ndarray, lb: np.ndarray, *,
                  max_len: int, cls_id: int, sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
    """:func:`~ssl_platform.data.masking.encode_pairs` of pairs given as ranges of ``tokens``: row r's A is
    ``tokens[a_start[r]:a_start[r] + la[r]]``, its B likewise; ``la + lb <= max_len - 3``.

    Shape: input_ids, token_type_ids, attention_mask (B, max_len) int64.
    """
    j = np.arange(max_len)[None, :]  # (1, L) position
    la, lb = la[:, None], lb[:, None]  # (B, 1)
    in_a = (j >= 1) & (j <= la)
    in_b = (j >= la + 2) & (j <= la + lb + 1)
    where = np.where(in_a, a_start[:, None] + j - 1, np.where(in_b, b_start[:, None] + j - la - 2, 0))
    text = tokens[where]
    ids = np.select([j == 0, in_a, j == la + 1, in_b, j == la + lb + 2], [cls_id, text, sep_id, text, sep_id],
                    pad_id).astype(np.int64)
    attention = (j <= la + lb + 2).astype(np.int64)
    types = ((j >= la + 2) & (j <= la + lb + 2)).astype(np.int64)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": attention}
