"""Elastic runs, ``scaling.num_workers=[MIN, MAX]`` (issue 18): Ray Train V2's elastic scaling with
the worker counts kept to those that split the global batch.

What Ray Train 2.60 does with ``ScalingConfig(num_workers=(min, max))`` (its
``ElasticScalingPolicy``, read in ``ray/train/v2/_internal/execution/scaling_policy/elastic.py``):

- Before the first attempt and after every failure it counts the workers the cluster holds (the
  resources its autoscaling coordinator reserves for the run, from the nodes' *total* resources),
  caps the count at max and starts the worker group with it; below min it waits, asking again in
  a loop (no deadline).
- While the group runs it counts again every ``elastic_resize_monitor_interval_s``
  (``scaling.resize_check_s``) and, when the count changed, shuts the group down and starts one of
  the new size: it grows when nodes are added, and the new group resumes from the newest
  checkpoint like any restart.
- A node that leaves kills its workers: the group fails and restarts (a worker failure, counted
  against ``--max-failures``; a node drained for preemption is Ray's ``max_preemption_failures``,
  unlimited by default), on what the cluster holds then.

:class:`BatchSplittingScaling` changes three things, so that an elastic run is the uninterrupted
run whatever N it lands on:

- the count is one of ``config.worker_counts`` (N divides the global batch: every worker takes
  G/N and the step does not depend on N), rounded down to the largest that fits; and it leaves
  ``scaling.data_cpus`` for Ray Data, counted on the alive nodes (``ray.nodes()``), so a node's
  loss is seen at once, not at the coordinator's next refresh (every 20 s);
- a bigger group takes over right after a checkpoint every rank has reported (no step repeated),
  not at whatever step the check falls on;
- below the minimum it waits at most ``scaling.wait_for_resources_s``, then fails the run with one
  line (Ray would wait forever, spinning the controller's loop).

:class:`ElasticTorchTrainer` hands the policy to Ray Train's controller: the trainer builds its
policy from the ScalingConfig alone (``create_scaling_policy``), and nothing public takes another.
"""

from __future__ import annotations

import time

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision

from ssl_platform.train.resources import alive_nodes, workers_that_fit

NO_ROOM_POLL_S = 0.5  # while below the minimum: Ray's controller asks again at once, in a loop


class ElasticRangeError(RuntimeError):
    """The cluster held fewer workers than the elastic range's minimum for longer than the wait."""


def usable_count(room: int, sizes: tuple[int, ...]) -> int:
    """The largest of ``sizes`` (ascending worker counts) that is at most ``room``; 0 when none is."""
    return max((n for n in sizes if n <= room), default=0)


class BatchSplittingScaling(ElasticScalingPolicy):
    """Ray Train's elastic policy, on worker counts that split the global batch (see the module doc).

    Args:
        sizes: the run's worker counts, ascending (``config.worker_counts``).
        cpus_per_worker, use_gpu, data_cpus: one worker's resources and the CPUs Ray Data keeps.
        wait_s: how long a cluster below the minimum is waited for.
        max_steps: the run's last step (its checkpoint ends the run: no resize then).
    """

    def __init__(self, scaling_config, *, sizes: tuple[int, ...], cpus_per_worker: float, use_gpu: bool,
                 data_cpus: float, wait_s: float, max_steps: int, nodes=alive_nodes):
        super().__init__(scaling_config)
        self.sizes, self.wait_s, self.max_steps = tuple(sizes), wait_s, max_steps
        self._worker = (cpus_per_worker, use_gpu, data_cpus)
        self._nodes = nodes
        self._short_since: float | None = None  # when the cluster fell below the minimum
        self._new_group()

    def _new_group(self) -> None:
        """Forget what the previous worker group reported."""
        self._grow: ResizeDecision | None = None  # a bigger group, waiting for the next checkpoint
        self._reported: dict[int, int] = {}  # rank -> the newest step it reported
        self._ranks = 0
        self._checkpointed = -1  # the newest step rank 0 reported a checkpoint of

    def room(self) -> int:
        """Workers the alive nodes hold beside Ray Data's CPUs, at most the range's maximum."""
        cpus, gpu, data = self._worker
        return workers_that_fit(self._nodes(), cpus, gpu, data, self.sizes[-1])

    def _count_possible_workers(self, reserved_resources) -> int:
        return usable_count(min(super()._count_possible_workers(reserved_resources), self.room()), self.sizes)

    def make_decision_for_non_running_worker_group(self):
        decision = super().make_decision_for_non_running_worker_group()
        if isinstance(decision, ResizeDecision):
            self._short_since = None
            self._new_group()
            return decision
        now = time.monotonic()
        self._short_since = self._short_since if self._short_since is not None else now
        if now - self._short_since > self.wait_s:
            raise ElasticRangeError(
                f"the cluster holds {usable_count(self.room(), self.sizes) or 'none'} of the elastic range's "
                f"{self.sizes[0]}-{self.sizes[-1]} workers and did not hold {self.sizes[0]} within "
                f"scaling.wait_for_resources_s={self.wait_s:g} s; add nodes, or lower the minimum of "
                f"scaling.num_workers")
        time.sleep(NO_ROOM_POLL_S)
        return decision

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        self._note_reports(worker_group_status)
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        if isinstance(decision, ResizeDecision) and decision.num_workers > worker_group_state.num_workers:
            self._grow, decision = decision, NoopDecision()  # at the next checkpoint, repeating no step
        if self._grow is not None and self._checkpoint_committed():
            grow, self._grow = self._grow, None
            if usable_count(self.room(), self.sizes) >= grow.num_workers:  # the room is still there
                decision = grow
        if isinstance(decision, ResizeDecision):
            self._new_group()
        return decision

    def _note_reports(self, status) -> None:
        for rank, worker in status.worker_statuses.items():
            report = worker.training_report
            if report is not None and "step" in report.metrics:
                self._reported[rank] = int(report.metrics["step"])
                if rank == 0 and report.checkpoint is not None:
                    self._checkpointed = self._reported[rank]
        self._ranks = len(status.worker_statuses)

    def _checkpoint_committed(self) -> bool:
        """Every rank has reported the newest checkpoint's step (Ray registers a checkpoint when all
        ranks reported it), and it is not the run's last."""
        return (0 <= self._checkpointed < self.max_steps and len(self._reported) == self._ranks
                and all(step >= self._checkpointed for step in self._reported.values()))


class ElasticTorchTrainer(TorchTrainer):
    """A TorchTrainer whose controller runs :class:`BatchSplittingScaling` (keyword ``policy``: its
    arguments but the ScalingConfig)."""

    def __init__(self, *args, policy: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self._policy = policy

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = BatchSplittingScaling(self.scaling_config, **self._policy)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
