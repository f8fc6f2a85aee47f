"""The seed papers' frozen-encoder table for an image run (every method whose spec says it embeds images).

Linear probe and weighted kNN top-1 on the held-out split (of the built-in corpus, or of the
user's labelled ``eval.data``, see :mod:`~ssl_platform.data.labelled`), for this run's encoder and for
baselines: raw pixels, the same architecture at random init, and the same architecture trained
with the labels (the upper reference). The run's row is only worth something if it beats random
init clearly, which is already a strong baseline on small images.

Features of every encoder come from Ray Data batch inference (:func:`~ssl_platform.evaluate.
inference.extract`) over one Dataset holding both splits, so a cluster evaluates with as many
model replicas as ``eval.actors`` asks. The supervised baseline is trained on the driver with
plain torch (:func:`~ssl_platform.evaluate.features.train_supervised`): a few epochs on a small
corpus, not worth a Ray Train job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.builtin import IMAGE_CORPORA
from ssl_platform.data.images import split_dataset
from ssl_platform.data.labelled import eval_source, image_splits
from ssl_platform.data.transforms import to_float
from ssl_platform.evaluate.features import train_supervised
from ssl_platform.evaluate.inference import build_method, check_state, extract_each
from ssl_platform.evaluate.report import display_name, markdown_table, stage_table, write_results
from ssl_platform.methods import expected_derived
from ssl_platform.probes import knn_accuracy, linear_probe
from ssl_platform.train.checkpoint import load_payload, saved_derived

TRAIN, VAL = 0, 1  # values of the "split" column of the evaluation Dataset


def embed_images(method: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``extract``'s encode function: uint8 images normalised as at training time, without
    augmentation, through the method's encoder (not its projector). (B, C, H, W) -> (B, D)."""
    return method.embed({"image": to_float(batch["image"])})


def embed_stages(method: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``extract``'s encode function for ``eval.probe_stages=all``: the encoder's globally pooled
    features after its stem and each stage ({"stem": (B, C0), "stage1": ..., ...}); the deepest
    is :func:`embed_images`'s output."""
    return method.encoder.stage_features(to_float(batch["image"]))


def depth_order(names) -> list[str]:
    """Stage names from the input side: "stem", then "stage1"/"layer1", "stage2", ..."""
    return sorted(names, key=lambda n: (n != "stem", int(re.sub(r"\D", "", n) or 0), n))


def image_derived(cfg: ExperimentConfig, images: np.ndarray) -> dict[str, Any]:
    """The method's data-derived constructor arguments, with the corpus's real channel count."""
    return {**expected_derived(cfg), "in_channels": int(images.shape[1])}


def check_builtin(cfg: ExperimentConfig, corpora) -> None:
    """Evaluation needs labelled held-out data: ``eval.data``, or a built-in corpus that has it."""
    if cfg.eval.data:
        return
    if cfg.data.path:
        raise ValueError(f"evaluation of {cfg.method.name} needs labelled data, which data.path={cfg.data.path!r} "
                         f"has not; set eval.data=PATH to a labelled corpus, or eval.enabled=false")
    if cfg.data.corpus not in corpora:
        raise ValueError(f"data.corpus={cfg.data.corpus!r} is not a corpus {cfg.method.name} is evaluated on; "
                         f"use one of {', '.join(corpora)}")


def evaluate(cfg: ExperimentConfig, checkpoint_dir: str | Path, run_dir: str | Path) -> list[dict]:
    """Evaluate the checkpoint's encoder against its baselines, write the report, return the rows.

    Ray must be running (the CLI starts it). Writes results.json, results.md and report.png
    into ``run_dir`` and prints the markdown table.
    """
    check_builtin(cfg, IMAGE_CORPORA)
    splits, skipped = image_splits(cfg)
    train, val = splits["train"], splits["val"]
    payload = load_payload(checkpoint_dir)
    state = payload["model"]
    derived = saved_derived(payload) or image_derived(cfg, train.images)  # older checkpoints: from the corpus
    check_state(cfg, derived, state)  # a mismatched checkpoint fails now, not after the first baseline
    name = f"{display_name(cfg.method.name)} (this run)"
    stages: list[dict] = []  # eval.probe_stages=all: a linear probe per encoder stage, a row per encoder
    rows = encoder_rows(cfg, train, val, derived, {"random init": None, name: state}, stages)

    if cfg.eval.supervised_epochs > 0:
        model = build_method(cfg, derived, None, cfg.train.seed)
        train_supervised(model.encoder, model.feature_dim, to_float(train.images), train.labels,
                         num_classes=len(train.class_names), epochs=cfg.eval.supervised_epochs, seed=cfg.train.seed)
        rows += encoder_rows(cfg, train, val, derived, {"supervised (labels)": model.state_dict()}, stages)

    raw = score(cfg, "raw pixels", to_float(train.images).flatten(1).numpy(), train.labels,
                to_float(val.images).flatten(1).numpy(), val.labels)
    rows.insert(0, raw)
    title = (f"{cfg.name}: frozen {cfg.method.name} encoder on {eval_source(cfg)} "
             f"({len(train)} train / {len(val)} held-out, {len(train.class_names)} classes)")
    write_results(run_dir, rows, metrics_path=Path(run_dir) / "metrics.jsonl", title=title, notes=skipped,
                  stages=stages)
    print(markdown_table(rows), flush=True)
    if stages:
        print(stage_table(stages), flush=True)
    return rows


def score(cfg: ExperimentConfig, name: str, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
          val_y: np.ndarray) -> dict:
    """One table row: linear probe and weighted kNN top-1 (0..1) on the held-out split."""
    e = cfg.eval
    return {
        "encoder": name,
        "linear_probe_top1": linear_probe(train_x, train_y, val_x, val_y, seed=cfg.train.seed),
        "knn_top1": knn_accuracy(train_x, train_y, val_x, val_y, k=e.knn_k, temperature=e.knn_temperature),
    }


def encoder_rows(cfg: ExperimentConfig, train, val, derived: dict[str, Any],
                 states: dict[str, dict[str, Tensor] | None], stages: list[dict] | None = None) -> list[dict]:
    """Rows for encoders given as ``{row name: method state_dict, or None for random init}``.

    Both splits and every encoder go through one ``extract_each`` (one pass over the images, one
    actor pool start); the ``split`` column sorts the features back out. With ``eval.probe_stages=all`` the same pass
    returns every stage's pooled features, and ``stages`` gets a row per encoder: the linear
    probe's top-1 on each stage (``{"encoder": name, "stem": 0.41, "stage1": 0.63, ...}``).
    """
    per_stage = cfg.eval.probe_stages == "all" and stages is not None
    images = np.concatenate([train.images, val.images])  # (N_train + N_val, C, H, W) uint8
    labels = np.concatenate([train.labels, val.labels])
    split = np.repeat([TRAIN, VAL], [len(train), len(val)])
    ds = split_dataset(images, eval_source(cfg), label=labels, split=split)
    rows = []
    extracted = extract_each(ds, cfg, derived, states, embed_stages if per_stage else embed_images,
                             keep=("label", "split"), seed=cfg.train.seed)
    for name, out in extracted.items():
        is_train, labels = out.pop("split") == TRAIN, out.pop("label")
        if per_stage:
            names = depth_order(out)
            stages.append({"encoder": name, **{
                stage: linear_probe(out[stage][is_train], labels[is_train], out[stage][~is_train], labels[~is_train],
                                    seed=cfg.train.seed) for stage in names}})
            out = {"features": out[names[-1]]}  # the deepest stage is the encoder's output
        features = out["features"].reshape(len(out["features"]), -1)  # (N, D)
        rows.append(score(cfg, name, features[is_train], labels[is_train], features[~is_train], labels[~is_train]))
    return rows

