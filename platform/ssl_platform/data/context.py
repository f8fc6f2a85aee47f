"""The platform's settings of Ray Data's execution, in every process that builds a Dataset: the
driver (evaluation, embed, `sslp data inspect`) and each train worker (its ordered stream)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import ray.data
from ray.data._internal.execution.streaming_executor import StreamingExecutor

# Ray 2.60's DataContext assigns its own deprecated fields (``use_push_based_shuffle``,
# ``use_polars``, ``use_arrow_tensor_v2``) in its dataclass ``__init__``, through a ``__setattr__``
# that warns on every assignment of them: the first ``DataContext.get_current()`` of a process
# warns three times whatever the caller does (we set none of them). Only those three are hidden.
_RAY_OWN_DEPRECATIONS = r"`(use_push_based_shuffle|use_polars|use_arrow_tensor_v2)` is deprecated"


# Ray Data logs a WARNING the first time a process runs a Dataset with the bars off, telling how to
# turn them on: noise on the user's console where the platform turned them off on purpose.
_BARS_OFF_HINTS = ("Progress bars disabled", "Progress bars for operators disabled")


def _not_a_bars_off_hint(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BARS_OFF_HINTS)


# DataContext config key: seconds the executor's scheduling loop sleeps in an iteration that starts
# with none of its tasks running (see :func:`_wait_when_idle`); unset or 0: Ray Data's own loop.
IDLE_WAIT_KEY = "sslp_idle_wait_s"
IDLE_WAIT_S = 0.01


def current_data_context() -> ray.data.DataContext:
    """``DataContext.get_current()``, without the deprecation notices Ray's own constructor gives."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RAY_OWN_DEPRECATIONS, category=DeprecationWarning)
        return ray.data.DataContext.get_current()


def configure_data_context(progress_bars: bool = False, per_operator: bool = False) -> None:
    """The platform's settings of Ray Data's execution, for every Dataset this process builds
    afterwards (a Dataset keeps a copy of the context it was built under).

    - Progress bars only where asked: during training Ray Data's bars would drown the training
      progress line; evaluation (one bar per pass) and embed (``per_operator``: a bar for each of
      read, decode, embed, write) show them on a terminal (``train.console.live()``); in a pipe
      Ray Data would log its progress instead. Ray's hint that the bars are off is not logged.
    - No per-operator resource reservation (``op_resource_reservation_enabled``): in Ray 2.60 it
      held a decode + augment ``map_batches`` on a 2-core machine to one task at a time for 80%
      of a pass (the operator's CPU budget kept falling to zero while a task ran), 43% of what
      the two cores do. Without it the operator runs one task per free CPU (`sslp bench data`
      prints both side by side); memory stays bounded by the downstream-capacity backpressure,
      which stays on.
    - An idle scheduling loop sleeps (:data:`IDLE_WAIT_KEY`, :func:`_wait_when_idle`).
    """
    ctx = current_data_context()
    ctx.enable_progress_bars = progress_bars
    ctx.enable_operator_progress_bars = progress_bars and per_operator
    ctx.print_on_execution_start = False
    ctx.op_resource_reservation_enabled = False
    ctx.set_config(IDLE_WAIT_KEY, IDLE_WAIT_S)
    progress_log = logging.getLogger("ray.data._internal.progress")
    if _not_a_bars_off_hint not in progress_log.filters:
        progress_log.addFilter(_not_a_bars_off_hint)
    _wait_when_idle()


def _progress(topology) -> tuple:
    """What changes when the executor gets anywhere: tasks submitted, finished, their outputs
    read, outputs taken downstream or by the consumer, and the blocks waiting in each queue."""
    return tuple((m.num_tasks_submitted, m.num_tasks_finished, m.num_task_outputs_generated, m.num_outputs_taken,
                  state.total_enqueued_output_blocks()) for m, state in ((op.metrics, state)
                                                                         for op, state in topology.items()))


def _wait_when_idle() -> None:
    """Make the streaming executor's scheduling loop sleep ``IDLE_WAIT_KEY`` seconds (a config of
    the Dataset's context) after an iteration that got nowhere (:func:`_progress` unchanged).

    Ray 2.60's loop blocks in ``ray.wait`` (up to 0.1 s) only until some task has output ready;
    when that output may not be read yet (the output queue is full until the consumer takes a
    batch) or no task runs, the loop spins without pause. Each train worker runs its own
    executor for its ordered stream, so on 2 cores a spinning executor thread took 0.4-0.7 of a
    core from the training thread beside it (per-thread CPU from /proc and ``py-spy dump``,
    ``sslp run simclr-digits``). Nothing changes until the consumer takes a batch, a task
    finishes or a CPU frees up: 10 ms is a small delay for the next read or task, while the
    worker's prefetched batches keep the training fed. Installed once per process; a context
    without the key (``sslp bench data``'s Ray-defaults reference) keeps Ray's own loop.
    """
    if not getattr(StreamingExecutor, "_sslp_waits_when_idle", False):
        StreamingExecutor._scheduling_loop_step = paced(StreamingExecutor._scheduling_loop_step)
        StreamingExecutor._sslp_waits_when_idle = True


def paced(step: Callable) -> Callable:
    """``StreamingExecutor._scheduling_loop_step`` that sleeps after an iteration that got nowhere."""

    def scheduling_loop_step(self, topology) -> bool:
        wait = self._data_context.get_config(IDLE_WAIT_KEY, 0)
        before = _progress(topology) if wait else None
        go_on = step(self, topology)
        if wait and go_on and _progress(topology) == before:
            time.sleep(wait)
        return go_on

    return scheduling_loop_step
