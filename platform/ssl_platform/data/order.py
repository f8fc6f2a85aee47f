"""The order in which an epoch visits a corpus's records: a function of (seed, epoch) alone.

MosaicML Streaming's recipe, cheap at any scale (no global all-to-all shuffle): the record ids
0..N-1 are cut into contiguous *shards* of ``shard_size`` ids (a file, a row group, a block of an
in-memory corpus), the shards are permuted, and the records of every ``window`` consecutive
shards of that permutation are shuffled among themselves. A record therefore moves at most
``window * shard_size`` positions from its shard's slot, so a reader needs only ``window``
shards open at once, and the order is still different in every epoch.

The order is then split into global batches of ``G`` ids; worker ``w`` of ``N`` takes, of
global batch ``b``, positions ``[b*G + w*G/N, b*G + (w+1)*G/N)``. So global batch ``b`` is the
same *set* of records for any ``N``, and a worker that has taken ``s`` steps of an epoch has
consumed exactly the first ``s * G/N`` ids of its list: a resume skips them by position,
without reading a record. The last ``N mod G`` records of an epoch (an incomplete global
batch) are left out of that epoch, like ``drop_last``; the next epoch's order puts other
records there.

    order = epoch_order(1437, seed=0, epoch=3)           # (1437,) a permutation of 0..1436
    mine = worker_ids(order, batch_size=64, rank=1, world=2)  # (22 * 32,) rank 1's ids, in order

No torch and no Ray: the driver, the workers and the tests call the same functions.
"""

from __future__ import annotations

import numpy as np

SHARD_SIZE = 64  # ids per shard: the unit the permutation moves
WINDOW = 8  # shards whose records are shuffled together


def epoch_rng(seed: int, epoch: int, purpose: int) -> np.random.Generator:
    """A generator fixed by (seed, epoch, purpose): 0 permutes the shards, 1 shuffles windows."""
    return np.random.default_rng([seed % 2**63, epoch, purpose, 0x6F72646572])  # "order"


def epoch_order(num_records: int, seed: int, epoch: int, shard_size: int = SHARD_SIZE,
                window: int = WINDOW) -> np.ndarray:
    """(num_records,) int64: the epoch's global order of record ids, a permutation of 0..N-1.

    Shards (contiguous ranges of ``shard_size`` ids, the last one possibly shorter) are
    permuted; the ids of each run of ``window`` consecutive permuted shards are shuffled.
    """
    if num_records < 0 or shard_size < 1 or window < 1:
        raise ValueError(f"epoch_order needs num_records >= 0, shard_size >= 1, window >= 1; "
                         f"got {num_records}, {shard_size}, {window}")
    num_shards = -(-num_records // shard_size)
    shards = epoch_rng(seed, epoch, 0).permutation(num_shards)
    # Each permuted shard's ids, concatenated: (num_records,)
    starts = shards * shard_size
    lengths = np.minimum(starts + shard_size, num_records) - starts
    ids = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, lengths, strict=True)]
                         ) if num_shards else np.zeros(0, np.int64)
    shuffle = epoch_rng(seed, epoch, 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for first in range(0, num_shards, window):  # one in-window shuffle per run of `window` shards
        lo, hi = offsets[first], offsets[min(first + window, num_shards)]
        ids[lo:hi] = shuffle.permutation(ids[lo:hi])
    return ids


def steps_per_epoch(num_records: int, batch_size: int) -> int:
    """Full global batches in an epoch (the incomplete last one is dropped)."""
    return num_records // batch_size


def worker_ids(order: np.ndarray, batch_size: int, rank: int, world: int) -> np.ndarray:
    """(steps_per_epoch * batch_size / world,) int64: the ids worker ``rank`` of ``world`` reads,
    in order. Of global batch b it takes positions [b*G + rank*G/world, b*G + (rank+1)*G/world)."""
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} does not split into {world} equal worker batches")
    steps = steps_per_epoch(len(order), batch_size)
    per_worker = batch_size // world
    return order[: steps * batch_size].reshape(steps, world, per_worker)[:, rank].reshape(-1)
