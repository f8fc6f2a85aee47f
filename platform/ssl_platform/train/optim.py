"""Optimizers and the learning-rate schedule of the per-worker loop.

LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") is what SimCLR and
BYOL use for large batches; biases and normalisation weights are excluded from both weight
decay and the layer-wise adaptation, as in those papers. The peak learning rate follows
``train.lr_scaling`` (``TrainConfig.effective_lr``: the linear scaling rule for the LARS and SGD
recipes, the rate as given for AdamW), with linear warmup and cosine decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer step is scaled by ``eta * ||w|| / ||g + wd * w||``.

    Parameter groups with ``lars_exclude=True`` (biases, norm weights) take plain SGD steps
    without weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    # Trust ratio is 1 where either norm is zero (fresh layers, dead grads).
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    grad = grad.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters: weights of linear/conv layers decay; biases and norm weights don't."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)  # 1-D: biases, BatchNorm/LayerNorm scales
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    adam_beta2: float = 0.999) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, adam_beta2))
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; known: lars, adamw, sgd")


def warmup_cosine(step: int, max_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine decay to 0.

    Warmup is capped at half the run so a short run (a smoke test) still decays.
    """
    warmup = min(warmup_steps, max_steps // 2)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
