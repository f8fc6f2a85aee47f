"""Training state <-> a checkpoint directory, loaded safely.

One file, ``state.pt``, holds the full (unsharded) model and optimizer state, the scheduler,
the step and epoch, every rank's RNG states (torch, CUDA, Python ``random``, NumPy) and the
resolved config. It is written with ``torch.save`` and read with
``torch.load(weights_only=True)``: only tensors and plain containers, so loading a checkpoint
can never execute code (the NumPy and Python RNG states are stored as tensors and ints for
that reason). It also holds the data-derived constructor arguments the method was built with
(``derived``: ``in_channels``, ``vocab_size``, ...), so evaluation, ``load``, export, embed and
fine-tuning rebuild the method from the checkpoint alone, without reading the corpus again.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict``, which gives
the same layout for a plain module, DDP and FSDP: parameter names as in ``method.state_dict()``
(so evaluation loads ``payload["model"]`` into a fresh method) and optimizer state keyed by
parameter name, so a run checkpointed with one strategy resumes with the other.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# torch.distributed.checkpoint, FSDP and DTensor are imported where they are used (~1 s of CPU
# together): evaluation reads checkpoints, the CLI and Ray Train's controller import this package,
# and none of them needs them.

STATE_FILE = "state.pt"
POSITION_FILE = "position.json"  # where the data stream was: read by the driver before it resumes


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # completed passes over the data shard
    # Where the data stream is (an ordered corpus, issue 18): steps taken in the current epoch,
    # so every worker has read the first epoch_step * batch_size / workers ids of its list, and
    # what that position depends on (data.ordered.OrderedCorpus.fingerprint).
    epoch_step: int = 0
    data: dict | None = None


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state with full tensors, complete on rank 0 only.

    A collective under FSDP (shards are gathered): every rank must call it. ``model`` is the
    method itself (not a DDP wrapper), so names carry no ``module.`` prefix.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0's CPU memory
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optimizer, options=full)


def is_fsdp(module: torch.nn.Module) -> bool:
    """Whether ``module`` is sharded with FSDP2 (``fully_shard``). Cheap: FSDP's module is only
    imported by a run that shards, so if it is not loaded, nothing is sharded."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only`` loadable)."""
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002 (the global RNG is the state saved)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = rng["numpy"]
    np.random.set_state(  # noqa: NPY002 (the global RNG is the state restored)
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective when a process group exists)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def save_state(directory: str | Path, *, model_state: dict, optimizer_state: dict, scheduler: Any,
               state: TrainState, rng: list[dict], config: dict, derived: dict[str, Any] | None = None) -> Path:
    """Write ``state.pt`` (rank 0, with the output of :func:`full_state_dicts` and :func:`all_rng_states`).

    ``derived``: the data-derived constructor arguments the method was built with (plain ints)."""
    path = Path(directory) / STATE_FILE
    payload = {
        "derived": dict(derived or {}),
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "epoch_step": state.epoch_step,
        "data": state.data,
        "rng": rng,
        "config": config,
    }
    torch.save(payload, path)
    if state.data is not None:  # the resume check reads this, not the whole state
        position = {"step": state.step, "epoch": state.epoch, "epoch_step": state.epoch_step, "data": state.data}
        (Path(directory) / POSITION_FILE).write_text(json.dumps(position) + "\n")
    return path


def saved_position(checkpoint: str) -> dict | None:
    """The data position a checkpoint (a path or URI) was written at: ``{"step", "epoch",
    "epoch_step", "data"}``, or None when it records none (a checkpoint written before positions were)."""
    from ssl_platform.data.sources import filesystem

    fs, path, _ = filesystem(checkpoint, what="checkpoint")
    try:
        with fs.open_input_stream(f"{path}/{POSITION_FILE}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def saved_derived(payload: dict) -> dict[str, Any] | None:
    """The data-derived constructor arguments a checkpoint's method was built with, or None for
    a checkpoint written before they were saved (callers then recompute them from the config and
    the corpus, as they did before)."""
    derived = payload.get("derived")
    return dict(derived) if derived else None


def load_payload(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an ssl-platform checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_state(directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, rank: int = 0) -> TrainState:
    """Load a checkpoint into ``model`` (the method, plain or FSDP-sharded), ``optimizer`` and
    ``scheduler``, and this rank's RNG states. Every rank calls it; each loads the full state
    and keeps its own shard. A rank that did not exist when the checkpoint was written (more
    workers now) keeps the RNG state it was seeded with."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    payload = load_payload(directory)
    load = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, payload["model"], options=load)
    set_optimizer_state_dict(model, optimizer, payload["optimizer"], options=load)
    scheduler.load_state_dict(payload["scheduler"])
    if rank < len(payload["rng"]):
        set_rng_state(payload["rng"][rank])
    return TrainState(step=int(payload["step"]), epoch=int(payload["epoch"]),
                      epoch_step=int(payload.get("epoch_step", 0)), data=payload.get("data"))
