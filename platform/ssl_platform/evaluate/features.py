"""Frozen features from an encoder, and the supervised baseline encoder.

``extract_features`` turns images into the (N, D) matrix the probes in ``probe.py`` eat.
``train_supervised`` trains the same architecture with the labels, the upper reference row of
the results table: a self-supervised encoder is judged by how close it gets to it (and by how
far it is above random init).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_images(images: np.ndarray | Tensor, name: str = "images") -> Tensor:
    """(N, C, H, W) float32 tensor, or a ValueError saying what shape was given."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"{name} must be a (N, C, H, W) batch, got shape {tuple(x.shape)}; "
                         f"add the channel axis for grayscale images (x[:, None])")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float (normalised), got dtype {x.dtype}; "
                         f"convert uint8 images with ssl_platform.data.transforms.to_float")
    return x.float()


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _training_flags(module: nn.Module) -> dict[nn.Module, bool]:
    # Per submodule, so an encoder with e.g. a deliberately frozen eval-mode BatchNorm inside a
    # training-mode model gets back exactly what it had, not a blanket .train(flag).
    return {m: m.training for m in module.modules()}


def _restore_training_flags(flags: dict[nn.Module, bool]) -> None:
    for m, training in flags.items():
        m.training = training


def extract_features(encoder: nn.Module, images: np.ndarray | Tensor, batch_size: int = 256) -> np.ndarray:
    """Features of ``images`` from ``encoder`` in eval mode, without gradients, batch by batch.

    Eval mode so BatchNorm uses its running statistics and a feature does not depend on which
    other images share its batch. The encoder's training flags are restored afterwards, so this
    can be called in the middle of training.

    Shape:
        - images: (N, C, H, W) float
        - output: (N, D) float32 numpy; encoders returning (N, D, ...) are flattened to (N, D')
    """
    x = _as_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(encoder)
    flags = _training_flags(encoder)
    encoder.eval()
    try:
        with torch.no_grad():
            chunks = [encoder(batch.to(device)).flatten(1).float().cpu() for batch in x.split(batch_size)]  # (B, D)
    finally:
        _restore_training_flags(flags)
    if not chunks:
        raise ValueError("images is empty; need at least one image to extract features")
    return torch.cat(chunks).numpy()  # (N, D)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y: pad, then crop at a random offset.

    Replicate padding rather than zeros because the images are normalised: zero is the dataset
    mean, not the background, and a grey band would be a cue no test image has. One gather for
    the whole batch instead of a Python loop over images.

    Shape: x (B, C, H, W) -> (B, C, H, W)
    """
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    oy, ox = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)  # (B, 1) each
    rows = (oy + torch.arange(h)).to(x.device)  # (B, H)
    cols = (ox + torch.arange(w)).to(x.device)  # (B, W)
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def train_supervised(encoder: nn.Module, feature_dim: int, images: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                     num_classes: int, epochs: int = 15, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     weight_decay: float = 0.05, max_shift: int = 3) -> nn.Module:
    """Train ``encoder`` end to end with a linear head and cross-entropy; return the encoder.

    The "supervised (labels)" baseline of the results table: same architecture and data as the
    self-supervised run, but with labels. AdamW with a per-step cosine schedule to zero, and
    random shifts of up to ``max_shift`` pixels as the only augmentation (flips or colour jitter
    would change what a digit is). The head is thrown away; the encoder is trained in place and
    left in the training mode it came in.

    Args:
        encoder: maps (B, C, H, W) to (B, feature_dim).
        feature_dim: width of the encoder output, the head's input.
        images: (N, C, H, W) float, normalised like the evaluation images.
        labels: (N,) int class ids in [0, num_classes).
    """
    x = _as_images(images)
    y = torch.as_tensor(np.asarray(labels)).long()
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"labels must be (N,) with N = {len(x)} images, got shape {tuple(y.shape)}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 images to train the supervised baseline, got {len(x)}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
                         f"got range [{int(y.min())}, {int(y.max())}]")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got epochs={epochs}, batch_size={batch_size}")

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)  # shuffling and shifts, independent of global RNG use
    device = _device_of(encoder)
    # Plain NCHW, not channels_last: on torch 2.14.1 CPU, a channels_last backward through the
    # 1-channel stem corrupted the heap ("double free or corruption", reproduced outside Ray).
    head = nn.Linear(feature_dim, num_classes).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # A last batch of one image would break BatchNorm in training mode, so it is folded away.
    batches_per_epoch = len(x) // batch_size + (len(x) % batch_size >= 2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)

    flags = _training_flags(encoder)
    encoder.train()
    try:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                if len(idx) < 2:
                    continue
                xb = random_shift(x[idx].to(device), max_shift, g)  # (B, C, H, W)
                features = encoder(xb)  # (B, feature_dim)
                if features.ndim != 2 or features.shape[1] != feature_dim:
                    raise ValueError(f"encoder returned features of shape {tuple(features.shape)} but "
                                     f"feature_dim={feature_dim}; pass the encoder's output width")
                loss = F.cross_entropy(head(features), y[idx].to(device))
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"supervised baseline loss became {loss.item()}; lower lr (now {lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    finally:
        _restore_training_flags(flags)
    return encoder
