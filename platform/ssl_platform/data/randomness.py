"""Per-record random streams: the same (seed, epoch, record key) always draws the same numbers.

Random transforms (crops, masks, NSP partners) draw each record's randomness from its own
stream, so the result does not depend on how Ray Data happened to batch the records, and a
seeded run is reproducible. ``seed=None`` means fresh entropy on every call.

Two forms of the same contract, for two kinds of caller:

- :func:`record_rng`: a numpy ``Generator`` per record. Use it when a record needs an open-ended
  or data-dependent number of draws (``choice`` without replacement, a span mask whose length
  follows the clip, NSP partners): masking (:mod:`~ssl_platform.data.masking`) and audio crops.
- :func:`record_uniforms` (and :func:`batch_uniforms` on a batch): a fixed number of uniforms
  per record for a whole batch at once, vectorised (a counter-based hash, no Python loop per
  record and no Generator to build). Use it when every record draws the same fixed set of
  numbers and the batch is large: image views (:mod:`~ssl_platform.data.transforms`) and the
  CLIP crops (:mod:`~ssl_platform.data.captions`).

The two give different numbers for the same key; a transform uses one of them throughout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def record_rng(seed: int | None, epoch: int, key: str | bytes) -> np.random.Generator:
    """A generator fixed by (seed, epoch, record key); fresh entropy when ``seed`` is None."""
    if seed is None:
        return np.random.default_rng()
    key = key if isinstance(key, bytes) else str(key).encode()
    digest = hashlib.blake2b(f"{seed}/{epoch}/".encode() + key, digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scatters nearby inputs (vectorised)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key_hashes(keys: Sequence) -> np.ndarray:
    """(B,) uint64: a stable 64-bit hash of each record key (str, bytes or int)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64, count=len(keys))


def record_uniforms(keys: Sequence | None, n: int, seed: int | None, epoch: int | np.ndarray = 0,
                    batch_size: int | None = None):
    """(B, n) float32 torch uniforms in [0, 1): row b depends only on (seed, epoch, keys[b]).

    A counter-based generator (SplitMix64 of hash(seed, epoch, key) + counter), so the draws of
    a record do not depend on which batch it lands in. ``epoch`` may be a (B,) array (an
    ``epoch`` column). ``seed=None`` draws fresh entropy for every record (keys are ignored);
    ``keys=None`` uses the position in the batch, which is then only reproducible for the same
    batching.
    """
    import torch  # here, not at the top: text and audio use record_rng without torch

    with np.errstate(over="ignore"):
        b = len(keys) if keys is not None else batch_size
        if seed is None:
            base = np.random.default_rng().integers(0, 2**64, size=b, dtype=np.uint64)
        else:
            hashed = _key_hashes(keys) if keys is not None else np.arange(b, dtype=np.uint64)
            run = _mix64(np.uint64(seed % 2**64) * _GOLDEN)
            epochs = np.broadcast_to(np.asarray(epoch, dtype=np.int64), (b,)).astype(np.uint64)
            base = _mix64(hashed ^ _mix64(run ^ (epochs + np.uint64(1)) * _GOLDEN))
        counters = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN  # (n,)
        z = _mix64(base[:, None] + counters[None, :])  # (B, n)
        u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)  # 24 bits: exact in float32, < 1
    return torch.from_numpy(u)


def record_keys(batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """The stable per-record key of a batch: its ``path``, else its ``key`` or ``id`` column."""
    for column in ("path", "key", "id"):
        if column in batch:
            return batch[column]
    return None


def batch_uniforms(batch: dict[str, np.ndarray], n: int, seed: int | None, epoch: int, rows: int):
    """:func:`record_uniforms` of a ``map_batches`` batch of ``rows`` records: (rows, n) float32.

    Keys come from :func:`record_keys`; an ``epoch`` column, if present, overrides ``epoch``
    per record.
    """
    epoch = batch.get("epoch", epoch)
    return record_uniforms(record_keys(batch), n, seed, epoch, batch_size=rows)
