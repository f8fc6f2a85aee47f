"""Run a function on several gloo ranks and collect what each returns (CPU only, no Ray).

The distributed-equivalence tests of every gathered loss use this: each rank builds its model,
takes its slice of the batch and returns a dict of tensors; the test compares those with one
process on the whole batch.

    results = run_on_ranks(my_worker, tmp_path)   # my_worker(rank) -> dict, a top-level function

The worker must be a module-level function (it is pickled by name). The rank processes are
started once per pytest process and serve every call (a fresh spawned process costs ~3-5 CPU-s
to import torch and the test module, and some 15 calls in the suite each started two); each call
makes and destroys its own process group, so calls share nothing but the imports.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions bind their default group (group.WORLD) at
# import, and a process group of one call would be a destroyed one in the next call's (open_clip's
# gather_with_grad imports it on first use, which here may be mid-call).
import torch.distributed.nn
from torch import nn

_POOLS: dict[int, ProcessPoolExecutor] = {}  # world size -> its rank processes


def _entry(rank: int, worker: Callable[[int], dict], world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine; no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        torch.save(worker(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _discard(world: int) -> None:
    """Stop the rank processes of ``world`` (a call that failed may have left one waiting in a
    collective); the next call starts fresh ones."""
    pool = _POOLS.pop(world, None)
    if pool is not None:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def run_on_ranks(worker: Callable[[int], dict], tmp_dir: str | Path, world: int = 2) -> list[dict]:
    """``worker(rank)`` on ``world`` gloo processes; returns their results in rank order. Each rank
    blocks in the process group's rendezvous until all have joined, so the ``world`` tasks run in
    the pool's ``world`` distinct processes."""
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / "store"
    store.unlink(missing_ok=True)  # a stale file store from an earlier call would hang the rendezvous
    pool = _POOLS.get(world)
    if pool is None:
        pool = _POOLS[world] = ProcessPoolExecutor(max_workers=world, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_entry, rank, worker, world, str(store), str(tmp)) for rank in range(world)]
    try:
        for future in futures:
            future.result(timeout=600)  # the process group itself times out after 120 s
    except BaseException:
        _discard(world)
        raise
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
