"""The held-out table of a BERT or GPT run: what the language model learnt, against baselines.

Every number is computed on the held-out documents (``open_text_corpus(split="val")``: python-docs
topics or python-stdlib modules held out whole, or the held-out documents of ``data.path``), with
the run's own tokenizer (``checkpoint_dir/tokenizer``) and batches built exactly as in training, by
Ray Data batch inference (:func:`ssl_platform.evaluate.inference.extract`).

BERT (Devlin et al. 2019):

- masked-LM accuracy: top-1 over the masked positions only, with training's masking
  (:class:`~ssl_platform.data.masking.BertBatcher`: 15%, 80/10/10) under a fixed seed, so every
  evaluation of every run scores the same positions;
- next-sentence accuracy on the same pairs (half true continuations, half random segments of
  another held-out document, as in training);
- a linear probe (and kNN) of the [CLS] features for the *topic*: the label of a sequence is
  the held-out document it was cut from (a python-docs help topic such as "if" or "typesseq", a
  python-stdlib module such as "json.decoder").
  The held-out documents never reach pretraining, and their chunks are split alternately into
  probe-train and probe-test, so the probe asks whether [CLS] separates unseen topics.

GPT (Radford et al. 2019):

- perplexity and bits per token: the mean next-token cross-entropy over the held-out blocks
  (:class:`~ssl_platform.data.masking.GptBlocks`, as in training), ``exp`` of it and it over ln 2;
- a unigram model: each token's frequency in the training split, add-one smoothed
  (``p(t) = (count_t + 1) / (N + V)``), scored on the same held-out target tokens. A language
  model that does not beat it has learnt no more than which tokens are common;
- a bigram model of the training split, Witten-Bell smoothed towards that unigram (Witten and
  Bell 1991; Chen and Goodman 1998): ``p(t | s) = (c(s, t) + T(s) p_uni(t)) / (c(s) + T(s))``,
  ``T(s)`` the number of distinct tokens seen after ``s``; no parameter is fitted on held-out
  data. A model that does not beat it has learnt no more than which token follows which;
- samples from a few prompts, one a few-shot in-context prompt, in results.md and results.json.

Both have a random-init row: the same architecture, untrained (perplexity about the vocabulary
size, MLM accuracy about 1 / V). BERT's MLM accuracy also has the most-frequent-token row: the
accuracy of always answering the training split's commonest token at every masked position.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.masking import IGNORE_INDEX, BertBatcher, GptBlocks, tokenize_documents
from ssl_platform.data.pipeline import transform_records
from ssl_platform.data.skips import SkipReporter
from ssl_platform.data.tokenizer import TextTokenizer, as_tokenizer
from ssl_platform.evaluate.report import display_name, markdown_table, write_results
from ssl_platform.probes import knn_accuracy, linear_probe

TOKENIZER_DIR = "tokenizer"
MIN_TOPIC_CHUNKS = 4  # a held-out document becomes a probe class with at least this many chunks
MIN_CHUNK_TOKENS = 8  # shorter document tails are not probed
MAX_TOPIC_CLASSES = 50  # on a large data.path corpus, the longest held-out documents only
# Logits computed at once: (rows x vocabulary) <= 2^26 floats (256 MB), so a GPT-2-sized
# vocabulary (50k) over a batch of 1024-token blocks is projected a few rows at a time.
LOGIT_BUDGET = 2**26
# GPT samples: seeded sampling (greedy decoding of a small model loops on one phrase).
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 40
PROMPTS = (
    ("plain", "The"),
    ("plain", "A list is"),
    ("plain", "An exception is raised when"),
    ("few-shot", ('The "break" statement terminates the nearest enclosing loop.\n'
                  'The "continue" statement continues with the next cycle of the nearest enclosing loop.\n'
                  'The "return" statement')),
)


# ---------------------------------------------------------------------------------------------
# Inputs: the run's tokenizer and the held-out documents


def run_tokenizer(checkpoint_dir: Path, run_dir: Path) -> TextTokenizer:
    """The tokenizer the run trained with: ``checkpoint_dir/tokenizer``, else ``run_dir/tokenizer``."""
    for directory in (Path(checkpoint_dir) / TOKENIZER_DIR, Path(run_dir) / TOKENIZER_DIR):
        if directory.is_dir():
            return as_tokenizer(directory)
    raise FileNotFoundError(f"no tokenizer/ in {checkpoint_dir} or {run_dir}: a text run saves the tokenizer it "
                            f"trained beside its checkpoints; evaluate the run directory or checkpoint it wrote")


def documents(cfg: ExperimentConfig, split: str):
    """One split of the run's corpus as a Dataset of ``{"text", "source"}`` documents."""
    from ssl_platform.data.text import open_text_corpus

    d = cfg.data
    return open_text_corpus(d.path or d.corpus, reporter=SkipReporter(), split=split, val_fraction=d.val_fraction,
                            seed=cfg.train.seed, unit=d.text_unit, text_field=d.text_field, fmt=d.format)


def _map(ds, fn, cfg: ExperimentConfig):
    # The training pipeline's batch size, so BERT's random B segments come from as many documents.
    return ds.map_batches(fn, batch_size=transform_records(cfg), batch_format="numpy")


def collect(ds, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The ``keys`` columns of a (small) Dataset as numpy arrays, rows aligned."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in keys:
            parts[k].append(np.asarray(batch[k]))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# BERT


def score_bert(method: torch.nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``extract``'s encode function: per sequence, correct and total masked tokens, the NSP
    guess and the [CLS] feature (``embed``: the encoder's own output, not the NSP pooler).

    Shape: (B, L) inputs -> mlm_correct, mlm_count, nsp_pred: (B,) each; features: (B, dim).
    """
    hidden = method.encode_text(batch)  # (B, L, D)
    labels = batch["mlm_labels"]  # (B, L), IGNORE_INDEX where not masked
    masked = labels != method.ignore_index
    rows = masked.nonzero()[:, 0]  # (M,) the sequence of each masked position
    states, targets = hidden[masked], labels[masked]  # (M, D), (M,)
    step = max(1, LOGIT_BUDGET // method.config.vocab_size)  # masked positions per vocabulary projection
    hits = torch.cat([(method.mlm_head(states[i:i + step]).argmax(-1) == targets[i:i + step]).long()
                      for i in range(0, len(targets), step)] or [targets.new_zeros(0)])  # (M,)
    correct = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device).index_add_(0, rows, hits)
    return {"mlm_correct": correct, "mlm_count": masked.sum(dim=1),
            "nsp_pred": method.nsp_head(hidden[:, 0]).argmax(-1), "features": hidden[:, 0]}


PAIR = -1  # the ``chunk`` of a masked NSP pair; topic chunks count 0, 1, ... within their document


class CountDocumentTokens:
    """``map_batches`` callable: ``{"text"}`` documents -> one row of per-token counts of their
    tokens (no special tokens: those a masked position never asks for)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [i for doc in self.tokenizer.encode_batch(batch["text"].tolist()) for i in doc]
        return {"counts": np.bincount(np.asarray(ids, np.int64), minlength=self.tokenizer.vocab_size)[None]}  # (1, V)


def most_frequent_token_accuracy(train_counts: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """(MLM accuracy of always answering the training split's most frequent token, that token).

    Shape: train_counts (V,), targets (M,) the original tokens at the held-out masked positions.
    """
    token = int(np.argmax(train_counts))
    targets = np.asarray(targets)
    if targets.size == 0:
        raise ValueError("no masked position to score")
    return float((targets == token).mean()), token


class TagPairs:
    """``map_batches`` callable: BERT pairs get ``source`` "" and ``chunk`` PAIR, the columns of
    :class:`TopicChunks`, so pairs and chunks are one Dataset and one inference pass per model."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["input_ids"])
        return {**batch, "source": np.full(n, "", dtype=object), "chunk": np.full(n, PAIR, dtype=np.int64)}


class TopicChunks:
    """``map_batches`` callable: documents -> unmasked ``[CLS] chunk [SEP]`` sequences labelled by document.

    Each document's sentences are tokenised and concatenated, then cut into chunks of
    ``max_len - 2`` tokens; tails under ``MIN_CHUNK_TOKENS`` are dropped. Output rows have the
    columns of BERT's pairs, nothing masked and no NSP label (input_ids, token_type_ids,
    attention_mask, mlm_labels (N, max_len), nsp_labels (N,), int64), plus ``source`` (the
    document) and ``chunk`` (its index within the document).
    """

    def __init__(self, tokenizer: TextTokenizer | str | Path, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = self.tokenizer = as_tokenizer(self.tokenizer)
        texts = [str(t) for t in batch["text"]]
        sources = [str(s) for s in batch["source"]] if "source" in batch else texts
        width = self.max_len - 2
        ids, lengths, names, index = [], [], [], []
        for source, sentences in zip(sources, tokenize_documents(tok, texts), strict=True):
            stream = np.concatenate(sentences) if sentences else np.zeros(0, np.int64)
            for k, start in enumerate(range(0, len(stream), width)):
                piece = stream[start:start + width]
                if len(piece) < MIN_CHUNK_TOKENS:
                    continue
                row = np.full(self.max_len, tok.pad_id, np.int64)
                row[:len(piece) + 2] = np.concatenate([[tok.cls_id], piece, [tok.sep_id]])
                ids.append(row)
                lengths.append(len(piece) + 2)
                names.append(source)
                index.append(k)
        n = len(ids)
        return {"input_ids": np.stack(ids) if ids else np.zeros((0, self.max_len), np.int64),
                "token_type_ids": np.zeros((n, self.max_len), np.int64),
                "attention_mask": (np.arange(self.max_len) < np.array(lengths, np.int64)[:, None]).astype(np.int64),
                "mlm_labels": np.full((n, self.max_len), IGNORE_INDEX, np.int64),
                "nsp_labels": np.full(n, IGNORE_INDEX, np.int64),
                "source": np.asarray(names, dtype=object), "chunk": np.asarray(index, dtype=np.int64)}


def topic_split(sources: np.ndarray, chunks: np.ndarray, min_chunks: int = MIN_TOPIC_CHUNKS,
                max_classes: int = MAX_TOPIC_CLASSES) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(labels, train_idx, test_idx, class names) of the topic probe; rows with ``chunk`` PAIR are not probed.

    Documents with at least ``min_chunks`` chunks are the classes (the ``max_classes`` with the
    most chunks, ties by name; sorted by name); their even chunks train the probe and their odd
    chunks test it, whatever order the rows come in. Each index array is in (class, chunk) order,
    not the rows': the probes' float sums follow their rows' order, and so would the table.
    """
    sources, chunks = np.asarray(sources).astype(str), np.asarray(chunks)
    names, counts = np.unique(sources[chunks != PAIR], return_counts=True)
    largest = sorted((-c, str(n)) for n, c in zip(names, counts, strict=True) if c >= min_chunks)[:max_classes]
    classes = sorted(n for _, n in largest)
    lookup = {name: i for i, name in enumerate(classes)}
    labels = np.array([lookup.get(s, -1) if c != PAIR else -1 for s, c in zip(sources, chunks, strict=True)],
                      dtype=np.int64)
    kept = labels >= 0
    even = chunks % 2 == 0

    def in_order(idx: np.ndarray) -> np.ndarray:
        return idx[np.lexsort((chunks[idx], labels[idx]))]

    return labels, in_order(np.flatnonzero(kept & even)), in_order(np.flatnonzero(kept & ~even)), classes


def bert_rows(cfg: ExperimentConfig, state: dict[str, Tensor], tokenizer: TextTokenizer,
              derived: dict[str, Any] | None = None) -> tuple[list[dict], str, dict]:
    """Rows (this run, random init, the most frequent token), notes and extra results.json content of a BERT run."""
    from ssl_platform.evaluate.inference import extract_each

    d = cfg.data
    if tokenizer.mask_id is None:
        raise ValueError(f"BERT needs a wordpiece tokenizer ([CLS], [SEP], [MASK]); the run's is {tokenizer.kind}")
    derived = derived or text_derived(cfg, tokenizer)
    held_out = documents(cfg, "val")
    # Training's masking and pairing with a fixed seed: the same positions for every run.
    batcher = BertBatcher(tokenizer, d.max_len, seed=cfg.train.seed, mask_prob=d.mask_prob,
                          mask_token_frac=d.mask_token_frac, random_token_frac=d.random_token_frac,
                          next_prob=d.next_prob)
    pairs = _map(held_out, batcher, cfg).map_batches(TagPairs(), batch_size=None, batch_format="numpy")
    sequences = pairs.union(_map(held_out, TopicChunks(tokenizer, d.max_len), cfg)).materialize()

    rows, notes = [], []
    encoders = {f"{display_name(cfg.method.name)} (this run)": state, "random init": None}
    extracted = extract_each(sequences, cfg, derived, encoders, score_bert, keep=("nsp_labels", "source", "chunk"),
                             seed=cfg.train.seed)
    for name, out in extracted.items():
        is_pair = out["chunk"] == PAIR
        count = int(out["mlm_count"].sum())
        if not is_pair.any() or count == 0:
            raise ValueError(f"the held-out split of {d.path or d.corpus} gives no masked token (BERT pairs: "
                             f"{int(is_pair.sum())}, data.mask_prob={d.mask_prob}); raise data.val_fraction or "
                             f"mask_prob")
        row: dict[str, Any] = {"encoder": name, "mlm_accuracy": float(out["mlm_correct"].sum() / count)}
        labelled = out["nsp_labels"] != IGNORE_INDEX  # topic chunks and lone documents' pairs have none
        if labelled.any():
            row["nsp_accuracy"] = float((out["nsp_pred"][labelled] == out["nsp_labels"][labelled]).mean())
        labels, tr, te, classes = topic_split(out["source"], out["chunk"])
        if len(classes) >= 2:
            x = out["features"]
            row["linear_probe_top1"] = linear_probe(x[tr], labels[tr], x[te], labels[te], seed=cfg.train.seed)
            row["knn_top1"] = knn_accuracy(x[tr], labels[tr], x[te], labels[te], k=cfg.eval.knn_k,
                                           temperature=cfg.eval.knn_temperature)
        rows.append(row)

    # The MLM baseline a model must beat to have learnt more than the commonest token.
    masked = collect(pairs, ("mlm_labels",))["mlm_labels"]
    targets = masked[masked != IGNORE_INDEX]
    train_counts = collect(_map(documents(cfg, "train"), CountDocumentTokens(tokenizer), cfg), ("counts",))["counts"]
    accuracy, token = most_frequent_token_accuracy(train_counts.sum(axis=0), targets)
    rows.append({"encoder": f"most frequent token ({tokenizer.decode([token])!r})", "mlm_accuracy": accuracy})

    notes.append(f"MLM accuracy: top-1 over the {count} masked positions of {int(is_pair.sum())} held-out sequences "
                 f"(training's masking, seed {cfg.train.seed}); chance is about 1/{tokenizer.vocab_size}. "
                 f"NSP: {int(labelled.sum())} pairs, half true continuations, half random segments; chance is 50%.")
    if len(classes) >= 2:
        notes.append(f"Topic probe: [CLS] features of unmasked {d.max_len}-token chunks, the label is the held-out "
                     f"document ({len(classes)} classes, {len(tr)} train / {len(te)} test chunks: even / odd chunks "
                     f"of each document); chance is {100 / len(classes):.0f}%.")
    else:
        notes.append(f"No topic probe: fewer than 2 held-out documents have {MIN_TOPIC_CHUNKS} chunks or more, so "
                     f"there is no label to probe; raise data.val_fraction for one.")
    return rows, "\n\n".join(notes), {"topic_probe_classes": classes}


# ---------------------------------------------------------------------------------------------
# GPT


def score_gpt(method: torch.nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``extract``'s encode function: per block, the summed next-token cross-entropy (nats) and
    the number of predicted tokens, counted as the training loss counts them (a target and
    the token before it both real).

    Shape: (B, L) input_ids, attention_mask -> nll, tokens: (B,) each.
    """
    ids, attention = batch["input_ids"].long(), batch["attention_mask"].long()
    hidden = method.encode_text({"input_ids": ids, "attention_mask": attention})[:, :-1]  # (B, L - 1, D)
    targets = ids[:, 1:].masked_fill(attention[:, 1:] == 0, IGNORE_INDEX)  # (B, L - 1), position t predicts t + 1
    step = max(1, LOGIT_BUDGET // (hidden.shape[1] * method.config.vocab_size))  # rows per vocabulary projection
    nll = torch.cat([
        F.cross_entropy(method.lm_head(hidden[i:i + step]).float().transpose(1, 2), targets[i:i + step],
                        ignore_index=IGNORE_INDEX, reduction="none").sum(dim=1)  # 0 where ignored
        for i in range(0, len(ids), step)])  # (B,)
    return {"nll": nll, "tokens": (targets != IGNORE_INDEX).sum(dim=1)}


def target_tokens(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The tokens a causal LM predicts in blocks: every real token but the first of each block. -> (N,)"""
    return np.asarray(input_ids)[:, 1:][np.asarray(attention_mask)[:, 1:] == 1]


class CountTokens:
    """``map_batches`` callable: GPT blocks -> one row of per-token counts (real tokens only)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        real = np.asarray(batch["input_ids"])[np.asarray(batch["attention_mask"]) == 1]
        return {"counts": np.bincount(real, minlength=self.vocab_size)[None].astype(np.int64)}  # (1, V)


class CountPairs:
    """``map_batches`` callable: GPT blocks -> the (previous, next) token pairs inside the blocks'
    real tokens, as ``prev * V + next`` ids with their counts in this batch (at most V^2 rows)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = np.asarray(batch["input_ids"], np.int64), np.asarray(batch["attention_mask"])
        real = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
        pairs, counts = np.unique(ids[:, :-1][real] * self.vocab_size + ids[:, 1:][real], return_counts=True)
        return {"pair": pairs, "count": counts.astype(np.int64)}


def context_tokens(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The token before each of :func:`target_tokens`' targets, aligned with them. -> (N,)"""
    return np.asarray(input_ids)[:, :-1][np.asarray(attention_mask)[:, 1:] == 1]


def bigram_nll(pairs: np.ndarray, pair_counts: np.ndarray, unigram_counts: np.ndarray, contexts: np.ndarray,
               targets: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` after ``contexts`` under the training
    bigrams (``pairs`` as ``prev * V + next`` ids, each with its count; repeated ids add up),
    Witten-Bell smoothed towards the add-one unigram of ``unigram_counts`` (module docstring).

    Shape: pairs, pair_counts (P,); unigram_counts (V,); contexts, targets (N,) ids in [0, V).
    """
    vocab = len(unigram_counts)
    contexts, targets = np.asarray(contexts, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    if contexts.shape != targets.shape:
        raise ValueError(f"one context per target, got {contexts.shape} and {targets.shape}")
    unigram_nll(unigram_counts, targets)  # the same checks of the targets
    if contexts.size and (contexts.min() < 0 or contexts.max() >= vocab):
        raise ValueError(f"context ids must lie in [0, {vocab}) (the vocabulary)")
    keys, inverse = np.unique(np.asarray(pairs, np.int64), return_inverse=True)
    counts = np.bincount(inverse, weights=np.asarray(pair_counts, np.float64), minlength=len(keys))  # (P,) c(s, t)
    uni = np.asarray(unigram_counts, np.float64)
    p_uni = ((uni + 1.0) / (uni.sum() + vocab))[targets]  # (N,)
    c_s = np.bincount(keys // vocab, weights=counts, minlength=vocab)[contexts]  # (N,) c(s)
    t_s = np.bincount(keys // vocab, minlength=vocab).astype(np.float64)[contexts]  # (N,) T(s)
    wanted = contexts * vocab + targets
    at = np.searchsorted(keys, wanted)
    found = at < len(keys)
    found[found] = keys[at[found]] == wanted[found]
    c_st = np.zeros(len(wanted))
    c_st[found] = counts[at[found]]
    # A context never seen in training (c(s) = 0) falls back to the unigram.
    p = np.where(c_s > 0, (c_st + t_s * p_uni) / np.where(c_s > 0, c_s + t_s, 1.0), p_uni)
    return float(-np.log(p).mean())


def unigram_nll(counts: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under the add-one smoothed unigram model
    of ``counts``: ``p(t) = (counts[t] + 1) / (sum(counts) + V)``.

    Shape: counts (V,) non-negative, targets (N,) ids in [0, V).
    """
    counts, targets = np.asarray(counts, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"counts must be a (V,) vector of non-negative token counts, got shape {counts.shape}")
    if targets.size == 0:
        raise ValueError("no target tokens to score; the held-out split is empty")
    if targets.min() < 0 or targets.max() >= len(counts):
        raise ValueError(f"target ids must lie in [0, {len(counts)}) (the vocabulary), got "
                         f"[{targets.min()}, {targets.max()}]")
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))  # (V,)
    return float(-log_p[targets].mean())


def lm_row(name: str, nll: float) -> dict:
    """A GPT table row from a mean next-token cross-entropy in nats."""
    return {"encoder": name, "perplexity": math.exp(nll), "bits_per_token": nll / math.log(2)}


def samples(cfg: ExperimentConfig, derived: dict, state: dict[str, Tensor], tokenizer: TextTokenizer) -> list[dict]:
    """Continuations of :data:`PROMPTS` by the trained model (seeded sampling), on the driver:
    a handful of short generations, not worth an actor pool."""
    from ssl_platform.evaluate.inference import build_method

    method = build_method(cfg, derived, state, seed=cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    out = []
    for kind, prompt in PROMPTS:
        ids = tokenizer.encode_batch([prompt])[0] or [tokenizer.eot_id]
        full = method.generate(torch.tensor([ids]), cfg.eval.sample_tokens, temperature=SAMPLE_TEMPERATURE,
                               top_k=SAMPLE_TOP_K, eos_id=tokenizer.eot_id, generator=generator)[0]
        new = [i for i in full[len(ids):].tolist() if i != tokenizer.eot_id]
        out.append({"kind": kind, "prompt": prompt, "completion": tokenizer.decode(new)})
    return out


def samples_markdown(generated: list[dict]) -> str:
    lines = [f"## Samples (temperature {SAMPLE_TEMPERATURE}, top-{SAMPLE_TOP_K}, seeded)"]
    for s in generated:
        lines += ["", f"{s['kind']} prompt:", "", "```", s["prompt"] + "⟨" + s["completion"] + "⟩", "```"]
    lines += ["", "The model's continuation is between ⟨ ⟩."]
    return "\n".join(lines)


def gpt_rows(cfg: ExperimentConfig, state: dict[str, Tensor], tokenizer: TextTokenizer,
             derived: dict[str, Any] | None = None) -> tuple[list[dict], str, dict]:
    """Rows (this run, random init, unigram, bigram), notes with the samples and extra results.json content."""
    from ssl_platform.evaluate.inference import extract_each

    d = cfg.data
    derived = derived or text_derived(cfg, tokenizer)
    blocks = _map(documents(cfg, "val"), GptBlocks(tokenizer, d.max_len), cfg).materialize()
    if blocks.count() == 0:
        raise ValueError(f"the held-out split of {d.path or d.corpus} gives no GPT block; raise data.val_fraction")

    rows, targets, contexts = [], None, None
    encoders = {f"{display_name(cfg.method.name)} (this run)": state, "random init": None}
    extracted = extract_each(blocks, cfg, derived, encoders, score_gpt, keep=("input_ids", "attention_mask"),
                             seed=cfg.train.seed)
    for name, scores in extracted.items():
        if targets is None:
            targets = target_tokens(scores["input_ids"], scores["attention_mask"])
            contexts = context_tokens(scores["input_ids"], scores["attention_mask"])
        tokens = int(scores["tokens"].sum())
        if tokens != len(targets):
            raise RuntimeError(f"scored {tokens} held-out tokens but the blocks hold {len(targets)} targets")
        rows.append(lm_row(name, float(scores["nll"].sum() / tokens)))

    train_blocks = _map(documents(cfg, "train"), GptBlocks(tokenizer, d.max_len), cfg)
    counts = collect(train_blocks.map_batches(CountTokens(tokenizer.vocab_size), batch_size=None, batch_format="numpy"),
                     ("counts",))["counts"].sum(axis=0)  # (V,)
    rows.append(lm_row("unigram (train counts, add-one)", unigram_nll(counts, targets)))
    bigrams = collect(train_blocks.map_batches(CountPairs(tokenizer.vocab_size), batch_size=None,
                                               batch_format="numpy"), ("pair", "count"))
    rows.append(lm_row("bigram (train counts, Witten-Bell)",
                       bigram_nll(bigrams["pair"], bigrams["count"], counts, contexts, targets)))

    generated = samples(cfg, derived, state, tokenizer)
    notes = (f"Held-out: {len(targets)} predicted tokens in {blocks.count()} blocks of {d.max_len}. Perplexity = "
             f"exp(mean next-token cross-entropy); a uniform guess over the {tokenizer.vocab_size} tokens scores "
             f"{tokenizer.vocab_size}. The unigram model counts {int(counts.sum())} training tokens.\n\n"
             + samples_markdown(generated))
    return rows, notes, {"samples": generated}


# ---------------------------------------------------------------------------------------------
# The table

def text_derived(cfg: ExperimentConfig, tokenizer: TextTokenizer) -> dict[str, Any]:
    """A text method's data-derived arguments recomputed from the run's tokenizer and config: for
    checkpoints written before they were saved in the checkpoint."""
    return {"vocab_size": tokenizer.vocab_size, "max_len": cfg.data.max_len}


# By the batches a text method eats (its spec's token_batches): masked pairs or causal-LM blocks.
PROTOCOLS = {"masked_pairs": bert_rows, "blocks": gpt_rows}


def evaluate(cfg: ExperimentConfig, checkpoint_dir: Path | None, run_dir: Path) -> list[dict]:
    """Evaluate a BERT or GPT checkpoint on the held-out documents and write the report.

    Writes results.json (rows, plus GPT's samples or BERT's probe classes), results.md (table
    and notes) and report.png into ``run_dir``, prints the table and returns its rows. Ray
    must be initialised (batches are scored by an actor pool).
    """
    from ssl_platform.methods import method_spec
    from ssl_platform.train.checkpoint import load_payload, saved_derived

    spec = method_spec(cfg.method.name)
    if spec.token_batches not in PROTOCOLS:
        raise ValueError(f"the text protocol evaluates methods trained on {' or '.join(PROTOCOLS)}, got method.name="
                         f"{cfg.method.name}; use ssl_platform.evaluate.evaluate_run, which picks the protocol")
    if checkpoint_dir is None:
        raise ValueError("no checkpoint to evaluate: pass the run's checkpoint directory (checkpoint_*/)")
    payload = load_payload(checkpoint_dir)
    tokenizer = run_tokenizer(Path(checkpoint_dir), Path(run_dir))
    rows, notes, extra = PROTOCOLS[spec.token_batches](cfg, payload["model"], tokenizer, saved_derived(payload))

    title = f"{cfg.name}: {spec.display_name} on the held-out documents of {cfg.data.path or cfg.data.corpus}"
    paths = write_results(run_dir, rows, metrics_path=Path(run_dir) / "metrics.jsonl", title=title, notes=notes)
    results = json.loads(paths["json"].read_text())  # the samples belong in the machine-readable results too
    paths["json"].write_text(json.dumps({**results, **extra}, indent=2) + "\n")
    print(markdown_table(rows), flush=True)
    print(notes, flush=True)
    return rows
