"""Ray for a run: join a cluster or start a local one (:func:`init_ray`), and the errors a run
reports to the user, whose messages say what to change (``command.on_ray`` turns them into exit
statuses).
"""

from __future__ import annotations

import os
import threading

import ray

from ssl_platform.data.context import current_data_context
from ssl_platform.heap import heap_env
from ssl_platform.train.console import CONSOLE_ENV, Console


class ResourceError(RuntimeError):
    """The cluster can never (or not in time) satisfy the request; the message says what to change."""


class DataError(RuntimeError):
    """The corpus cannot be trained on (missing path, no usable record); the message names it."""


class StorageError(RuntimeError):
    """``runs_dir`` cannot be opened (an unknown URI scheme, a store without credentials)."""


class TrainingFailed(RuntimeError):
    """Training stopped on a worker error; the message is one line, the full error is in error.log."""


# Driver environment variables with this prefix reach every worker (SSLP_CRASH_AT_STEP, the
# worker-kill fault injection of tests/test_faults.py, is one).
ENV_PREFIX = "SSLP_"
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def shutdown_ray() -> None:
    """Leave Ray (stopping the cluster this process started) once Ray Data's prefetch threads are done.

    A local-mode run stops its loop in the middle of an epoch, and Ray Data's iterator thread
    (``iter_threaded``) is still finishing the batch it was fetching; ``ray.shutdown()`` under it
    makes Ray's core worker exit this process with status 1 after the run succeeded.
    """
    for thread in threading.enumerate():
        if thread.name == "iter_threaded":
            thread.join(timeout=30)
    ray.shutdown()


def job_env(local: bool) -> dict[str, str]:
    """The environment variables every worker process of a run's Ray job gets (its ``runtime_env``:
    the workers of a joined cluster do not inherit the driver's environment). The user's own
    setting of any of them wins."""
    # Ray Train V2 re-routes print() in workers to its logger *and* stdout, and Ray Data logs a
    # line per pass over the data; the training progress line is what the terminal should show.
    quiet = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_LOG_LEVEL": "WARNING"}
    if local:
        # Ray Data lists a parquet corpus with a pool of footer-reading actors, 32 of them by
        # default: on a laptop, 32 processes that each take ~3 CPU-s to start, for a few files.
        # One per CPU of the local cluster (a joined cluster keeps Ray's default).
        quiet[FOOTER_ACTORS_ENV] = str(min(32, os.cpu_count() or 1))
    env = {k: os.environ.get(k, v) for k, v in quiet.items()}
    env.update(heap_env())  # malloc keeps freed memory for the next batch (ssl_platform.heap), or the user's MALLOC_*
    env.update({k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)})
    return env


def init_ray(address: str | None = None, dashboard: bool = True, console: Console | None = None) -> str | None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local cluster. Returns the dashboard URL.

    With ``console``, what Ray's processes print and the driver's Ray loggers go through it: the
    platform's lines are shown, the rest is kept in its log file (``train.console``)."""
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    env = job_env(local=not address)
    if FOOTER_ACTORS_ENV in env:  # the listing may run in this process too
        os.environ[FOOTER_ACTORS_ENV] = env[FOOTER_ACTORS_ENV]
    if console is not None:  # the workers mark the lines the console shows
        env[CONSOLE_ENV] = "1"
        console.install()  # before ray.init: its own lines go to the log file too
    runtime_env = {"env_vars": env}
    if address:
        ctx = ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # address="local": start our own cluster even when another one runs on this machine
        # (plain ray.init() would silently join it); joining is what --address is for.
        ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                       runtime_env=runtime_env)
    if console is not None:
        console.take_worker_output()
    current_data_context()  # this driver's DataContext, made without Ray's own deprecation notices (data.context)
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def spilled_bytes() -> int | None:
    """Bytes the cluster's object stores have spilled to disk since they started (every job's), or
    None when the raylet does not say (the figure comes from Ray's memory-info call, the one Ray
    Data's own stats use)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address),
                                      timeout_seconds=10.0)
        return int(reply.store_stats.spilled_bytes_total)
    except Exception:  # a private API: a missing figure must never fail a run
        return None
