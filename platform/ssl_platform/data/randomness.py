"""Per-record random streams: the same (seed, epoch, record key) always draws the same numbers.

Random transforms (crops, masks, NSP partners) draw each record's randomness from its own
generator, so the result does not depend on how Ray Data happened to batch the records, and a
seeded run is reproducible. ``seed=None`` means fresh entropy on every call.
"""

from __future__ import annotations

import hashlib

import numpy as np


def record_rng(seed: int | None, epoch: int, key: str | bytes) -> np.random.Generator:
    """A generator fixed by (seed, epoch, record key); fresh entropy when ``seed`` is None."""
    if seed is None:
        return np.random.default_rng()
    key = key if isinstance(key, bytes) else str(key).encode()
    digest = hashlib.blake2b(f"{seed}/{epoch}/".encode() + key, digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))
