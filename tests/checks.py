"""Assertions several model test modules share."""

from __future__ import annotations

import torch
from torch import nn


def assert_step_end_changes_nothing(method: nn.Module, step: int, max_steps: int) -> None:
    """``on_train_step_end`` moves only state kept outside the optimizer: BYOL's EMA target
    (``target_*``, which moves by rounding even while it equals the online network), nothing of
    any other method, and never a trained parameter (that is the optimizer's job)."""
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.on_train_step_end(step=step, max_steps=max_steps)
    after = method.state_dict()
    assert set(after) == set(before)
    changed = sorted(k for k in before if not before[k].equal(after[k]) and not k.startswith("target_"))
    assert not changed, f"on_train_step_end changed {changed}"


def train_on_one_batch(method: nn.Module, batch: dict, optimizer, steps: int) -> list[float]:
    """``steps`` optimizer steps of ``method`` on the same ``batch``, each followed by
    ``on_train_step_end`` as the training loop calls it; the loss before each step."""
    losses = []
    for step in range(steps):
        out = method(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.on_train_step_end(step, steps)
        losses.append(out["loss"].item())
    return losses


def losses_on_a_fixed_batch(method: nn.Module, batch: dict[str, torch.Tensor], steps: int = 30,
                            lr: float = 3e-3) -> list[float]:
    """The loss of each of ``steps`` AdamW steps on one batch (:func:`train_on_one_batch`): a
    method that can learn anything fits a single batch."""
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    return train_on_one_batch(method, batch, optimizer, steps)
