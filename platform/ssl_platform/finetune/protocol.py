"""The protocol of `sslp finetune`: labelled splits, two fine-tunes through ``train.trainer.fit``
(from the checkpoint and from random init), the frozen linear probe, and the report."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from sklearn.model_selection import train_test_split

from ssl_platform import methods
from ssl_platform.config import with_overrides
from ssl_platform.data.builtin import IMAGE_CORPORA, ImageSplit, load_image_corpus
from ssl_platform.data.context import configure_data_context
from ssl_platform.data.images import read_image_corpus
from ssl_platform.data.ordered import ordered_corpus
from ssl_platform.data.pipeline import PretrainData, order_seed
from ssl_platform.data.skips import SkipReporter, format_summary, get_or_create_ledger, ledger_name, skip_summary
from ssl_platform.data.transforms import OneViewAugment
from ssl_platform.evaluate.image import encoder_rows, image_derived
from ssl_platform.evaluate.inference import check_state
from ssl_platform.evaluate.report import markdown_table, write_results
from ssl_platform.finetune import MIN_STEPS, Settings, check_supported
from ssl_platform.finetune.classifier import ClassifierBuild, fit_head
from ssl_platform.train.checkpoint import load_payload, saved_derived
from ssl_platform.train.storage import run_paths
from ssl_platform.train.trainer import fit
from ssl_platform.views import AugmentConfig


@dataclass(frozen=True)
class LabelledSplits:
    train: Any  # data.builtin.ImageSplit
    val: Any
    description: str
    skipped: dict


def labelled_splits(cfg, source: str, channels: int, settings: Settings) -> LabelledSplits:
    """The labelled source as stratified train/val ImageSplits at the run's image size and
    channels, the train split cut to ``--train-examples`` / ``--labelled-fraction``."""
    val_fraction = settings.val_fraction or cfg.data.val_fraction
    seed = cfg.train.seed
    if source in IMAGE_CORPORA:

        splits = load_image_corpus(source, cfg.data.image_size, val_fraction, seed)
        train, val, skipped = splits["train"], splits["val"], {}
        train, val = (ImageSplit(_channels(s.images, channels), s.labels, s.class_names) for s in (train, val))
    else:
        images, labels, names, skipped = read_labelled(cfg, source, channels)
        idx = np.arange(len(labels))
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels)
        train = ImageSplit(images[train_idx], labels[train_idx], names)
        val = ImageSplit(images[val_idx], labels[val_idx], names)
    n = settings.train_examples or (round(settings.labelled_fraction * len(train)) if settings.labelled_fraction
                                    else len(train))
    classes = len(np.unique(train.labels))
    if n < classes:
        raise ValueError(f"{n} labelled train examples cannot cover the {classes} classes; use at least {classes}")
    if n < len(train):
        keep, _ = train_test_split(np.arange(len(train)), train_size=n, random_state=seed, stratify=train.labels)
        train = ImageSplit(train.images[keep], train.labels[keep], train.class_names)
    what = f"{source}: {len(train)} labelled train / {len(val)} held-out, {classes} classes"
    return LabelledSplits(train, val, what, skipped)


def _channels(images, channels: int):
    """Grayscale corpora feed an RGB encoder by repeating the channel."""
    return np.repeat(images, 3, axis=1) if images.shape[1] == 1 and channels == 3 else images


def read_labelled(cfg, source: str, channels: int):
    """(images (N, C, S, S) uint8, labels (N,), class names, skipped) from a folder or parquet
    source, bad records skipped and counted; a source without labels is refused."""
    name = ledger_name(f"finetune-{cfg.name}")
    ledger = get_or_create_ledger(name)
    try:
        corpus = read_image_corpus(source, size=cfg.data.image_size, channels=channels,
                                   reporter=SkipReporter(name, cfg.data.strict), label_column=cfg.data.label_column)
        if corpus.fmt == "folder" and not corpus.class_names:
            raise ValueError(f"{source} has no class sub-folders, so no labels; put each class's images in a "
                             f"sub-folder named after it")
        images, labels, paths = [], [], []
        for batch in corpus.dataset.iter_batches(batch_size=1024, batch_format="numpy"):
            images.append(batch["image"])
            labels.append(batch["label"])
            paths.append(batch["path"])
        skipped = skip_summary(ledger)
    finally:
        ray.kill(ledger)
    if not images:
        raise ValueError(f"{source}: no usable labelled image; check the path, or run `sslp data inspect {source}`")
    # Ordered by path: Ray reads files in parallel, and the seeded split must not depend on the order.
    order = np.argsort(np.concatenate(paths).astype(str), kind="stable")
    images, labels = np.concatenate(images)[order], np.concatenate(labels)[order]
    labelled = labels >= 0
    if not labelled.any():
        raise ValueError(f"{source} has no labels (no class sub-folders, or no integer column "
                         f"{cfg.data.label_column!r}); fine-tuning needs labelled data")
    if len(np.unique(labels[labelled])) < 2:
        raise ValueError(f"{source} has a single class; fine-tuning a classifier needs at least two")
    names = corpus.class_names or tuple(str(c) for c in range(int(labels.max()) + 1))
    return images[labelled], labels[labelled], names, skipped


# ----------------------------------------------------------------------------- the protocol


def finetune_config(cfg, name: str, out: Path, steps: int, settings: Settings):
    """The run's config as a fine-tune run: its own name under ``out``, AdamW at ``settings.lr`` for a batch of
    256, scaled linearly (`sslp finetune --lr` says so), one checkpoint at the end."""
    return with_overrides(cfg.to_dict(), [
        f"name={name}", f"runs_dir={out}", f"train.max_steps={steps}", f"train.batch_size={settings.batch_size}",
        "train.optimizer=adamw", f"train.lr={settings.lr}", "train.lr_scaling=linear", "train.weight_decay=0.0",
        f"train.warmup_steps={max(1, steps // 10)}", f"train.checkpoint_every={steps}",
        f"train.log_every={max(1, steps // 5)}", "train.grad_accum_steps=1", "train.compile=false",
        f"scaling.num_workers={settings.workers}", "scaling.strategy=ddp", "eval.enabled=false", "eval.online_every=0",
    ])


def finetune(cfg, checkpoint: Path, source: str, out: Path, settings: Settings = Settings()) -> list[dict]:
    """Fine-tune from the checkpoint and from random init, probe the frozen encoder; write the
    report into ``out`` and return the rows. Ray must be running."""
    check_supported(cfg.method.name, source)
    payload = load_payload(checkpoint)
    state = payload["model"]
    saved = saved_derived(payload)  # None for a checkpoint written before they were saved
    channels = (saved or methods.expected_derived(cfg))["in_channels"]
    splits = labelled_splits(cfg, source, channels, settings)
    train, val = splits.train, splits.val
    derived = saved or image_derived(cfg, train.images)
    check_state(cfg, derived, state)  # a checkpoint that does not fit its own config fails before any training
    steps = settings.steps or max(MIN_STEPS, math.ceil(settings.epochs * len(train) / settings.batch_size))
    ranks = max(1, settings.workers)  # 0: local mode, one rank
    if len(train) // ranks < settings.batch_size // ranks:
        raise ValueError(f"--batch-size {settings.batch_size} is larger than the {len(train)} labelled train "
                         f"examples; lower it")
    print(f"fine-tuning {cfg.method.name} from {checkpoint} on {splits.description}; {steps} steps of "
          f"{settings.batch_size}, random resized crops of at least {settings.crop_scale_min:g} of the area; "
          f"skipped: {format_summary(splits.skipped)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    image_shape = tuple(int(d) for d in train.images.shape[1:])
    state_ref = [ray.put(state)]

    views = AugmentConfig(size=cfg.data.image_size, crop_scale_min=settings.crop_scale_min,
                          flip_prob=0.5 if cfg.data.flip_prob is None else cfg.data.flip_prob,
                          jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)  # crop and flip only

    def data_builder(ft_cfg, run_dir, reporter, model):  # fit's pretraining_data, for the labelled train split
        # Read as pretraining reads an in-memory corpus: each worker its ids of the epoch's order,
        # one stream through every epoch. A few labels make an epoch of a step or two, and a stream
        # started per epoch stalled every step (60 steps of 50 labels: ~0.6 s each on 2 cores).
        configure_data_context()
        seed = order_seed(ft_cfg)
        keys = np.array([f"{source}/{i:06d}" for i in range(len(train))], dtype=object)
        ordered = ordered_corpus(f"{source} (labelled)", {"image": train.images, "label": train.labels, "path": keys},
                                 seed, partial(OneViewAugment, views, seed=seed), views=repr(views))
        return PretrainData(ordered, derived, splits.description)

    rows = []
    for name, ref in (("fine-tuned (pretrained)", state_ref), ("fine-tuned (random init)", None)):
        ft_cfg = finetune_config(cfg, "pretrained" if ref else "random-init", out, steps, settings)
        paths = run_paths(ft_cfg)
        shutil.rmtree(paths.local, ignore_errors=True)  # a fine-tune starts over; Ray would resume an old one
        torch.manual_seed(ft_cfg.train.seed)  # as the loop seeds before its build: the same random init
        start = ClassifierBuild(num_classes, image_shape, ref)(ft_cfg, **derived)
        head = fit_head(start, torch.from_numpy(train.images), torch.from_numpy(train.labels))
        summary = fit(ft_cfg, paths, data_builder=data_builder,
                      build=ClassifierBuild(num_classes, image_shape, ref, head))
        classifier = ClassifierBuild(num_classes, image_shape)(ft_cfg, **derived)
        classifier.load_state_dict(load_payload(summary.checkpoint)["model"])
        rows.append({"encoder": name, "top1": accuracy(classifier, val.images, val.labels),
                     "final_loss": summary.final_loss, "steps": summary.steps, "checkpoint": summary.checkpoint})
    probe = encoder_rows(cfg, train, val, derived, {"linear probe (frozen)": state})[0]
    rows.insert(1, {"encoder": probe["encoder"], "top1": probe["linear_probe_top1"]})
    title = (f"{cfg.name}: {cfg.method.name} fine-tuned on {splits.description} "
             f"({steps} steps, held-out top-1)")
    write_results(out, rows, metrics_path=out / "pretrained" / "metrics.jsonl", title=title)  # its loss curve
    print(markdown_table(rows), flush=True)
    return rows


def accuracy(classifier, images, labels, batch_size: int = 256) -> float:
    """Top-1 (0..1) of ``classifier`` in eval mode on uint8 images (N, C, H, W)."""
    classifier.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits = classifier.logits({"image": torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))})
            correct += int((logits.argmax(1).numpy() == labels[i:i + batch_size]).sum())
    return correct / len(labels)
