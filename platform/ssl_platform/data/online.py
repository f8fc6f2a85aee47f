"""The small, fixed held-out split of the online evaluation (driver side).

Built once per ``fit`` on the driver, put in the object store and evaluated every
``eval.online_every`` steps by :mod:`ssl_platform.train.online`. It is a plain dict of numpy
arrays, made the way training batches are made but without augmentation, from fixed examples
(``train.seed``), so the metric moves only because the model does:

| kind | from | keys |
|---|---|---|
| image | val queries, a labelled train-side bank | image, label, bank_image, bank_label |
| image-caption | val pairs + zero-shot prompts | image, label, text, prompts |
| text, masked pairs | held-out documents, masked once (fixed seed) | input_ids, token_type_ids, attention_mask, |
| | | mlm_labels, nsp_labels |
| text, blocks | held-out documents, packed into blocks | input_ids, attention_mask |
| audio | val crops, a labelled train-side bank | audio, lengths, label, |
| | | bank_audio, bank_lengths, bank_label |

Images stay uint8 (4x smaller in the object store) and are normalised on the worker with
``transforms.to_float``, as every eval input is. ``eval.online_examples`` bounds the size: for
the kNN kinds half of it are queries (at most the whole val split) and the rest the bank; for
the others it is the number of held-out rows. Text uses the run's own tokenizer
(``PretrainData.artifacts["tokenizer"]``) and the held-out split of the built-in corpus or of
``data.path``; the other kinds take the labelled splits of :mod:`~ssl_platform.data.labelled`
(the built-in corpus's, or ``eval.data``; the config refuses a ``data.path`` run without it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ssl_platform.config import ConfigError, ExperimentConfig

# Documents per tokenizer call when building the text split.
_DOCS_PER_BATCH = 64


def online_split(cfg: ExperimentConfig, model: dict[str, Any], artifacts: dict[str, Path]) -> dict[str, np.ndarray]:
    """The held-out split of ``cfg``'s method for the online evaluation.

    Args:
        model: the method's architecture with its defaults (``methods.architecture(cfg)``);
            CLIP's captions are tokenised to its ``context_length``.
        artifacts: the run's data artifacts (``PretrainData.artifacts``); text needs "tokenizer".
    """
    from ssl_platform.methods import method_spec  # ssl_models and torch: on the driver only

    kind = method_spec(cfg.method.name).data_kind
    if kind != "text" and cfg.data.path and not cfg.eval.data:
        raise ConfigError(f"eval.online_every: the online evaluation of a {kind} method needs labelled data, and "
                          f"data.path={cfg.data.path} has none; set eval.data=PATH to a labelled corpus, or "
                          f"eval.online_every=0")
    return SPLITS[kind](cfg, model, artifacts)


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(n, len(labels))`` examples, classes as equally represented as
    they can be, which ones fixed by ``seed``. (N,) labels -> (n,) int64."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    rank = np.empty(len(labels), np.int64)  # position of each example among its class's shuffled ones
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    chosen = order[np.argsort(rank[order], kind="stable")][:n]  # one of each class, then a second, ...
    return np.sort(chosen)


def _query_and_bank_sizes(examples: int, val: int, train: int) -> tuple[int, int]:
    queries = min(val, examples // 2)
    return queries, min(train, examples - queries)


# ----------------------------------------------------------------------------- image (kNN)

def image_split(cfg: ExperimentConfig, model: dict, artifacts: dict) -> dict[str, np.ndarray]:
    from ssl_platform.data.labelled import image_splits

    seed = cfg.train.seed
    splits, _ = image_splits(cfg)
    val, train = splits["val"], splits["train"]
    n_query, n_bank = _query_and_bank_sizes(cfg.eval.online_examples, len(val), len(train))
    q, b = balanced_subset(val.labels, n_query, seed), balanced_subset(train.labels, n_bank, seed + 1)
    return {"image": val.images[q], "label": val.labels[q],  # (M, C, H, W) uint8, (M,)
            "bank_image": train.images[b], "bank_label": train.labels[b]}  # (N, C, H, W) uint8, (N,)


# ----------------------------------------------------------------------------- image-caption (zero-shot)

def caption_split(cfg: ExperimentConfig, model: dict, artifacts: dict) -> dict[str, np.ndarray]:
    from ssl_models.methods.clip import tokenize
    from ssl_platform.data.digit_captions import zero_shot_prompts
    from ssl_platform.data.labelled import caption_splits

    seed = cfg.train.seed
    val = caption_splits(cfg)[0]["val"]
    idx = balanced_subset(val.labels, cfg.eval.online_examples, seed)
    length = int(model["context_length"])
    prompts = zero_shot_prompts(val.class_names)  # K lists of T prompts
    tokens = tokenize([p for per_class in prompts for p in per_class], length).numpy()  # (K * T, L)
    return {"image": val.images[idx], "label": val.labels[idx],  # (M, C, H, W) uint8, (M,)
            "text": tokenize([str(c) for c in val.captions[idx]], length).numpy(),  # (M, L) int64
            "prompts": tokens.reshape(len(prompts), len(prompts[0]), length)}  # (K, T, L) int64


# ----------------------------------------------------------------------------- audio (CPC)

def audio_split(cfg: ExperimentConfig, model: dict, artifacts: dict) -> dict[str, np.ndarray]:
    from ssl_platform.data.audio import AudioCrops
    from ssl_platform.data.labelled import audio_splits

    d, seed = cfg.data, cfg.train.seed
    splits, _ = audio_splits(cfg)
    val, train = splits["val"], splits["train"]
    n_query, n_bank = _query_and_bank_sizes(cfg.eval.online_examples, len(val), len(train))
    # The training crops with a fixed seed: one fixed window of every clip.
    crops = AudioCrops(d.crop_seconds, d.sample_rate, seed=seed, normalize=d.normalize_audio)
    out = {}
    for prefix, split, idx in (("", val, balanced_subset(val.labels, n_query, seed)),
                               ("bank_", train, balanced_subset(train.labels, n_bank, seed + 1))):
        batch = crops({"audio": [split.audio[i] for i in idx], "label": split.labels[idx],
                       "path": np.array([split.paths[i] for i in idx])})
        out.update({f"{prefix}{k}": batch[k] for k in ("audio", "lengths", "label")})  # (M, T), (M,), (M,)
    return out


# ----------------------------------------------------------------------------- text (BERT, GPT)

def held_out_documents(cfg: ExperimentConfig) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``{"text", "source"}`` held-out documents: the built-in corpus's val split, or
    the documents of ``data.path`` that its hash puts in the val split (read with Ray Data)."""
    from ssl_platform.data.skips import SkipReporter
    from ssl_platform.data.text import open_text_corpus
    from ssl_platform.data.text_corpora import TEXT_CORPORA, load_text_corpus

    d = cfg.data
    if not d.path and d.corpus in TEXT_CORPORA:
        docs = load_text_corpus(d.corpus, d.val_fraction, cfg.train.seed)["val"]
        for i in range(0, len(docs), _DOCS_PER_BATCH):
            chunk = docs[i: i + _DOCS_PER_BATCH]
            yield {"text": np.array([doc.text for doc in chunk], dtype=object),
                   "source": np.array([doc.name for doc in chunk], dtype=object)}
        return
    ds = open_text_corpus(d.path or d.corpus, reporter=SkipReporter(), split="val", val_fraction=d.val_fraction,
                          seed=cfg.train.seed, unit=d.text_unit, text_field=d.text_field, fmt=d.format)
    ds.context.execution_options.preserve_order = True  # the same first documents on every run (a resume)
    yield from ds.iter_batches(batch_size=_DOCS_PER_BATCH, batch_format="numpy")


def text_split(cfg: ExperimentConfig, model: dict, artifacts: dict) -> dict[str, np.ndarray]:
    from ssl_platform.data.masking import BertBatcher, GptBlocks
    from ssl_platform.data.tokenizer import TextTokenizer
    from ssl_platform.methods import method_spec

    if "tokenizer" not in artifacts:
        raise ValueError("the online evaluation of a text method needs the run's tokenizer (artifacts['tokenizer'])")
    d, n = cfg.data, cfg.eval.online_examples
    tokenizer = TextTokenizer.load(artifacts["tokenizer"])
    if method_spec(cfg.method.name).token_batches == "masked_pairs":
        # The training masking, drawn once with a fixed seed: the same masked positions every time.
        batcher = BertBatcher(tokenizer, d.max_len, seed=cfg.train.seed, mask_prob=d.mask_prob,
                              mask_token_frac=d.mask_token_frac, random_token_frac=d.random_token_frac,
                              next_prob=d.next_prob)
    else:
        batcher = GptBlocks(tokenizer, d.max_len)
    parts, rows = [], 0
    for documents in held_out_documents(cfg):
        part = batcher(documents)
        parts.append(part)
        rows += len(part["input_ids"])
        if rows >= n:
            break
    if rows == 0:
        source = f"data.path={d.path}" if d.path else f"data.corpus={d.corpus}"
        raise ValueError(f"the held-out split of {source} gives no {cfg.method.name} example for the online "
                         f"evaluation; raise data.val_fraction or set eval.online_every=0")
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}  # (M, L) each, (M,) nsp_labels


SPLITS = {"image": image_split, "image-caption": caption_split, "audio": audio_split, "text": text_split}
