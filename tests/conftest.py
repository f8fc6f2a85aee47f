"""Shared fixtures. ``ray_data``: the one local Ray instance a data test module runs on;
``one_thread``: torch on one thread for the test (the test machine's 2 cores are shared)."""

import pytest
import ray


@pytest.fixture(scope="module")
def ray_data():
    """A local Ray instance for the tests of one module (2 CPUs, a small object store), shut down after.

    The data test modules opt in (``pytestmark = pytest.mark.usefixtures("ray_data")`` or a
    test argument); modules with their own Ray setup (streaming, loop) do not use it. If Ray is
    already running, started by another fixture of the module, that instance is used and left
    to its owner to shut down.
    """
    if ray.is_initialized():
        yield
        return
    from ssl_platform.data.pipeline import quiet_progress

    # address="local": a new instance even when a `ray start` cluster runs on this machine (which a
    # bare ray.init() would join, refusing num_cpus).
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200_000_000)
    quiet_progress()
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
