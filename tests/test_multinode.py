"""`sslp run --address` on a multi-node cluster: two raylets on this machine (``ray.cluster_utils.Cluster``).

The claim: spreading the workers over nodes changes nothing in the math. Negatives are gathered
across the nodes, and the first-step loss equals that of the same global batch with both
workers on one node.

Why the comparison is sound:

- Same weights: every run seeds the model with ``train.seed`` and DDP broadcasts rank 0's.
- Same views: ``data.seed`` fixes each record's augmentation (a function of seed, epoch and
  record key) and the block order.
- Same rows on each rank: with ``data.seed`` Ray Data preserves order, so Ray Train's
  ``streaming_split`` hands rank r the same rows in every run. That matters because BatchNorm
  normalises over each rank's own rows: a different row-to-rank split changes the loss.
- Same first batch: the global batch (1436) is the whole training split (1437 records, one
  dropped to split evenly), so each rank's first batch is all of its 718 rows whatever order its
  local shuffle buffer yields them in; BatchNorm statistics and the loss (a mean over anchors,
  each against every gathered candidate) do not depend on that order.

With gathering switched off each anchor sees only its own rank's candidates (1435 instead of
2871), which lowers the loss at initialisation by about log 2: that run shows the equal losses
come from negatives that crossed the node boundary.

The same cluster then checks that a busy cluster (resources that exist but another job holds)
is refused after ``scaling.wait_for_resources_s`` with a message, instead of waiting forever.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from conftest import show
from ray.cluster_utils import Cluster
from test_run_e2e import TINY

from ssl_platform import cli

pytestmark = pytest.mark.ray

MB = 2**20
GLOBAL_BATCH = 1436  # the digits training split has 1437 records
SEEDED = ("run", "simclr-digits", "--no-dashboard", *TINY, "eval.enabled=false", f"train.batch_size={GLOBAL_BATCH}",
          "data.seed=0", "train.max_steps=1", "train.log_every=1", "train.checkpoint_every=1")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300 * MB})
    c.add_node(num_cpus=2, object_store_memory=300 * MB)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def sslp(cluster: Cluster, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, a job of its own on the two-node cluster."""
    return subprocess.run([sys.executable, "-m", "ssl_platform.cli", *args, "--address", cluster.address], cwd=cwd,
                          env=os.environ, capture_output=True, text=True, timeout=300)


def first_step(cluster: Cluster, root: Path, name: str, *overrides: str) -> tuple[int, float]:
    """Run one step; return (nodes the workers ran on, mean loss over workers at step 1)."""
    done = sslp(cluster, *SEEDED, f"name={name}", f"runs_dir={root}", *overrides, cwd=root)
    assert done.returncode == 0, show(done)
    assert json.loads((root / name / "summary.json").read_text())["steps"] == 1  # the run finished
    nodes = int(re.search(r"2 workers on (\d) node\(s\)", done.stdout).group(1))
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return nodes, next(r["loss"] for r in rows if r["step"] == 1)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    return {
        "spread": first_step(cluster, root, "spread", "scaling.placement_strategy=SPREAD"),
        "one_node": first_step(cluster, root, "one-node", "scaling.placement_strategy=STRICT_PACK"),
        "local_negatives": first_step(cluster, root, "local-negatives", "scaling.placement_strategy=SPREAD",
                                      "method.gather_distributed=false"),
    }


def test_spread_workers_land_on_different_nodes(runs):
    assert runs["spread"][0] == 2
    assert runs["one_node"][0] == 1


def test_first_step_loss_across_nodes_equals_one_node(runs):
    assert runs["spread"][1] == pytest.approx(runs["one_node"][1], rel=1e-5)


def test_negatives_are_gathered_across_nodes(runs):
    # Twice the candidates per anchor: about log 2 higher at initialisation.
    assert runs["spread"][1] - runs["local_negatives"][1] > 0.3


def test_a_busy_cluster_is_refused_after_the_wait_with_the_fix(cluster, tmp_path):
    ray.init(address=cluster.address)
    try:
        @ray.remote(num_cpus=2)
        class Holder:
            def ready(self) -> bool:
                return True

        holders = [Holder.remote() for _ in range(2)]  # every CPU of both nodes, held by this job
        ray.get([h.ready.remote() for h in holders])
        done = sslp(cluster, *SEEDED, "name=busy", f"runs_dir={tmp_path}", "scaling.wait_for_resources_s=3",
                    cwd=tmp_path)
    finally:
        ray.shutdown()
    assert done.returncode == 2, show(done)
    assert "waiting up to 3 s for resources held by other jobs (CPU 3 needed, 0 free)" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sslp: resources: other jobs hold the resources this run needs"), show(done)
    assert "raise that timeout, or lower scaling.num_workers" in last


def test_an_infeasible_layout_is_refused_before_anything_is_scheduled(cluster, tmp_path, capsys):
    # In-process: the refusal needs no job of its own, and this process leaves the cluster after.
    assert cli.main([*SEEDED, "name=too-big", f"runs_dir={tmp_path}", "scaling.num_workers=1",
                     "scaling.cpus_per_worker=3", "--address", cluster.address]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sslp: resources: scaling.cpus_per_worker=3 does not fit on any node (largest has 2 CPUs)")
    import ray

    assert not ray.is_initialized()
