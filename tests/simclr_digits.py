"""A tiny SimCLR on the built-in digits, trained in-process with plain torch (no Ray), and its
checkpoint in the platform's format: what the evaluation, embed, fine-tune and export tests feed
to the code under test. ``conftest.trained_simclr`` trains it once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssl_platform.config import ExperimentConfig, load_config
from ssl_platform.data.augment import finish_views
from ssl_platform.data.transforms import MultiViewAugment
from ssl_platform.evaluate.inference import build_method
from ssl_platform.train.checkpoint import TrainState, rng_state, save_state
from ssl_platform.views import recipe

SIZE = 16
TINY = ["data.image_size=16", "model.encoder_widths=[8,16]", "model.projector_width=64", "model.projector_dim=32",
        "eval.batch_size=128", "eval.supervised_epochs=0"]
DERIVED = {"in_channels": 1}  # the digits are grayscale


def tiny_cfg(*overrides: str, method: str = "simclr") -> ExperimentConfig:
    return load_config(f"{method}-digits", [*TINY, *overrides])


def save_checkpoint(directory: str | Path, cfg: ExperimentConfig, method: torch.nn.Module, step: int = 1) -> None:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    save_state(directory, model_state=method.state_dict(), optimizer_state={},
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), state=TrainState(step=step),
               rng=[rng_state()], config=cfg.to_dict())


def pretrain(cfg: ExperimentConfig, images: np.ndarray, steps: int, seed: int = 0) -> torch.nn.Module:
    """Steps of ``cfg``'s two-view method (SimCLR unless ``cfg`` says otherwise) in-process, plain
    torch, on the same two-view batches the pipeline makes, with the method's end-of-step hook
    (BYOL's EMA target) as the training loop calls it."""
    torch.manual_seed(seed)
    method = build_method(cfg, DERIVED, None, seed).train()
    augment = MultiViewAugment(recipe(cfg.method.name, size=SIZE, flip_prob=0.0, crop_scale_min=0.5), seed=seed)
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3)
    g = np.random.default_rng(seed)
    for step in range(steps):
        idx = g.choice(len(images), 128, replace=False)
        views = augment({"image": images[idx], "path": np.array([f"{step}/{i}" for i in idx])})
        loss = method(finish_views({k: torch.from_numpy(v) for k, v in views.items()}, ()))["loss"]  # as the loop
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_train_step_end(step, steps)
    return method.eval()
