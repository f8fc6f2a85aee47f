"""The streaming executor's scheduling loop sleeps after an iteration that got nowhere
(``ssl_platform.data.context.paced``): Ray 2.60's loop spins there, and each train worker runs one."""

from __future__ import annotations

from types import SimpleNamespace

from ssl_platform.data import context


class _Queue:
    def __init__(self):
        self.blocks = 0

    def total_enqueued_output_blocks(self) -> int:
        return self.blocks


class _Operator:  # hashable, as the topology's keys are
    def __init__(self):
        self.metrics = SimpleNamespace(num_tasks_submitted=0, num_tasks_finished=0, num_task_outputs_generated=0,
                                       num_outputs_taken=0)


def _executor(wait: float):
    config = {context.IDLE_WAIT_KEY: wait} if wait else {}
    return SimpleNamespace(_data_context=SimpleNamespace(get_config=lambda key, default=None: config.get(key, default)))


def test_the_loop_sleeps_only_after_an_iteration_without_progress(monkeypatch):
    sleeps = []
    monkeypatch.setattr(context.time, "sleep", sleeps.append)
    op = _Operator()
    queue = _Queue()
    topology = {op: queue}
    moves = iter([lambda: None, lambda: setattr(op.metrics, "num_outputs_taken", 1),
                  lambda: setattr(queue, "blocks", 2), lambda: None])

    def step(executor, topology):
        next(moves)()
        return True

    paced = context.paced(step)
    assert [paced(_executor(0.01), topology) for _ in range(4)] == [True] * 4
    assert sleeps == [0.01, 0.01]  # the two iterations that changed nothing
    sleeps.clear()
    assert context.paced(lambda executor, topology: True)(_executor(0), topology)  # Ray's own loop: no key
    assert sleeps == []


def test_the_platform_context_sets_the_wait_and_installs_the_pacing():
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    context.configure_data_context()
    assert context.current_data_context().get_config(context.IDLE_WAIT_KEY) == context.IDLE_WAIT_S
    assert StreamingExecutor._sslp_waits_when_idle
