"""Train-worker sizing: the data pipeline always keeps CPUs, infeasible requests fail fast, resources
held by other jobs are waited for with a timeout; where a run lives."""

import pytest

from ssl_platform.config import load_config
from ssl_platform.train.resources import cluster_nodes, plan_workers, wait_for_free_resources
from ssl_platform.train.session import ResourceError, StorageError
from ssl_platform.train.storage import completed_run, run_paths


def test_two_workers_on_two_cores_get_half_a_cpu_each():
    plan = plan_workers(load_config("simclr-digits"), [{"CPU": 2.0}])
    assert plan.cpus_per_worker == 0.5 and plan.resources() == {"CPU": 0.5}


def test_big_cluster_gives_one_cpu_per_worker_and_gpus_when_asked():
    cfg = load_config("simclr-digits", ["scaling.num_workers=4", "scaling.use_gpu=true"])
    plan = plan_workers(cfg, [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}])
    assert plan.resources() == {"CPU": 1.0, "GPU": 1}


@pytest.mark.parametrize("overrides, nodes, expected", [
    (["scaling.use_gpu=true"], [{"CPU": 2.0}], "has 0; set scaling.use_gpu=false"),
    (["scaling.use_gpu=true", "scaling.num_workers=4"], [{"CPU": 8.0, "GPU": 2.0}],
     "set scaling.num_workers=2 or scaling.use_gpu=false"),
    (["scaling.cpus_per_worker=1"], [{"CPU": 2.0}], "lower scaling.cpus_per_worker"),
    (["scaling.num_workers=4", "train.batch_size=256", "scaling.data_cpus=2"], [{"CPU": 2.0}],
     "lower scaling.num_workers"),
    (["scaling.cpus_per_worker=3", "scaling.num_workers=1"], [{"CPU": 2.0}, {"CPU": 2.0}], "does not fit on any node"),
])
def test_infeasible_requests_say_what_to_change(overrides, nodes, expected):
    with pytest.raises(ResourceError, match=expected.replace("(", r"\(")):
        plan_workers(load_config("simclr-digits", overrides), nodes)


class FakeCluster:
    """Free resources that other jobs release after ``busy_for`` seconds of a fake clock."""

    def __init__(self, busy_for: float):
        self.now, self.busy_for = 0.0, busy_for

    def free(self) -> dict[str, float]:
        return {"CPU": 0.0 if self.now < self.busy_for else 4.0}

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def wait(cluster: FakeCluster, timeout_s: float) -> None:
    plan = plan_workers(load_config("simclr-digits"), [{"CPU": 4.0}])  # 2 workers x 1 CPU + 1 for data
    wait_for_free_resources(plan, 1.0, timeout_s, free=cluster.free, sleep=cluster.sleep, clock=lambda: cluster.now)


def test_resources_held_by_other_jobs_are_waited_for(capsys):
    cluster = FakeCluster(busy_for=10)
    wait(cluster, timeout_s=60)
    assert 10 <= cluster.now < 13
    assert "waiting up to 60 s for resources held by other jobs (CPU 3 needed, 0 free)" in capsys.readouterr().out


def test_resources_held_too_long_are_refused_with_the_fix():
    cluster = FakeCluster(busy_for=1000)
    with pytest.raises(ResourceError, match=r"did not release them within scaling.wait_for_resources_s=30 s; "
                                            r"wait for them, raise that timeout, or lower scaling.num_workers"):
        wait(cluster, timeout_s=30)
    assert cluster.now == 30


def test_free_resources_start_at_once(capsys):
    cluster = FakeCluster(busy_for=0)
    wait(cluster, timeout_s=0)
    assert cluster.now == 0 and capsys.readouterr().out == ""


def test_run_paths_resolve_relative_dirs_on_the_driver_and_keep_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = run_paths(load_config("simclr-digits", ["runs_dir=runs", "name=a"]))
    assert (local.storage, local.local, local.remote) == (str(tmp_path / "runs"), tmp_path / "runs" / "a", False)
    remote = run_paths(load_config("simclr-digits", ["runs_dir=s3://bucket/runs/", "name=a"]))
    assert (remote.uri, remote.remote) == ("s3://bucket/runs/a", True)
    assert remote.local.is_absolute() and remote.local.name.startswith("a-")  # the driver's staging directory


def test_run_storage_that_cannot_be_opened_says_what_to_change():
    paths = run_paths(load_config("simclr-digits", ["runs_dir=nosuchstore://bucket/runs", "name=a"]))
    with pytest.raises(StorageError, match=r"cannot open run storage 'nosuchstore://bucket/runs/a'.*check runs_dir"):
        completed_run(paths, max_steps=10)


class AutoscalingCluster:
    """A cluster whose autoscaler adds a GPU node ``delay`` seconds (of a fake clock) after a request."""

    def __init__(self, delay: float):
        self.now, self.delay, self.requests, self.requested_at = 0.0, delay, [], None

    def request(self, bundles):
        self.requests.append(bundles)
        if bundles and self.requested_at is None:
            self.requested_at = self.now

    def nodes(self):
        head = {"CPU": 0.0}
        grown = self.requested_at is not None and self.now >= self.requested_at + self.delay
        return [head, {"CPU": 8.0, "GPU": 2.0}] if grown else [head]

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def autoscaled(cluster: AutoscalingCluster, *overrides: str):
    cfg = load_config("simclr-digits", ["scaling.use_gpu=true", "scaling.autoscale=true", *overrides])
    return cfg, cluster_nodes(cfg, nodes=cluster.nodes, request=cluster.request, sleep=cluster.sleep,
                              clock=lambda: cluster.now)


def test_an_autoscaling_cluster_is_asked_for_the_workers_and_waited_for(capsys):
    cluster = AutoscalingCluster(delay=30)
    cfg, nodes = autoscaled(cluster)
    assert plan_workers(cfg, nodes).resources() == {"CPU": 1.0, "GPU": 1}
    assert 30 <= cluster.now < 36
    # Two GPU workers and the data pipeline's CPU were asked for; the request is withdrawn once planned.
    assert cluster.requests == [[{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}], []]
    assert "asked the autoscaler for 3 CPUs and 2 GPUs" in capsys.readouterr().out


def test_an_autoscaler_that_never_delivers_is_refused_after_the_timeout():
    cluster = AutoscalingCluster(delay=10_000)
    with pytest.raises(ResourceError, match=r"did not add the nodes within scaling.wait_for_resources_s=60 s"):
        autoscaled(cluster, "scaling.wait_for_resources_s=60")
    assert 60 <= cluster.now < 66 and cluster.requests[-1] == []


def test_without_autoscale_a_small_cluster_is_refused_at_once():
    cluster = AutoscalingCluster(delay=0)
    cfg = load_config("simclr-digits", ["scaling.use_gpu=true"])
    nodes = cluster_nodes(cfg, nodes=cluster.nodes, request=cluster.request, sleep=cluster.sleep)
    assert cluster.requests == [] and nodes == [{"CPU": 0.0}]
    with pytest.raises(ResourceError, match="needs 2 GPUs"):
        plan_workers(cfg, nodes)


def test_a_slow_autoscaler_is_waited_for_with_what_is_missing_said(capsys):
    """GPU nodes from zero take minutes: the wait says what it asked for, what has arrived, and
    keeps saying so (every minute and whenever a node arrives) until the nodes are there."""
    cluster = AutoscalingCluster(delay=130)
    _, nodes = autoscaled(cluster, "scaling.wait_for_resources_s=600")
    assert 130 <= cluster.now < 136 and sum(n.get("GPU", 0) for n in nodes) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("asked the autoscaler for 3 CPUs and 2 GPUs (2 train workers x {CPU 1, GPU 1} + 1 CPUs for "
                      "Ray Data); waiting up to 600 s for the nodes (scaling.wait_for_resources_s); the cluster has "
                      "0 of 2 GPUs, 0 of 3 CPUs")
    progress = [line for line in out[1:] if line.startswith("still waiting for the autoscaler (")]
    assert len(progress) == 2 and all(line.endswith("the cluster has 0 of 2 GPUs, 0 of 3 CPUs") for line in progress)


def test_cluster_presets_wait_long_enough_for_gpu_nodes_from_zero():
    from ssl_platform.config import list_presets

    autoscaling = [name for name in list_presets() if load_config(name).scaling.autoscale]
    assert len(autoscaling) >= 6
    for name in autoscaling:
        assert load_config(name).scaling.wait_for_resources_s >= 1200, name
