"""Elastic runs (``scaling.num_workers=[MIN, MAX]``, issue 18) on a two-node ``ray.cluster_utils.Cluster``.

The claim: a run that loses a node goes on with fewer workers, grows again when the node comes
back, and logs at every step the loss of a run that was never interrupted.

The run: SimCLR on a folder of 400 PNGs and one corrupt file (a file corpus: each worker reads its
ids of the epoch's order, issue 18), global batch 64, a range of [1, 2] workers of 1 CPU each, SPREAD (one
worker per node), Ray Data keeping 1 CPU: the two 2-CPU nodes hold 2 workers, one node holds 1.
Every step sleeps 0.5 s (``SSLP_STEP_DELAY_S``) so that the test can act mid-run. It removes the
second node after the checkpoint of step 4: the worker there dies, and the run (``--max-failures
1``) restarts from that checkpoint on the one worker the head holds. Then the node is added back:
at the next check (``scaling.resize_check_s=1``) the run has room for 2 workers again and moves to
them at its next checkpoint.

Why the losses must equal: the global batch is the same 64 records whatever N (each worker takes
64/N of it, ``data.order``), the views are a function of (seed, epoch, record), BatchNorm is
global and the negatives gathered, so a step does not depend on N (``test_worker_count_invariance``);
and a restart resumes at the checkpoint's position in the epoch (``test_resume_exact``). The
reference is the same run in local mode (one rank, no worker processes: the cheapest run that
never loses anything). Both run in float64 (``train.precision=fp64``): 1 and 2 ranks differ in
summation order only, and in float32 training amplifies those rounding differences ~1.5-2.5x a
step (this run drifted 1.1-1.9e-4 from one rank after ~20 steps, an uninterrupted 2-worker run on
digit PNGs 1.7e-3: README Resume), too much to tell a wrong record or view from rounding. In
float64 they stay near 1e-15, so every loss must equal the reference's to 1e-9.

The same run is the end-to-end test of an exact resume in the middle of an epoch with 2 workers
on a file corpus (the corrupt file skipped, counted, and its slot filled alike in every attempt),
and the multi-node claim: spreading the workers over nodes changes nothing in the
math. Its first attempt has one worker on each node (SPREAD), and its losses equal those of one
process holding the whole global batch only because the negatives are gathered across the nodes
(each worker's own 32 candidates instead of 64 would lower the loss by about log 2) and BatchNorm
is global.

The same cluster then checks that a busy cluster (resources that exist but another job holds)
is refused after ``scaling.wait_for_resources_s`` with a message, instead of waiting forever, and
that a layout no node can hold is refused before anything is scheduled.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from conftest import leave_shared_driver, show
from PIL import Image
from ray.cluster_utils import Cluster
from test_run_e2e import TINY

from ssl_platform import cli
from ssl_platform.train.elastic import BatchSplittingScaling, ElasticRangeError
from ssl_platform.train.loop import STEP_DELAY_ENV
from ssl_platform.train.resources import workers_that_fit

pytestmark = pytest.mark.ray

MB = 2**20
STEPS = 24
RUN = ("run", "simclr-digits", "--no-dashboard", *TINY, "eval.enabled=false", "eval.online_every=0",
       "train.log_every=1", "train.checkpoint_every=4", f"train.max_steps={STEPS}", "train.precision=fp64")
ELASTIC = ("scaling.num_workers=[1,2]", "scaling.cpus_per_worker=1", "scaling.placement_strategy=SPREAD",
           "scaling.resize_check_s=1")


def node_args() -> dict:
    return {"num_cpus": 2, "object_store_memory": 150 * MB}


@pytest.fixture(scope="module")
def cluster():
    leave_shared_driver()  # this module's in-process commands join this cluster, not the session's head
    c = Cluster(initialize_head=True, head_node_args=node_args())
    c.add_node(**node_args())
    c.wait_for_nodes()
    yield c
    c.shutdown()


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step logged once
    return {r["step"]: r["loss"] for r in rows}


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"waiting for {what}: the run {'ended' if proc.poll() is not None else 'took too long'}:\n"
                        f"{log.read_text()[-4000:]}")
        time.sleep(0.2)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(r)["step"] for r in rows if r.strip()), default=0)


def image_folder(folder: Path) -> Path:
    """400 random 16 px PNGs and one file that does not decode: a file corpus (read by id on the
    workers, issue 18) of 6 global batches per epoch, so the checkpoints of steps 4 and 8 are
    in the middle of an epoch."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """(reference losses, the elastic run's losses, its output, its summary.json)."""
    root = tmp_path_factory.mktemp("elastic")
    address = ("--address", cluster.address)
    corpus = image_folder(root / "images")
    # In-process: local mode needs no job of its own (this process leaves the cluster after).
    assert cli.main([*RUN, f"data.path={corpus}", "name=ref", f"runs_dir={root}", "scaling.num_workers=0",
                     *address]) == 0

    run_dir, log = root / "elastic", root / "elastic.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ssl_platform.cli", *RUN, *ELASTIC, f"data.path={corpus}",
                                 "name=elastic",
                                 f"runs_dir={root}", "--max-failures", "1", *address], cwd=root,
                                env={**os.environ, STEP_DELAY_ENV: "0.5", "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for("step 5 on 2 workers", lambda: last_step(run_dir) >= 5, proc, log)
            assert "2 workers on 2 node(s)" in log.read_text()  # SPREAD: one worker per node
            cluster.remove_node(cluster.list_all_nodes()[1])  # its worker dies (rank 0 or 1)
            wait_for("the restart on 1 worker", lambda: "1 workers on 1 node(s)" in log.read_text(), proc, log)
            cluster.add_node(**node_args())
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    return losses(root / "ref"), losses(run_dir), output, json.loads((run_dir / "summary.json").read_text())


def test_a_node_lost_mid_run_and_added_back_the_run_shrinks_grows_and_finishes(runs):
    _, _, output, summary = runs
    assert summary["steps"] == STEPS
    assert summary["workers"] == [2, 1, 2], output[-3000:]  # one count per attempt
    lost, grew = summary["restarts"]
    assert re.fullmatch(r"worker rank [01] died .* after step \d+; restarted from the checkpoint of step 4 on 1 worker"
                        r".*", lost), lost
    assert re.fullmatch(r"the cluster had room for 2 workers after step (\d+); restarted from the checkpoint of "
                        r"step \1 on 2 workers", grew), grew  # at a checkpoint: no step repeated
    assert "workers     2 -> 1 -> 2 (one count per attempt; elastic scaling.num_workers=[1, 2])" in output
    assert re.search(r"resumed from step 4, epoch 0 record 256: \d+ steps? repeated", output), output[-3000:]
    assert re.search(r"skipped \d+ records: corrupt image", output), output[-3000:]


def test_the_losses_after_each_resize_are_the_uninterrupted_runs(runs):
    reference, elastic, _, _ = runs
    assert elastic == pytest.approx(reference, rel=1e-9, abs=0)


# ----------------------------------------------------------------------------- refusals, in-process

def test_a_range_the_cluster_can_never_hold_is_refused_at_once_naming_the_key(cluster, tmp_path, capsys):
    # 3 workers of 1.2 CPUs + 0.2 for Ray Data is 3.8 of the 4 CPUs, but each 2-CPU node holds one of them.
    assert cli.main([*RUN, "name=too-big", f"runs_dir={tmp_path}", "train.batch_size=48", "scaling.num_workers=[3,4]",
                     "scaling.cpus_per_worker=1.2", "scaling.data_cpus=0.2", "--address", cluster.address]
                    ) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sslp: resources: scaling.num_workers=[3, 4] needs at least 3 workers of 1.2 CPUs, but the nodes hold 2 of "
        "them (with scaling.data_cpus=0.2 left for Ray Data); lower the range's minimum or scaling.cpus_per_worker")


def test_a_busy_cluster_is_refused_after_the_wait_with_the_fix(cluster, tmp_path):
    ray.init(address=cluster.address)
    try:
        @ray.remote(num_cpus=2)
        class Holder:
            def ready(self) -> bool:
                return True

        holders = [Holder.remote() for _ in range(2)]  # every CPU of both nodes, held by this job
        ray.get([h.ready.remote() for h in holders])
        done = subprocess.run([sys.executable, "-m", "ssl_platform.cli", *RUN, "name=busy", f"runs_dir={tmp_path}",
                               "scaling.wait_for_resources_s=3", "--address", cluster.address], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    finally:
        ray.shutdown()
    assert done.returncode == 2, show(done)
    assert "waiting up to 3 s for resources held by other jobs (CPU 3 needed, 0 free)" in done.stdout, show(done)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sslp: resources: other jobs hold the resources this run needs"), show(done)
    assert "raise that timeout, or lower scaling.num_workers" in last


def test_an_infeasible_layout_is_refused_before_anything_is_scheduled(cluster, tmp_path, capsys):
    # In-process: the refusal needs no job of its own, and this process leaves the cluster after.
    assert cli.main([*RUN, "name=too-big", f"runs_dir={tmp_path}", "scaling.num_workers=1",
                     "scaling.cpus_per_worker=3", "--address", cluster.address]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sslp: resources: scaling.cpus_per_worker=3 does not fit on any node (largest has 2 CPUs)")
    assert not ray.is_initialized()


# ----------------------------------------------------------------------------- the count, without Ray

def test_the_count_is_the_largest_that_splits_the_batch_and_leaves_ray_data_its_cpus():
    from ray.train import ScalingConfig

    nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    policy = BatchSplittingScaling(ScalingConfig(num_workers=(1, 8), resources_per_worker={"CPU": 1.0}),
                                   sizes=(1, 2, 4, 8), cpus_per_worker=1.0, use_gpu=False, data_cpus=1.0,
                                   wait_s=1.0, max_steps=10, nodes=lambda: nodes)
    reserved = {"a": {"CPU": 4.0}, "b": {"CPU": 4.0}}  # what Ray's coordinator reserves: 8 workers of 1 CPU
    assert policy.room() == 7  # 8 CPUs, 1 kept for Ray Data
    assert policy._count_possible_workers(reserved) == 4  # 7 fit, and 4 is the largest count <= 7 that splits the batch
    nodes.pop()  # a node leaves: seen at once, whatever Ray's coordinator still reserves
    assert policy._count_possible_workers(reserved) == 2  # 3 fit beside Ray Data; 3 does not divide the batch
    assert workers_that_fit([{"CPU": 2.0}, {"CPU": 2.0}], 1.5, False, 0.5, 8) == 2  # node by node, not the sum
    assert workers_that_fit([{"CPU": 8.0, "GPU": 1.0}], 1.0, True, 1.0, 8) == 1  # one GPU each


def policy_on(nodes: list[dict], sizes=(1, 2), wait_s: float = 60.0, cpus: float = 1.0) -> BatchSplittingScaling:
    """The policy with Ray's coordinator answered by ``nodes`` themselves (no Ray: the count, the
    wait and the growth are the policy's own decisions)."""
    from ray.train import ScalingConfig

    policy = BatchSplittingScaling(ScalingConfig(num_workers=(sizes[0], sizes[-1]), resources_per_worker={"CPU": cpus},
                                                 elastic_resize_monitor_interval_s=0),
                                   sizes=sizes, cpus_per_worker=cpus, use_gpu=False, data_cpus=1.0, wait_s=wait_s,
                                   max_steps=24, nodes=lambda: nodes)
    policy._maybe_send_resource_request = lambda: None
    policy._get_reserved_resources = lambda: {str(i): dict(n) for i, n in enumerate(nodes)}
    return policy


def reports(*steps_and_checkpoint):
    """A poll of the worker group: rank r reported (step, with a checkpoint?) or nothing."""
    return SimpleNamespace(worker_statuses={
        rank: SimpleNamespace(training_report=None if r is None else SimpleNamespace(
            metrics={"step": r[0]}, checkpoint=object() if r[1] else None))
        for rank, r in enumerate(steps_and_checkpoint)})


def test_a_bigger_group_waits_for_a_checkpoint_every_rank_reported():
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    nodes = [{"CPU": 2.0}]
    policy = policy_on(nodes)
    running = SimpleNamespace(num_workers=1, start_time=0.0)
    assert policy.make_decision_for_non_running_worker_group().num_workers == 1  # 2 CPUs: 1 worker + Ray Data
    nodes.append({"CPU": 2.0})  # room for 2 now
    assert isinstance(policy.make_decision_for_running_worker_group(running, reports((5, False))), NoopDecision)
    decision = policy.make_decision_for_running_worker_group(running, reports((8, True)))
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2  # at the checkpoint of step 8
    # With 2 ranks, not before the second has reported that step too (Ray registers it then).
    policy = policy_on([{"CPU": 2.0}, {"CPU": 2.0}], sizes=(1, 2, 4), cpus=0.5)  # room for 4 (6 beside Ray Data)
    two = SimpleNamespace(num_workers=2, start_time=0.0)
    assert isinstance(policy.make_decision_for_running_worker_group(two, reports((8, True), None)), NoopDecision)
    assert policy.make_decision_for_running_worker_group(two, reports(None, (8, False))).num_workers == 4
    # The last checkpoint ends the run: no resize then.
    last = policy_on([{"CPU": 4.0}])
    assert isinstance(last.make_decision_for_running_worker_group(running, reports((24, True))), NoopDecision)


def test_a_cluster_below_the_minimum_is_waited_for_then_refused_in_one_line():
    policy = policy_on([{"CPU": 2.0}], sizes=(2,), wait_s=0.0)  # 2 CPUs hold 1 worker beside Ray Data
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision

    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)  # waits (0.5 s)
    with pytest.raises(ElasticRangeError) as e:
        policy.make_decision_for_non_running_worker_group()
    assert str(e.value) == ("the cluster holds none of the elastic range's 2-2 workers and did not hold 2 within "
                            "scaling.wait_for_resources_s=0 s; add nodes, or lower the minimum of scaling.num_workers")
