"""The CLIP table: zero-shot classification, retrieval, a linear probe.

The protocols of Radford et al. 2021 on the held-out pairs (of the built-in caption corpus, or
of the user's labelled pairs, ``eval.data``: see :mod:`~ssl_platform.data.labelled`), for this run's towers and for the
same towers at random init (the floor: a trained CLIP must clear it by far):

- zero-shot top-1: each class is the mean of the normalised text embeddings of its prompts
  (:func:`~ssl_platform.data.digit_captions.zero_shot_prompts`, phrasings no training caption
  uses; CLIP's prompt ensembling), re-normalised; an image takes the most cosine-similar class;
- image->text and text->image recall@1 and @5: an image's positive is its own caption. Captions
  are drawn from a few templates per digit, so one caption string is the own caption of several
  held-out images; identical strings are one candidate (image->text ranks the distinct
  captions) and a caption query is answered by any image whose own caption it is
  (text->image), so a duplicate is never counted as a miss;
- linear probe top-1 of the image tower's embeddings (train split -> held-out split).

Images are normalised as at training time (:class:`~ssl_platform.data.captions.CaptionTransform`)
without the random crop; captions and prompts are tokenised with the run's ``context_length``.
Embeddings come from Ray Data batch inference (:func:`~ssl_platform.evaluate.inference.extract`):
one pass per encoder over a Dataset holding the train images, the held-out pairs and the prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA, CaptionSplit, zero_shot_prompts
from ssl_platform.data.images import split_dataset
from ssl_platform.data.labelled import caption_splits, eval_source
from ssl_platform.data.transforms import to_float
from ssl_platform.evaluate.image import check_builtin
from ssl_platform.evaluate.inference import check_state, extract_each
from ssl_platform.evaluate.report import display_name, markdown_table, write_results
from ssl_platform.methods import architecture, expected_derived
from ssl_platform.probes import linear_probe
from ssl_platform.train.checkpoint import load_payload, saved_derived

# Values of the "part" column: which rows are train images, held-out pairs, class prompts.
TRAIN, VAL, PROMPT = 0, 1, 2


def _float(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def embed_pairs(method: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``extract``'s encode function: both towers' L2-normalised embeddings of each row.
    image uint8 (B, C, S, S) -> (B, E); text int64 (B, context_length) -> (B, E)."""
    return {"image": method.encode_image(to_float(batch["image"])), "text": method.encode_text(batch["text"])}


def zero_shot_accuracy(image_emb: np.ndarray, labels: np.ndarray, prompt_emb: np.ndarray,
                       prompt_class: np.ndarray, num_classes: int) -> float:
    """Top-1 (0..1) of the nearest class embedding, a class being its prompts' mean, re-normalised.

    Shape: image_emb (N, E), labels (N,), prompt_emb (P, E), prompt_class (P,) in [0, num_classes).
    """
    prompts = F.normalize(_float(prompt_emb), dim=1)  # (P, E)
    classes = torch.zeros(num_classes, prompts.shape[1]).index_add_(0, torch.from_numpy(prompt_class).long(), prompts)
    classes = F.normalize(classes, dim=1)  # (C, E); the mean's direction, as CLIP's ensembling
    predicted = (F.normalize(_float(image_emb), dim=1) @ classes.T).argmax(dim=1).numpy()  # (N,)
    return float((predicted == labels).mean())


def retrieval_recalls(image_emb: np.ndarray, text_emb: np.ndarray, captions: np.ndarray,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k (0..1) of held-out pairs, row i of each being a pair.

    Identical caption strings are one caption (see the module docstring): image->text ranks the
    distinct captions for each image, with its own caption the positive; text->image ranks all
    images for each distinct caption, any image whose own caption it is being a positive. A
    query's rank counts the candidates scoring strictly higher than its best positive.

    Shape: image_emb (N, E), text_emb (N, E), captions (N,) str. Keys: ``i2t_r{k}``, ``t2i_r{k}``.
    """
    _, first, own = np.unique(captions.astype(str), return_index=True, return_inverse=True)
    own = own.reshape(-1)  # (N,) index of each image's caption among the distinct ones
    images = F.normalize(_float(image_emb), dim=1)  # (N, E)
    texts = F.normalize(_float(text_emb[first]), dim=1)  # (U, E), one row per distinct caption
    sim = (images @ texts.T).numpy()  # (N, U)

    positive = own[:, None] == np.arange(len(first))[None, :]  # (N, U), one True per row
    i2t_rank = (sim > sim[np.arange(len(own)), own][:, None]).sum(axis=1)  # (N,)
    best_image = np.where(positive, sim, -np.inf).max(axis=0)  # (U,) score of the best positive image
    t2i_rank = ((sim > best_image[None, :]) & ~positive).sum(axis=0)  # (U,)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
    return out


def evaluation_rows(train: CaptionSplit, val: CaptionSplit, context_length: int) -> dict[str, np.ndarray]:
    """Columns of the evaluation Dataset: train images, held-out pairs, then one row per prompt.

    Prompt rows carry a blank image (its embedding is ignored): one pass per encoder over one
    Dataset, instead of a second actor pool for a few dozen prompts.
    """
    from ssl_models.methods.clip import tokenize

    prompts = zero_shot_prompts(train.class_names)  # C lists of P prompts
    prompt_text = [p for per_class in prompts for p in per_class]
    prompt_class = np.repeat(np.arange(len(prompts)), [len(p) for p in prompts])
    blank = np.zeros((len(prompt_text), *train.images.shape[1:]), np.uint8)
    captions = [str(c) for c in train.captions] + [str(c) for c in val.captions] + prompt_text
    return {
        "image": np.concatenate([train.images, val.images, blank]),  # (R, C, S, S) uint8
        "text": tokenize(captions, context_length).numpy(),  # (R, L) int64
        "label": np.concatenate([train.labels, val.labels, prompt_class]),
        "part": np.repeat([TRAIN, VAL, PROMPT], [len(train), len(val), len(prompt_text)]),
        "row": np.arange(len(captions)),
    }


def score(cfg: ExperimentConfig, name: str, out: dict[str, np.ndarray], captions: np.ndarray,
          num_classes: int) -> dict:
    """One table row from ``extract``'s output (rows in any order; ``row`` indexes ``captions``)."""
    order = np.argsort(out["row"], kind="stable")
    out = {k: v[order] for k, v in out.items()}  # back in Dataset order, so VAL rows pair with captions
    train, val, prompt = (out["part"] == p for p in (TRAIN, VAL, PROMPT))
    return {
        "encoder": name,
        "zero_shot_top1": zero_shot_accuracy(out["image"][val], out["label"][val], out["text"][prompt],
                                             out["label"][prompt], num_classes),
        **retrieval_recalls(out["image"][val], out["text"][val], captions[out["row"][val]]),
        "linear_probe_top1": linear_probe(out["image"][train], out["label"][train], out["image"][val],
                                          out["label"][val], seed=cfg.train.seed),
    }


def evaluate(cfg: ExperimentConfig, checkpoint_dir: str | Path, run_dir: str | Path) -> list[dict]:
    """Evaluate the checkpoint's towers and random-init towers, write the report, return the rows.

    Ray must be running (the CLI starts it). Writes results.json, results.md and report.png
    into ``run_dir`` and prints the markdown table.
    """
    check_builtin(cfg, BUILTIN_CAPTION_CORPORA)
    splits, skipped = caption_splits(cfg)
    train, val = splits["train"], splits["val"]
    payload = load_payload(checkpoint_dir)
    state = payload["model"]
    # Older checkpoints saved no derived arguments: recompute them from the config and the corpus.
    derived: dict[str, Any] = (saved_derived(payload)
                               or {**expected_derived(cfg), "in_channels": int(train.images.shape[1])})
    check_state(cfg, derived, state)

    columns = evaluation_rows(train, val, architecture(cfg)["context_length"])
    captions = np.concatenate([train.captions, val.captions, np.full((columns["part"] == PROMPT).sum(), "")])
    ds = split_dataset(columns.pop("image"), eval_source(cfg), **columns)
    encoders = {"random init": None, f"{display_name(cfg.method.name)} (this run)": state}
    extracted = extract_each(ds, cfg, derived, encoders, embed_pairs, keep=("label", "part", "row"),
                             seed=cfg.train.seed)
    rows = [score(cfg, name, out, captions, len(train.class_names)) for name, out in extracted.items()]

    title = (f"{cfg.name}: {display_name(cfg.method.name)} towers on {eval_source(cfg)} ({len(train)} train / "
             f"{len(val)} held-out pairs, {len(train.class_names)} classes)")
    notes = ("Retrieval: identical caption strings count as one caption (each is the own caption of several "
             "held-out images); zero-shot prompts are phrasings no training caption uses.")
    notes += f" {skipped}" if skipped else ""
    write_results(run_dir, rows, metrics_path=Path(run_dir) / "metrics.jsonl", title=title, notes=notes)
    print(markdown_table(rows), flush=True)
    return rows
