"""The allocator settings of every process of a run (ssl_platform.heap): freed tensors' memory
stays in the process for the next batch instead of coming back as fresh pages, one page fault
per 4 KiB, whatever thread allocates it; the user's own ``MALLOC_*`` settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ssl_platform.heap import HEAP_ENV, heap_env
from ssl_platform.train.session import job_env

# In a thread (Ray Train runs the training function in one), 40 times: allocate and fill arrays
# of 8-24 MiB, 88 MiB in all (more than the 64 MiB heap of a thread's own glibc arena), as a
# step's activations are, then free them. Prints the page faults per round after the first and
# what keep_freed_memory() said.
ROUNDS = """
import json, resource, sys, threading
import numpy as np
kept = None
if sys.argv[1] == "keep":
    from ssl_platform.heap import keep_freed_memory
    kept = keep_freed_memory()

def rounds(out):
    def one():
        arrays = [np.ones(n * 2**20 // 8) for n in (8, 16, 24, 24, 16)]
        return sum(a[-1] for a in arrays)
    one()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        one()
    out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 40)

out = []
thread = threading.Thread(target=rounds, args=(out,))
thread.start()
thread.join()
print(json.dumps({"faults_per_round": out[0], "kept": kept}))
"""
PAGES_PER_ROUND = 88 * 2**20 // 4096  # the 88 MiB each round touches


def _rounds(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], env={**clean, **env}, capture_output=True,
                          text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults_in_any_thread():
    kept = _rounds("keep")
    assert kept["kept"] is True
    assert kept["faults_per_round"] < 0.005 * PAGES_PER_ROUND, kept  # 0 here (2026-12-05)
    # a worker process started with the variables (a run's Ray workers) is as good
    started = _rounds("plain", **HEAP_ENV)
    assert started["faults_per_round"] < 0.005 * PAGES_PER_ROUND, started
    # glibc's defaults hand blocks back and fault them in again (1,082 a round here): what the settings remove
    plain = _rounds("plain")
    assert plain["faults_per_round"] > 0.02 * PAGES_PER_ROUND, plain


def test_the_users_own_malloc_settings_win(monkeypatch):
    assert _rounds("keep", MALLOC_ARENA_MAX="4")["kept"] is False  # left alone: nothing set over them
    for key in list(os.environ):
        if key.startswith("MALLOC_"):
            monkeypatch.delenv(key)
    assert heap_env() == HEAP_ENV
    assert HEAP_ENV.items() <= job_env(local=True).items()  # every worker of a run gets them
    assert HEAP_ENV.items() <= job_env(local=False).items()  # on a joined cluster too (its runtime_env)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    env = job_env(local=False)
    assert env["MALLOC_ARENA_MAX"] == "4" and "MALLOC_TRIM_THRESHOLD_" not in env
