"""Keep the memory a batch freed for the next batch, instead of handing it back to the OS.

Every process of a run makes the same large tensors over and over: a data task's decoded
images, crops and views (megabytes per chunk), a train worker's activations (hundreds of
megabytes per step). torch's CPU allocator is glibc's ``malloc``, which by default serves such
blocks with ``mmap`` and returns them with ``munmap`` (or trims the heap) as soon as they are
freed, so the next batch's tensors start as fresh pages: one page fault per 4 KiB touched, which
on a virtual machine costs as much as the arithmetic. Measured on the development machine (2
cores, 2026-12-05), one thread: SimCLR's two views of 32-px images 20 -> 7.4 us per view for the
crop and 19 -> 7.8 for the colour ops (2,600-3,000 page faults per chunk of 341 images -> 0), a
`simclr-digits` training step 880 -> 1,060 samples/s (35,000 faults per step -> 0),
`clip-digit-captions` 1,460 -> 1,530.

:data:`HEAP_ENV` sets glibc's two thresholds: blocks up to 32 MiB come from the heap (glibc's
own ceiling for the setting), and up to 1 GiB freed at its top stays there. And one arena for
all threads: Ray Train runs the training function in a thread of its worker, and a thread's own
arena grows in heaps of 64 MiB, each handed back whole (whatever the thresholds) when the step's
tensors that filled it are freed. In a thread, the same SimCLR step ran 860 samples/s with glibc's
defaults (26,000 faults per step), 970 with the thresholds alone (17,000), 1,070 with one arena
(0); `sslp run simclr-digits`, 2 workers, three interleaved pairs of 200 steps with the
thresholds: 1,004 / 1,009 / 1,028 samples/s with an arena per thread, 1,105 / 1,099 / 1,038 with
one. A process then holds on to its peak working set, as a caching allocator (CUDA's) does. ``sslp``
applies it to itself first thing (:func:`keep_freed_memory`: the driver runs local mode and the
evaluation's probes) and to the processes it starts (a local Ray cluster, a DataLoader's spawned
workers); the workers of a joined cluster (train workers, Ray Data tasks, evaluation actors) get
it through the job's ``runtime_env`` (``train.session.job_env``). ``MALLOC_*`` variables the user
set win: nothing here overrides them, and the workers get the user's. Other C libraries (macOS,
musl) ignore them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**30
ARENA_MAX = 1
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
            "MALLOC_ARENA_MAX": str(ARENA_MAX)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)


def user_sets_malloc() -> bool:
    """True when this process's environment has glibc ``MALLOC_*`` tuning variables other than ours."""
    theirs = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return bool(theirs) and theirs != HEAP_ENV


def heap_env() -> dict[str, str]:
    """The allocator variables a run's workers get: the driver's own ``MALLOC_*`` variables when it
    has any (the user's, or ours from :func:`keep_freed_memory`), else :data:`HEAP_ENV`."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or dict(HEAP_ENV)


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Apply :data:`HEAP_ENV` to this process (``mallopt``) and to the processes it starts from now
    on (``os.environ``: a local Ray cluster, spawned workers). Call it first thing in a process,
    before other threads allocate: glibc gives each thread its own arena, and an arena that is
    already in use keeps returning pages (measured: 1,600-1,800 faults per chunk instead of 0).

    Returns True when the thresholds are in force: set here, or given by the environment at
    start-up; False without glibc, or when the user's own ``MALLOC_*`` settings are
    left alone.
    """
    if all(os.environ.get(k) == v for k, v in HEAP_ENV.items()):
        return True  # set at start-up: glibc read the variables
    libc = None if user_sets_malloc() else _glibc()
    if libc is None:
        return False
    done = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, ARENA_MAX)))
    if done:
        os.environ.update(HEAP_ENV)
    return done


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # glibc only: musl and macOS have no mallopt with these meanings
    return libc if hasattr(libc, "gnu_get_libc_version") else None
