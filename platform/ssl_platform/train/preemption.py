"""SIGTERM checkpoints the current step, then stops the run (issue 18).

A spot node's notice, `ray job stop` and a Kubernetes eviction all send SIGTERM to the job's
driver, the ``sslp`` process. Its handler (:func:`sigterm_checkpoints`) raises a flag, a named
actor, and returns; the train workers look at the flag after every step without waiting for it
(:class:`StopPoller`), agree on it (one all-reduce of one number, so every rank stops at the same
step), checkpoint that step and return. ``fit()`` then ends with :class:`Preempted`, and the same
command resumes from the step the signal interrupted: nothing is trained twice.

Only the driver needs the signal. SIGKILL, or a SIGTERM sent to the train workers themselves,
still loses the steps since the newest checkpoint (``train.checkpoint_every``). `ray job stop`
kills the driver ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s by default) after its SIGTERM: raise it to
more than a step and a checkpoint take.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from ssl_platform.data.skips import NAMESPACE, on_this_node
from ssl_platform.train import console


@ray.remote(num_cpus=0)
class StopFlag:
    """Raised once by the driver's SIGTERM handler, read by every train worker."""

    def __init__(self):
        self.raised = False

    def raise_flag(self) -> None:
        self.raised = True

    def is_raised(self) -> bool:
        return self.raised


def stop_flag_name(run: str) -> str:
    return f"sslp-stop-{run}"


def stop_flag(run: str) -> ray.actor.ActorHandle:
    return StopFlag.options(name=stop_flag_name(run), namespace=NAMESPACE, get_if_exists=True,
                            scheduling_strategy=on_this_node()).remote()


class StopPoller:
    """A worker's view of the flag: one question in flight, looked at (not waited for) after each step."""

    def __init__(self, name: str | None):
        self.flag = ray.get_actor(name, namespace=NAMESPACE) if name else None
        self.pending = None

    def raised(self) -> bool:
        if self.flag is None:
            return False
        if self.pending is None:
            self.pending = self.flag.is_raised.remote()
        ready, _ = ray.wait([self.pending], timeout=0)
        if not ready:
            return False
        answer, self.pending = ray.get(self.pending), None
        return answer


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after checkpointing its current step; the message says where."""


@contextmanager
def sigterm_checkpoints(flag: ray.actor.ActorHandle) -> Iterator[list[int]]:
    """While inside, SIGTERM raises ``flag`` instead of ending the process; yields the list of
    signals received (empty: none). Only the main thread can take signals; elsewhere nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if not received:
            console.say("SIGTERM: checkpointing the current step, then stopping")
        received.append(signum)
        flag.raise_flag.remote()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
