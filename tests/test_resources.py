"""Train-worker sizing: the data pipeline always keeps CPUs, infeasible requests fail fast."""

import pytest

from ssl_platform.config import load_config
from ssl_platform.train.trainer import ResourceError, plan_workers


def test_two_workers_on_two_cores_get_half_a_cpu_each():
    plan = plan_workers(load_config("simclr-digits"), [{"CPU": 2.0}])
    assert plan.cpus_per_worker == 0.5 and plan.resources() == {"CPU": 0.5}


def test_big_cluster_gives_one_cpu_per_worker_and_gpus_when_asked():
    cfg = load_config("simclr-digits", ["scaling.num_workers=4", "scaling.use_gpu=true"])
    plan = plan_workers(cfg, [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}])
    assert plan.resources() == {"CPU": 1.0, "GPU": 1}


@pytest.mark.parametrize("overrides, nodes, expected", [
    (["scaling.use_gpu=true"], [{"CPU": 2.0}], "set scaling.num_workers=0 or scaling.use_gpu=false"),
    (["scaling.cpus_per_worker=1"], [{"CPU": 2.0}], "lower scaling.cpus_per_worker"),
    (["scaling.num_workers=4", "train.batch_size=256", "scaling.data_cpus=2"], [{"CPU": 2.0}], "lower scaling.num_workers"),
    (["scaling.cpus_per_worker=3", "scaling.num_workers=1"], [{"CPU": 2.0}, {"CPU": 2.0}], "does not fit on any node"),
])
def test_infeasible_requests_say_what_to_change(overrides, nodes, expected):
    with pytest.raises(ResourceError, match=expected.replace("(", r"\(")):
        plan_workers(load_config("simclr-digits", overrides), nodes)
