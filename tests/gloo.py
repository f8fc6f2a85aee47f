"""Run a function on several gloo ranks and collect what each returns (CPU only, no Ray).

The distributed-equivalence tests of every gathered loss use this: each rank builds its model,
takes its slice of the batch and returns a dict of tensors; the test compares those with one
process on the whole batch.

    results = run_on_ranks(my_worker, tmp_path)   # my_worker(rank) -> dict, a top-level function

The worker must be a module-level function (``torch.multiprocessing`` pickles it by name).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _entry(rank: int, worker: Callable[[int], dict], world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine; no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        torch.save(worker(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(worker: Callable[[int], dict], tmp_dir: str | Path, world: int = 2) -> list[dict]:
    """``worker(rank)`` on ``world`` gloo processes; returns their results in rank order."""
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / "store"
    store.unlink(missing_ok=True)  # a stale file store from an earlier call would hang the rendezvous
    mp.spawn(_entry, args=(worker, world, str(store), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def tiny_projector() -> nn.Module:
    """The same float64 (B, 10) -> (B, 6) model on every rank and in the single process."""
    torch.manual_seed(0)
    # No BatchNorm: its batch statistics would differ between a half batch and the whole one.
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6)).double()


def two_view_batch(pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed float64 batch of ``pairs`` (view1, view2) rows of width 10, correlated views."""
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(pairs, 10, generator=g, dtype=torch.float64)
    x2 = x1 + 0.5 * torch.randn(pairs, 10, generator=g, dtype=torch.float64)
    return x1, x2
