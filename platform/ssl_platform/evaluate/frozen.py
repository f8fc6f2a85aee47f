"""The seed papers' frozen-encoder table for an image run.

Linear probe and weighted kNN top-1 on the held-out split, for the pretrained encoder and for
baselines of the same architecture: raw pixels, random init, and a supervised encoder trained
with the labels. The pretrained row is only worth something if it beats random init clearly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssl_platform import methods
from ssl_platform.config import ExperimentConfig
from ssl_platform.data.builtin import load_image_corpus
from ssl_platform.data.transforms import to_float
from ssl_platform.evaluate.features import extract_features, train_supervised
from ssl_platform.evaluate.probe import knn_accuracy, linear_probe
from ssl_platform.evaluate.report import markdown_table, write_results

# How the papers spell the methods, for the rows of the results table.
DISPLAY_NAMES = {"simclr": "SimCLR", "byol": "BYOL", "barlow_twins": "Barlow Twins", "vicreg": "VICReg",
                 "clip": "CLIP", "cpc": "CPC", "bert": "BERT", "gpt": "GPT"}


def evaluate_image_encoder(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], run_dir: str | Path,
                           label: str | None = None) -> list[dict]:
    """Evaluate the encoder in ``method_state`` (a method's state_dict) and write the report.

    Returns the table rows; also writes results.json, results.md and report.png in ``run_dir``.
    """
    splits = load_image_corpus(cfg.data.corpus, cfg.data.image_size, cfg.data.val_fraction, cfg.train.seed)
    train, val = splits["train"], splits["val"]
    x_train, x_val = to_float(train.images), to_float(val.images)  # (N, C, H, W), no augmentation
    in_channels = x_train.shape[1]
    e = cfg.eval

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return methods.build(cfg, in_channels=in_channels)

    def score(name: str, f_train: np.ndarray, f_val: np.ndarray) -> dict:
        return {
            "encoder": name,
            "linear_probe_top1": linear_probe(f_train, train.labels, f_val, val.labels, seed=cfg.train.seed),
            "knn_top1": knn_accuracy(f_train, train.labels, f_val, val.labels, k=e.knn_k, temperature=e.knn_temperature),
        }

    rows = [score("raw pixels", x_train.flatten(1).numpy(), x_val.flatten(1).numpy())]

    random_init = build(cfg.train.seed).encoder
    rows.append(score("random init", extract_features(random_init, x_train), extract_features(random_init, x_val)))

    pretrained = build(cfg.train.seed)
    pretrained.load_state_dict(method_state)
    name = label or f"{DISPLAY_NAMES.get(cfg.method.name, cfg.method.name)} (this run)"
    rows.append(score(name, extract_features(pretrained.encoder, x_train), extract_features(pretrained.encoder, x_val)))

    if e.supervised_epochs > 0:
        model = build(cfg.train.seed)
        supervised = train_supervised(model.encoder, model.feature_dim, x_train, train.labels,
                                      num_classes=len(train.class_names), epochs=e.supervised_epochs, seed=cfg.train.seed)
        rows.append(score("supervised (labels)", extract_features(supervised, x_train), extract_features(supervised, x_val)))

    title = f"{cfg.name}: frozen {cfg.method.name} encoder on {cfg.data.corpus} ({len(train)} train / {len(val)} held-out)"
    write_results(run_dir, rows, metrics_path=Path(run_dir) / "metrics.jsonl", title=title)
    print(markdown_table(rows), flush=True)
    return rows
