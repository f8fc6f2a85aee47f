"""Training state <-> a checkpoint directory, loaded safely.

One file, ``state.pt``, holds model, optimizer and scheduler state, the step and epoch, the
torch RNG state and the resolved config. It is written with ``torch.save`` and read with
``torch.load(weights_only=True)``: only tensors and plain containers, so loading a checkpoint
can never execute code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0


def save_state(directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, state: TrainState, config: dict) -> Path:
    path = Path(directory) / STATE_FILE
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": config,
    }
    torch.save(payload, path)
    return path


def load_payload(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an ssl-platform checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_state(directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any) -> TrainState:
    payload = load_payload(directory)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng_torch"])
    if payload["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return TrainState(step=int(payload["step"]), epoch=int(payload["epoch"]))
