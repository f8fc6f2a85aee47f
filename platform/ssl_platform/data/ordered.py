"""A corpus every train worker reads by record id, in the epoch's order (issue 18).

The driver puts the records in the object store once (:func:`ordered_corpus`); each train worker
builds its own Ray Dataset of the ids :mod:`ssl_platform.data.order` gives it, epoch after epoch
in one stream (a new stream per epoch stalled training at every boundary), and maps them to
finished batches (read by id, then the method's transform with the block's epoch), in order:
``preserve_order`` and no local shuffle buffer. So

- the records of global batch b, and every record's views (a function of (seed, epoch, key)),
  are the same on 1 or N workers and in every attempt;
- a resume at step s of an epoch skips the worker's first ``s * G/N`` ids by position: no record
  is read or decoded to be thrown away, so resuming late in an epoch costs what resuming early does.

Transforms must be 1:1 (one output row per record, keyed by the record, not by its batch): the
image views, the CLIP crops and the audio crops are; a file corpus fills the slot of a record
that fails to decode (:mod:`~ssl_platform.data.listed`), BERT's records are sentence chunks.

    corpus = ordered_corpus("digits", {"image": images, "path": paths}, seed=0, transform=make_views)
    ds = epoch_stream(corpus, epoch=3, rank=0, world=2, batch_size=64, skip=320, chunk=256, epochs=2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data

from ssl_platform.data.context import configure_data_context
from ssl_platform.data.order import SHARD_SIZE, WINDOW, epoch_order, steps_per_epoch, worker_ids


@dataclass(frozen=True)
class OrderedCorpus:
    """In-memory records in the object store, and what turns a batch of them into training rows."""

    name: str  # the corpus's identity, for the resume fingerprint
    records: ray.ObjectRef  # dict[str, np.ndarray]: one entry per column, num_records rows each
    num_records: int
    seed: int  # the order's and the augmentations' seed
    transform: Callable[..., Callable]  # transform(epoch=e) -> the map_batches callable of epoch e
    shard_size: int = SHARD_SIZE
    window: int = WINDOW
    settings: dict[str, Any] = field(default_factory=dict)  # what else the rows depend on (image size, ...)

    def fingerprint(self, batch_size: int) -> dict[str, Any]:
        """What an exact resume depends on: the same fingerprint means the same records in the
        same order with the same views. Worker count is not part of it."""
        return {"corpus": self.name, "records": self.num_records, "seed": self.seed, "batch_size": batch_size,
                "order": f"{self.shard_size}x{self.window}", **self.settings}

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self.num_records, batch_size)


def ordered_corpus(name: str, records: dict[str, np.ndarray], seed: int, transform: Callable[..., Callable],
                   shared: dict[str, np.ndarray] | None = None, **settings: Any) -> OrderedCorpus:
    """Put ``records`` (columns of equal length, one row per record) in the object store (Ray must be
    initialised). ``shared``: arrays of other lengths that the records index (BERT's token stream),
    stored after the columns in the same table, for a transform that ``reads_by_id``."""
    lengths = {len(v) for v in records.values()}
    if len(lengths) != 1:
        raise ValueError(f"the columns of corpus {name} differ in length: {sorted(lengths)}")
    table = {**records, **(shared or {})}
    return OrderedCorpus(name, ray.put(table), lengths.pop(), seed, transform, settings=settings)


def fingerprint_change(stored: dict | None, current: dict) -> str | None:
    """One phrase naming what changed between a checkpoint's fingerprint and this run's, or None."""
    if stored is None:
        return "the checkpoint records no data position (written before exact resume existed)"
    changed = [f"{k} {stored.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(stored) | set(current))
               if stored.get(k) != current.get(k)]
    return ", ".join(changed) or None


class AsIs:
    """The transform of records that are training rows already (GPT's blocks): ``AsIs(epoch=e)(batch) is batch``."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


class ReadRecords:
    """``map_batches`` callable: a block of record ids (column ``data``) -> the transform's rows
    of those records, in the same order.

    A transform with ``reads_by_id = True`` is called as ``transform(ids, table)`` instead: it
    reads what the listing names (files of a ``data.path`` corpus, :mod:`~ssl_platform.data.listed`)
    or needs other records than the block's (BERT's random next sentences)."""

    def __init__(self, records: ray.ObjectRef, transform: Callable):
        self.records, self.transform = records, transform

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = ray.get(self.records)  # zero-copy from the object store for numeric columns
        ids = np.asarray(batch["data"], dtype=np.int64)
        if getattr(self.transform, "reads_by_id", False):
            return self.transform(ids, table)
        return self.transform({column: values[ids] for column, values in table.items()})


class ReadEpochBlocks:
    """``map_batches`` callable of a stream over several epochs: a block of ``(epoch, id)`` rows (column
    ``data``, (k, 2); one epoch per block) -> :class:`ReadRecords` with that epoch's transform."""

    def __init__(self, records: ray.ObjectRef, transform: Callable[..., Callable]):
        self.records, self.transform = records, transform

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = np.asarray(batch["data"], dtype=np.int64)  # (k, 2): epoch, record id
        read = ReadRecords(self.records, self.transform(epoch=int(pairs[0, 0])))
        return read({"data": pairs[:, 1]})


MAX_STREAM_IDS = 1_000_000  # ids one stream may list (16 bytes each in the object store): epochs beyond wait


def stream_epochs(steps_left: int, steps_in_epoch: int, epoch_step: int, ids_per_epoch: int) -> int:
    """How many epochs, from the current one (``epoch_step`` steps into it), a stream for the next
    ``steps_left`` steps covers: all of them, as long as they list at most :data:`MAX_STREAM_IDS` ids."""
    if steps_in_epoch < 1:  # no full batch in an epoch: the loop says so after one empty stream
        return 1
    after_this = max(0, steps_left - (steps_in_epoch - epoch_step))
    needed = 1 + -(-after_this // steps_in_epoch)
    return max(1, min(needed, MAX_STREAM_IDS // max(1, ids_per_epoch)))


def epoch_stream(corpus: OrderedCorpus, *, epoch: int, rank: int, world: int, batch_size: int, skip: int = 0,
                 chunk: int = 256, epochs: int = 1) -> ray.data.Dataset | None:
    """Worker ``rank``'s training rows of ``epochs`` consecutive epochs from ``epoch`` on, in order,
    without the first ``skip`` ids of the first; None when nothing is left. One block (one transform
    task) per ``chunk`` ids of one epoch.

    One stream over several epochs, not one per epoch: a new Ray Data execution at every epoch
    boundary stalled the training for its start (0.2-0.5 s; 10-20% of a ~1.7 s epoch of
    bert-python-docs on 2 cores). A worker's ids per epoch are whole local batches, so the
    micro-batches of consecutive epochs never mix.
    """
    blocks = []
    for e in range(epoch, epoch + epochs):
        order = epoch_order(corpus.num_records, corpus.seed, e, corpus.shard_size, corpus.window)
        ids = worker_ids(order, batch_size, rank, world)[skip if e == epoch else 0:]
        blocks += [np.stack([np.full(len(ids[i:i + chunk]), e), ids[i:i + chunk]], axis=1)
                   for i in range(0, len(ids), chunk)]
    if not blocks:
        return None
    configure_data_context()  # a train worker's own context: the platform's settings (no progress bars in its log)
    ds = ray.data.from_numpy(blocks)
    # One CPU per transform task; the train workers hold only fractions (see train.resources).
    ds = ds.map_batches(ReadEpochBlocks(corpus.records, corpus.transform), batch_size=None, batch_format="numpy",
                        num_cpus=1)
    ds.context.execution_options.preserve_order = True  # rows leave in the order of the ids
    return ds
