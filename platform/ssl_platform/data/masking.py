"""BERT masked-LM inputs with next-sentence pairs, and GPT's packed blocks, batched for ``map_batches``.

Pure numpy plus the trained tokenizer: nothing here needs Ray, so every piece is unit-tested
alone, and the two ``map_batches`` callables (:class:`BertBatcher`, :class:`GptBlocks`) are
plain picklable objects run on CPU tasks.

BERT (Devlin et al. 2019, sec. 3.1 and appendix A.1), per document of a batch:

1. The document is split into sentences and tokenised. Consecutive sentences fill a chunk of
   up to ``max_len - 3`` tokens; a random cut splits the chunk into segment A and its true
   continuation B (a single-sentence chunk is cut inside the sentence, so every chunk can give
   a true pair and exactly ``next_prob`` of the pairs are true).
2. With probability ``1 - next_prob`` B is replaced by a segment of another document of the
   *same batch* (the batch must hold more than one document; a lone document's pairs keep
   their true B and get ``nsp_labels = IGNORE_INDEX``, which the NSP loss skips). Sentences the
   random B displaced go back into the document, as in Google's implementation.
3. ``[CLS] A [SEP] B [SEP]``, segment ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``, cut to
   ``max_len`` longest-first (A loses tokens from its start, B from its end, so a true pair
   stays contiguous across the [SEP]), padded with [PAD] and ``attention_mask`` 0.
4. :func:`mask_tokens`: 15% of the non-special, non-padding tokens are selected; of those 80%
   become [MASK], 10% a random non-special token, 10% stay. ``mlm_labels`` holds the original
   id at selected positions and ``IGNORE_INDEX`` everywhere else.

``nsp_labels``: ``IS_NEXT = 1`` when B follows A, ``NOT_NEXT = 0`` when B is random, matching
``ssl_models.methods.bert.NSPHead`` ("class 1 = sentence B follows sentence A"). Note that
Hugging Face's ``BertForPreTraining`` uses the opposite (0 = is next).

Randomness: each document draws from generators fixed by ``(seed, epoch, source)``, one each
for the pair structure, the random-B donor and the masks, so its pairs and mask positions do
not depend on which batch it lands in; random B segments come from the batch's other
documents, taken in ``source`` order (the same set of documents gives the same pairs in any
order). ``seed=None`` draws fresh masks on every pass (RoBERTa's dynamic masking); with a seed,
build the batcher with the next ``epoch`` for the next pass.

GPT (Radford et al. 2019): the batch's documents are tokenised and concatenated, each
followed by the end-of-text token, and cut into blocks of exactly ``block_size`` tokens. The
batch's last, partial block is padded (``attention_mask`` 0, so the loss skips it) or, with
``tail="drop"``, dropped; no other block is padded.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ssl_platform.data.randomness import record_rng
from ssl_platform.data.text import split_sentences
from ssl_platform.data.tokenizer import TextTokenizer, as_tokenizer

IGNORE_INDEX = -100  # ssl_models.losses.tokens.IGNORE_INDEX (data does not import ssl_models)
IS_NEXT, NOT_NEXT = 1, 0  # ssl_models' NSPHead: class 1 = "B follows A"
BERT_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels")


# ----------------------------------------------------------------------------- masked LM


def check_masking(mask_prob: float, mask_token_frac: float, random_token_frac: float) -> None:
    """Reject BERT masking fractions that cannot be drawn, in one sentence."""
    if not 0.0 <= mask_prob <= 1.0 or min(mask_token_frac, random_token_frac) < 0 or \
            mask_token_frac + random_token_frac > 1.0:
        raise ValueError(f"need 0 <= mask_prob <= 1 and mask_token_frac + random_token_frac <= 1, got "
                         f"{mask_prob}, {mask_token_frac} and {random_token_frac}")


@lru_cache(maxsize=16)
def replacement_ids(vocab_size: int, special_ids: tuple[int, ...]) -> np.ndarray:
    """The ids a random replacement draws from: [0, vocab_size) without ``special_ids`` (read-only, cached)."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, dtype=np.int64))
    allowed.setflags(write=False)
    return allowed


def special_positions(input_ids: np.ndarray, attention_mask: np.ndarray, special_ids) -> np.ndarray:
    """True at special tokens and padding, where masking never selects: ``np.isin`` by a lookup table."""
    ids = np.asarray(input_ids)
    special = np.asarray(special_ids, dtype=np.int64)
    table = np.zeros(max(int(ids.max(initial=0)), int(special.max(initial=0))) + 1, dtype=bool)
    table[special] = True
    return table[ids] | (np.asarray(attention_mask) == 0)


def mask_actions(select_u: np.ndarray, action_u: np.ndarray, special_mask: np.ndarray, mask_prob: float,
                 mask_token_frac: float, random_token_frac: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(selected, to [MASK], to a random token) from two uniforms per position (B, L) each."""
    selected = (select_u < mask_prob) & ~np.asarray(special_mask, dtype=bool)
    to_mask = selected & (action_u < mask_token_frac)
    to_random = selected & (action_u >= mask_token_frac) & (action_u < mask_token_frac + random_token_frac)
    return selected, to_mask, to_random


def mask_tokens(input_ids: np.ndarray, special_mask: np.ndarray, *, vocab_size: int, mask_id: int,
                rng: np.random.Generator, mask_prob: float = 0.15, mask_token_frac: float = 0.8,
                random_token_frac: float = 0.1, special_ids=()) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of a batch of token ids.

    Each position not in ``special_mask`` is selected with probability ``mask_prob``; a
    selected token becomes ``mask_id`` (``mask_token_frac``), a random token drawn uniformly
    from the ids in [0, vocab_size) that are not in ``special_ids`` (``random_token_frac``), or
    stays as it is (the rest).

    Shape:
        - input_ids, special_mask: (B, L); special_mask is True at special and padding tokens.
        - output: (masked ids (B, L) of input_ids' dtype, labels (B, L) int64: the original id
          at selected positions, IGNORE_INDEX elsewhere).
    """
    check_masking(mask_prob, mask_token_frac, random_token_frac)
    ids = np.asarray(input_ids)
    select_u = rng.random(ids.shape)
    action_u = rng.random(ids.shape)  # one draw per position, so positions never depend on content
    selected, to_mask, to_random = mask_actions(select_u, action_u, special_mask, mask_prob, mask_token_frac,
                                                random_token_frac)
    allowed = replacement_ids(vocab_size, tuple(int(i) for i in special_ids))
    out = ids.copy()
    out[to_mask] = mask_id
    out[to_random] = allowed[rng.integers(0, len(allowed), size=int(to_random.sum()))]
    labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int64)
    return out, labels


def mask_rows(input_ids: np.ndarray, special_mask: np.ndarray, rngs: list[np.random.Generator], *,
              vocab_size: int, mask_id: int, mask_prob: float = 0.15, mask_token_frac: float = 0.8,
              random_token_frac: float = 0.1, special_ids=()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mask_tokens` of each row ``r`` with its own generator ``rngs[r]``, for the whole batch at once.

    Row r's result is exactly ``mask_tokens(input_ids[r:r+1], special_mask[r:r+1], rng=rngs[r], ...)``:
    the generators draw the same numbers in the same order (two uniforms per position, then the
    random replacements), and the masks are computed over the batch. Shapes as :func:`mask_tokens`.
    """
    check_masking(mask_prob, mask_token_frac, random_token_frac)
    ids = np.asarray(input_ids)
    length = ids.shape[1]
    uniforms = np.empty((len(rngs), 2, length))  # (B, 2, L): select, action
    for r, rng in enumerate(rngs):
        rng.random(out=uniforms[r, 0])
        rng.random(out=uniforms[r, 1])
    selected, to_mask, to_random = mask_actions(uniforms[:, 0], uniforms[:, 1], special_mask, mask_prob,
                                                mask_token_frac, random_token_frac)
    allowed = replacement_ids(vocab_size, tuple(int(i) for i in special_ids))
    counts = to_random.sum(axis=1)
    out = ids.copy()
    out[to_mask] = mask_id
    if counts.any():  # row-major, as out[to_random] fills: row r's draws in the order of its positions
        draws = [rngs[r].integers(0, len(allowed), size=int(c)) for r, c in enumerate(counts) if c]
        out[to_random] = allowed[np.concatenate(draws)]
    labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int64)
    return out, labels


# ----------------------------------------------------------------------------- next-sentence pairs


def truncate_pair(a: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest-first truncation to ``len(a) + len(b) <= budget``, A from its start, B from its end.

    Same result as removing one token at a time from the longer segment (B on ties).
    """
    la, lb = len(a), len(b)
    if la + lb > budget:
        if 2 * min(la, lb) <= budget:  # only the longer one is cut
            la, lb = (budget - lb, lb) if la > lb else (la, budget - la)
        else:  # both are cut to (about) half
            la, lb = (budget + 1) // 2, budget // 2
    return a[len(a) - la:], b[:lb]


def _random_segment(sentences: list[np.ndarray], length: int, rng: np.random.Generator) -> np.ndarray:
    """About ``length`` tokens of consecutive sentences from a random start in a document."""
    sentences = [s for s in sentences if len(s)]
    out, n = [], 0
    for s in sentences[int(rng.integers(len(sentences))):]:
        out.append(s)
        n += len(s)
        if n >= length:
            break
    return np.concatenate(out)[:length]


def pair_from_chunk(chunk, documents, donors, budget, rng, donor_rng, next_prob):
    """One (A, B, label) from a chunk of consecutive sentences, and how many sentences to put back."""
    if len(chunk) == 1:  # cut the one sentence, so that a true continuation exists
        if len(chunk[0]) < 2:
            return None, 0
        cut = int(rng.integers(1, len(chunk[0])))
        a_parts, b_parts = [chunk[0][:cut]], [chunk[0][cut:]]
    else:
        a_end = int(rng.integers(1, len(chunk)))
        a_parts, b_parts = chunk[:a_end], chunk[a_end:]
    a = np.concatenate(a_parts)
    is_next = rng.random() < next_prob  # always drawn: the stream does not depend on the donors
    unused = 0
    if not donors:
        b, label = np.concatenate(b_parts), IGNORE_INDEX
    elif is_next:
        b, label = np.concatenate(b_parts), IS_NEXT
    else:
        donor = documents[donors[int(donor_rng.integers(len(donors)))]]
        b, label = _random_segment(donor, max(1, budget - len(a)), donor_rng), NOT_NEXT
        unused = len(b_parts) if len(chunk) > 1 else 0
    a, b = truncate_pair(a, b, budget)
    return (a, b, label), unused


def nsp_pairs(documents: list[list[np.ndarray]], index: int, *, max_len: int, rng: np.random.Generator,
              donor_rng: np.random.Generator | None = None, next_prob: float = 0.5,
              donors: list[int] | None = None) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Sentence pairs of ``documents[index]`` (see the module docstring, steps 1-2).

    Args:
        documents: each document a list of sentences, each sentence a 1-D array of token ids.
        index: the document to pair.
        max_len: sequence length with [CLS] and two [SEP]s; A and B share ``max_len - 3`` tokens.
        rng: draws the chunk cuts and the true/random coins.
        donor_rng: draws which document and where a random B comes from (default ``rng``).
        next_prob: probability that B is the true continuation.
        donors: documents a random B may come from (default: every other non-empty document).

    Returns:
        ``[(a, b, label)]`` with label IS_NEXT, NOT_NEXT, or IGNORE_INDEX when there is no donor.
    """
    if max_len < 5:
        raise ValueError(f"max_len must leave room for [CLS], two [SEP]s and two tokens, got {max_len}")
    budget = max_len - 3
    sentences = [s for s in documents[index] if len(s)]
    if donors is None:
        donors = [j for j, d in enumerate(documents) if j != index and any(len(s) for s in d)]
    pairs, chunk, length, i = [], [], 0, 0
    while i < len(sentences):
        chunk.append(sentences[i])
        length += len(sentences[i])
        if i == len(sentences) - 1 or length >= budget:
            pair, unused = pair_from_chunk(chunk, documents, donors, budget, rng, donor_rng or rng, next_prob)
            if pair is not None:
                pairs.append(pair)
            i -= unused  # a random B leaves the chunk's B sentences for the next pair
            chunk, length = [], 0
        i += 1
    return pairs


def encode_pairs(pairs: list[tuple[np.ndarray, np.ndarray, int]], *, max_len: int, cls_id: int, sep_id: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` + padding. Pairs must already fit (``len(a) + len(b) <= max_len - 3``).

    Shape: input_ids, token_type_ids, attention_mask (N, max_len) int64; nsp_labels (N,) int64.
    """
    n = len(pairs)
    ids = np.full((n, max_len), pad_id, dtype=np.int64)
    types = np.zeros((n, max_len), dtype=np.int64)
    attention = np.zeros((n, max_len), dtype=np.int64)
    for r, (a, b, _) in enumerate(pairs):
        la, lb = len(a), len(b)
        ids[r, : la + lb + 3] = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]])
        types[r, la + 2: la + lb + 3] = 1
        attention[r, : la + lb + 3] = 1
    labels = np.array([p[2] for p in pairs], dtype=np.int64)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": attention, "nsp_labels": labels}


def _empty_bert(max_len: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((0,) if k == "nsp_labels" else (0, max_len), dtype=np.int64) for k in BERT_KEYS}


class BertBatcher:
    """``map_batches`` callable: ``{"text", "source"}`` documents -> BERT pretraining rows.

    Output (N pairs, N >= 0, several per document): input_ids, token_type_ids, attention_mask,
    mlm_labels (N, max_len) int64 and nsp_labels (N,) int64, the keys ``ssl_models``' BERT eats.

    Args:
        tokenizer: a WordPiece :class:`TextTokenizer` or the directory it was saved in (loaded
            on first use, in the worker).
        max_len: sequence length, the model's ``max_len``.
        seed, epoch: fix the draws (see the module docstring); seed None = fresh every call.
        mask_prob, mask_token_frac, random_token_frac: BERT's 15% / 80-10-10.
        next_prob: fraction of true-next pairs.
    """

    def __init__(self, tokenizer: TextTokenizer | str | Path, max_len: int = 128, seed: int | None = None,
                 epoch: int = 0, mask_prob: float = 0.15, mask_token_frac: float = 0.8,
                 random_token_frac: float = 0.1, next_prob: float = 0.5):
        self.tokenizer = tokenizer
        self.max_len, self.seed, self.epoch, self.next_prob = max_len, seed, epoch, next_prob
        self.mask_args = dict(mask_prob=mask_prob, mask_token_frac=mask_token_frac,
                              random_token_frac=random_token_frac)

    def _tokenizer(self) -> TextTokenizer:
        tok = self.tokenizer = as_tokenizer(self.tokenizer)
        if tok.mask_id is None or tok.cls_id is None:
            raise ValueError(f"BERT batches need [CLS], [SEP] and [MASK]; the {tok.kind} tokenizer has none: "
                             f"use a wordpiece tokenizer")
        return tok

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = self._tokenizer()
        texts = [str(t) for t in batch["text"]]
        keys = [str(k) for k in batch["source"]] if "source" in batch else texts
        documents = tokenize_documents(tok, texts)
        order = sorted(range(len(keys)), key=keys.__getitem__)  # donors in key order: batch order is irrelevant
        rows = []
        for i, key in enumerate(keys):
            pair_rng, donor_rng, mask_rng = record_rng(self.seed, self.epoch, key).spawn(3)
            donors = [j for j in order if j != i and any(len(s) for s in documents[j])]
            pairs = nsp_pairs(documents, i, max_len=self.max_len, rng=pair_rng, donor_rng=donor_rng,
                              next_prob=self.next_prob, donors=donors)
            if pairs:
                rows.append(masked_pairs(pairs, tok, self.max_len, mask_rng, self.mask_args))
        if not rows:
            return _empty_bert(self.max_len)
        return {k: np.concatenate([r[k] for r in rows]) for k in BERT_KEYS}


def masked_pairs(pairs: list[tuple[np.ndarray, np.ndarray, int]], tok: TextTokenizer, max_len: int,
                 rng: np.random.Generator, mask_args: dict) -> dict[str, np.ndarray]:
    """Pairs -> BERT rows (:func:`encode_pairs`, then :func:`mask_tokens` drawing from ``rng``)."""
    enc = encode_pairs(pairs, max_len=max_len, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id)
    special = special_positions(enc["input_ids"], enc["attention_mask"], tok.special_ids)
    enc["input_ids"], enc["mlm_labels"] = mask_tokens(enc["input_ids"], special, vocab_size=tok.vocab_size,
                                                      mask_id=tok.mask_id, rng=rng, special_ids=tok.special_ids,
                                                      **mask_args)
    return enc


def tokenize_documents(tok: TextTokenizer, texts: list[str]) -> list[list[np.ndarray]]:
    """Each text -> its sentences -> token ids, with one tokenizer call for the whole batch."""
    sentences = [split_sentences(t) for t in texts]
    flat = tok.encode_batch([s for doc in sentences for s in doc])
    out, k = [], 0
    for doc in sentences:
        out.append([np.asarray(ids, dtype=np.int64) for ids in flat[k: k + len(doc)]])
        k += len(doc)
    return out


# ----------------------------------------------------------------------------- GPT blocks


def pack_blocks(documents: list[list[int]], *, block_size: int, eot_id: int, pad_id: int,
                tail: str = "pad") -> dict[str, np.ndarray]:
    """Documents -> ``doc0 <eot> doc1 <eot> ...`` cut into rows of ``block_size`` tokens.

    The last, partial row is padded with ``pad_id`` and ``attention_mask`` 0 (``tail="pad"``)
    or dropped (``tail="drop"``). Shape: input_ids, attention_mask (N, block_size) int64.
    """
    if tail not in ("pad", "drop"):
        raise ValueError(f"tail must be 'pad' or 'drop', got {tail!r}")
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    stream = np.fromiter((t for doc in documents for t in (*doc, eot_id)), dtype=np.int64)
    n_full, rest = divmod(len(stream), block_size)
    ids = stream[: n_full * block_size].reshape(n_full, block_size)
    attention = np.ones_like(ids)
    if rest and tail == "pad":
        last = np.full((1, block_size), pad_id, dtype=np.int64)
        last[0, :rest] = stream[n_full * block_size:]
        ids = np.concatenate([ids, last])
        attention = np.concatenate([attention, (np.arange(block_size) < rest)[None].astype(np.int64)])
    return {"input_ids": ids, "attention_mask": attention}


class GptBlocks:
    """``map_batches`` callable: ``{"text", ...}`` documents -> GPT blocks (see :func:`pack_blocks`).

    Deterministic (no randomness): the blocks depend only on the batch's documents and order.

    Args:
        tokenizer: a :class:`TextTokenizer` (byte-level BPE for GPT; a WordPiece one separates
            documents with [SEP]) or the directory it was saved in.
        block_size: tokens per row, the model's ``max_len``.
        tail: "pad" or "drop" the batch's last, partial block.
    """

    def __init__(self, tokenizer: TextTokenizer | str | Path, block_size: int = 128, tail: str = "pad"):
        self.tokenizer, self.block_size, self.tail = tokenizer, block_size, tail

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = self.tokenizer = as_tokenizer(self.tokenizer)
        ids = tok.encode_batch([str(t) for t in batch["text"]])
        return pack_blocks(ids, block_size=self.block_size, eot_id=tok.eot_id, pad_id=tok.pad_id, tail=self.tail)


# ----------------------------------------------------------------------------- showing the masks

MARKS = {0: "{}", 1: "[MASK:{1}]", 2: "{0}[was:{1}]", 3: "{0}[kept]"}
MARKS_LEGEND = "[MASK:x] masked x; y[was:x] x replaced by random y; x[kept] selected but unchanged"


def _mask_kinds(bert: dict[str, np.ndarray], mask_id: int) -> np.ndarray:
    """Per position: 0 not selected, 1 [MASK], 2 random token, 3 selected but kept. (N, L) int."""
    labels, ids = bert["mlm_labels"], bert["input_ids"]
    selected = labels != IGNORE_INDEX
    kind = np.where(ids == mask_id, 1, np.where(ids == labels, 3, 2))
    return np.where(selected, kind, 0)


def describe_bert_batch(bert: dict[str, np.ndarray], tok, n: int) -> dict:
    """Shapes, mask statistics and the first ``n`` sequences as text with the masks written in."""
    kinds = _mask_kinds(bert, tok.mask_id)
    real = bert["attention_mask"] == 1
    shown = []
    for r in range(min(n, len(kinds))):
        words = tok.tokens(bert["input_ids"][r][real[r]])
        originals = tok.tokens(np.maximum(bert["mlm_labels"][r][real[r]], 0))
        shown.append(" ".join(MARKS[k].format(w, o) for w, o, k in zip(words, originals, kinds[r], strict=False)))
    return {"bert_batch": {k: f"int64 {v.shape}" for k, v in bert.items()}, "masked_text_legend": MARKS_LEGEND,
            "selected_fraction": round(float((kinds > 0).sum() / max(1, real.sum())), 3),
            "nsp_labels (1 = B follows A)": bert["nsp_labels"][:n].tolist(), "masked_text": shown}


def masked_text_figure(bert: dict[str, np.ndarray], tok, n: int, width: int = 150):
    """A matplotlib Figure of the first ``n`` sequences' tokens as text; selected positions boxed
    by what masking did, with the original token in small type underneath."""
    from matplotlib.figure import Figure

    colours = {1: "#f3a1a1", 2: "#f7cf7f", 3: "#a9dba9"}
    kinds = _mask_kinds(bert, tok.mask_id)
    lines = []  # (y, x, token, original, kind, segment) per drawn token; y counts text lines
    y = 0
    for r in range(min(n, len(kinds))):
        label = {1: "B follows A", 0: "B is random"}.get(int(bert["nsp_labels"][r]), "no NSP label")
        lines.append((y, 0, f"sequence {r}: NSP label {int(bert['nsp_labels'][r])} ({label})", "", -1, 0))
        y, x = y + 1, 0
        real = int(bert["attention_mask"][r].sum())
        for ids_i, lab, k, seg in zip(bert["input_ids"][r][:real], bert["mlm_labels"][r][:real], kinds[r][:real],
                                      bert["token_type_ids"][r][:real], strict=True):
            word = tok.tokens([ids_i])[0]
            orig = tok.tokens([lab])[0] if k in (1, 2) else ""  # a kept token is its own original
            cell = max(len(word), len(orig)) + 1
            if x + cell > width:
                y, x = y + 1, 0
            lines.append((y, x, word, orig, int(k), int(seg)))
            x += cell
        y += 2
    fig = Figure(figsize=(13, 0.42 * y + 0.9))
    ax = fig.subplots()
    ax.set_xlim(0, width)
    ax.set_ylim(y, -1.5)
    ax.axis("off")
    for yy, x, word, orig, k, seg in lines:
        if k < 0:
            ax.text(x, yy, word, fontsize=9, weight="bold", va="center")
            continue
        box = {"facecolor": colours[k], "edgecolor": "none", "pad": 1.0} if k else None
        colour = "0.5" if word.startswith("[") and k == 0 else ("#1f3a93" if seg else "black")
        ax.text(x, yy, word, family="monospace", fontsize=8, va="center", color=colour, bbox=box)
        if orig:
            ax.text(x, yy + 0.42, orig, family="monospace", fontsize=6, va="center", color="0.35")
    legend = [("[MASK]", 1), ("random token", 2), ("kept", 3)]
    for i, (text, k) in enumerate(legend):
        ax.text(i * 22, -1.2, text, fontsize=9, va="center", bbox={"facecolor": colours[k], "edgecolor": "none"})
    ax.text(66, -1.2, "small grey: original token (the label)   black: segment A   blue: segment B",
            fontsize=9, va="center", color="0.3")
    return fig
