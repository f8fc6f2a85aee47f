"""Shared fixtures: one Ray head for the whole session, the driver's connection to it, the CLI
against it, and corpora and checkpoints that several modules need.

Starting Ray is the suite's fixed cost (a local cluster takes ~10 s on 2 cores, joining one
~1 s), so the session starts one head node (``ray start --head``, 2 CPUs, 100 MiB object
store, its metrics agent on a free 127.0.0.1 port; no dashboard, which costs every run on 2
cores ~15% of its time) and everything joins it:

- ``ray_session``: this process as a driver of the head, for a module's in-process tests (one
  connection, one Ray job, kept from module to module of a pytest process);
- ``sslp``: the command line in a subprocess with ``RAY_ADDRESS`` set to the head, so a run
  is one more job on it, not a cluster of its own;
- ``trained_simclr``: one small SimCLR checkpoint trained once per session, for every test
  that needs a trained encoder.

Tests that are about a cluster of their own still start one: Ctrl-C takes down the local
cluster the CLI started, multi-node needs two raylets, `sslp submit` a head with the Jobs API.
Every cluster of the session requires the token this file puts in the environment (Ray 2.60
clusters require one).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ssl_platform.heap import HEAP_ENV, keep_freed_memory

# The allocator settings `sslp` gives itself and its clusters (ssl_platform.heap), first, for this
# process and every cluster of the session, whose processes inherit the environment.
keep_freed_memory()

# One token for every cluster this session starts or joins, set before any `ray.init`.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_ADDRESS", None)  # never join a cluster that happens to run on the machine
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# What the platform's own init_ray sets for a job: no per-print re-routing in workers, Ray Data quiet.
QUIET = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_LOG_LEVEL": "WARNING", **HEAP_ENV}
# Ray Train settings for every cluster of the session (their processes inherit the environment):
# the watcher of node drains (spot preemption) is one more actor process per worker-group start
# (~3 s of a 2-core machine) and a test node is never drained; the controller polls its workers
# every 0.25 s instead of 2 s, so a run's start and end are noticed at once.
os.environ.update({"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"})
# Ray Data lists a parquet corpus with 32 footer-reading actors by default (~3 CPU-s each to
# start); the platform's own local clusters use one per CPU (train.session.init_ray), and so does
# every cluster of the session.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
STORE = 100 * 2**20  # the head's object store; the big corpus below is 2.3x this
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:  # all bound at once, so the n ports differ
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass(frozen=True)
class RayHead:
    address: str       # GCS address, what RAY_ADDRESS and ray.init take
    metrics_port: int  # the metrics agent's Prometheus endpoint
    temp_dir: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a CLI subprocess that joins this head."""
        return {**os.environ, "RAY_ADDRESS": self.address, **extra}


def _answers(url: str) -> bool:
    """Whether ``url`` answers (with the session's token)."""
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    try:
        urllib.request.urlopen(request, timeout=2).read()
        return True
    except OSError:
        return False


def start_head(*flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict[str, int], str]:
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs, every port picked free and a --temp-dir
    of its own (so no other cluster of the machine is touched: `ray stop` would kill them all);
    returns (process, ports by flag, temp dir). Jobs it runs use this virtual environment's `python`."""
    temp_dir = tempfile.mkdtemp(prefix="sslp-t-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(env or {})}  # no 30 s drain at teardown
    log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (closed by stop_head)
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats", *flags,
         *(f"{k}={v}" for k, v in ports.items())],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc, ports, temp_dir


def wait_for_head(proc: subprocess.Popen, url: str) -> None:
    """Until ``url`` on the new head answers; fail with its log if it exits or takes 2 minutes."""
    deadline = time.monotonic() + 120
    while not _answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the Ray head did not start:\n{Path(proc.log.name).read_text()[-3000:]}")
        time.sleep(0.5)


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to `ray start --block`, which stops the processes it started."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """The session's single-node cluster (see the module docstring)."""
    proc, ports, temp_dir = start_head("--include-dashboard=false", f"--object-store-memory={STORE}")
    head = RayHead(address=f"127.0.0.1:{ports['--port']}", metrics_port=ports["--metrics-export-port"],
                   temp_dir=temp_dir)
    try:
        wait_for_head(proc, f"http://127.0.0.1:{head.metrics_port}/metrics")
        yield head
    finally:
        stop_head(proc, temp_dir)


@pytest.fixture(scope="session")
def _shared_driver(ray_head: RayHead) -> Iterator[None]:
    """Leaves the session's head, if this process is still its driver, before the head stops (a
    driver whose cluster goes away is exited by Ray)."""
    yield
    leave_shared_driver()


def leave_shared_driver() -> None:
    """Stop being a driver of the session's head, for a module that connects to a cluster of its
    own or needs this process without Ray; the next module that asks for ``ray_session`` joins again."""
    import ray

    from ssl_platform.train.session import shutdown_ray

    if ray.is_initialized():
        shutdown_ray()  # after a local-mode run's Ray Data threads, or Ray exits this process


@pytest.fixture(scope="module")
def ray_session(ray_head: RayHead, _shared_driver) -> RayHead:
    """This process as a driver of the session's head (a module opts in with
    ``pytestmark = pytest.mark.usefixtures("ray_session")`` or a test argument). The first module
    that asks joins (~1 s) and later modules of this pytest process keep the connection: one Ray
    job, whose worker processes (each ~3-5 CPU-s to start and import torch and the platform) then
    serve every module's Ray Data tasks instead of starting again for each module's own job."""
    import ray

    from ssl_platform.data.context import configure_data_context

    if not ray.is_initialized():
        ray.init(address=ray_head.address, runtime_env={"env_vars": QUIET}, log_to_driver=False)
    configure_data_context()
    return ray_head


def skip_a_record(run: str, reason: str) -> None:
    """A Ray task of the connected cluster skips one record of ``run`` the way a decode step does (the
    built-in corpora have no bad record), so the skipped-records counter is exported too."""
    import ray

    from ssl_platform.data.skips import SkipReporter, ledger_name

    @ray.remote(num_cpus=0)
    def skip_one():
        reporter = SkipReporter(ledger_name(run))
        reporter.skip("record 7", reason)
        reporter.flush()

    ray.get(skip_one.remote())


@dataclass
class Sslp:
    """``sslp`` in a subprocess that joins the session's head, as a user runs it."""

    head: RayHead

    def __call__(self, *args: str, cwd: Path, env: dict[str, str] | None = None,
                 timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ssl_platform.cli", *args], cwd=cwd,
                              env=self.head.env(**(env or {})), capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "ssl_platform.cli", *args], cwd=cwd,
                                env=self.head.env(**(env or {})), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                text=True)


@pytest.fixture(scope="session")
def sslp(ray_head: RayHead) -> Sslp:
    return Sslp(ray_head)


def show(done: subprocess.CompletedProcess) -> str:
    """A finished command's status and the ends of its output, for an assertion message."""
    return f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The directory ``name``, filled by ``make(directory)`` once per `pytest` command: with
    pytest-xdist (``make test`` runs two workers), the workers share it, and the first to need it
    makes it while the others wait on a lock."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base directory every worker's own lies in
    target, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            make(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def trained_simclr(tmp_path_factory):
    """(config, checkpoint dir) of a tiny SimCLR trained in-process for 150 steps on the digits
    (plain torch, one thread, no Ray; ~20 s): the trained encoder the evaluation, fine-tune and
    embed tests share instead of each training their own. Measured: probe/kNN 97/94 against
    random init's 74/59."""
    from simclr_digits import tiny_cfg

    def make(directory: Path) -> None:
        import torch
        from simclr_digits import SIZE, pretrain, save_checkpoint

        from ssl_platform.data.builtin import load_digits_splits

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the machine's 2 cores are shared with Ray's processes
        try:
            method = pretrain(cfg, load_digits_splits(image_size=SIZE)["train"].images, steps=150)
        finally:
            torch.set_num_threads(threads)
        (directory / "checkpoint_000000").mkdir()
        save_checkpoint(directory / "checkpoint_000000", cfg, method, step=150)

    cfg = tiny_cfg("eval.enabled=false", "name=trained-simclr")
    return cfg, made_once(tmp_path_factory, "trained-simclr", make) / "checkpoint_000000"


BIG_RECORDS, BIG_SIDE = 1200, 256  # 1200 x 192 KiB of uncompressed PNG: ~230 MiB on disk and in flight


@pytest.fixture(scope="session")
def big_image_corpus(tmp_path_factory) -> Path:
    """A folder of parquet files (``image`` PNG bytes, ``label``), 50 random 256 px images each,
    ~230 MiB in all: 2.3x the head's object store, for the streaming tests of training and embed.
    Files are how a real corpus arrives, and each one stays far below the object store."""

    # Ray refuses to spill (OutOfDiskError, or a raylet that dies and takes this process with it)
    # once the disk of its temp dir is 95% full; say so here instead.
    need = 4 * 2.3 * STORE  # the corpus, the spilled blocks, the outputs, and room to spare
    disk = shutil.disk_usage(tempfile.gettempdir())
    if disk.used + need > 0.9 * disk.total:
        pytest.fail(f"the streaming tests need {need / 2**30:.1f} GiB free on {tempfile.gettempdir()} below 90% "
                    f"of the disk (Ray stops spilling at 95%); it has {disk.free / 2**30:.1f} GiB free of "
                    f"{disk.total / 2**30:.0f} GiB: free some space")

    def make(root: Path) -> None:
        import io

        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        from PIL import Image

        def png(rng: np.random.Generator) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (BIG_SIDE, BIG_SIDE, 3), dtype=np.uint8)).save(
                buf, format="PNG", compress_level=0)
            return buf.getvalue()

        rng = np.random.default_rng(0)
        for start in range(0, BIG_RECORDS, 50):  # written file by file: the test process stays small in memory
            table = pa.table({"image": [png(rng) for _ in range(50)], "label": list(range(start, start + 50))})
            pq.write_table(table, root / f"part-{start // 50:03d}.parquet", row_group_size=10)

    root = made_once(tmp_path_factory, "big", make)
    assert sum(p.stat().st_size for p in root.iterdir()) > 2 * STORE
    return root


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Modules in decreasing order of their measured time (fresh clone, 2 cores, 2026-12-03); the rest
# keep pytest's order after them. `make test` runs two pytest-xdist workers that take one module at
# a time in this order, so the long modules start first and the short ones fill in at the end.
LONGEST_FIRST = ["test_presets.py", "test_resume_exact.py", "test_faults.py", "test_elastic.py",
                 "test_sweep.py",
                 "test_run_e2e.py",
                 "test_embed.py", "test_streaming.py", "test_finetune.py", "test_loop.py", "test_eval_image.py",
                 "test_submit.py", "test_eval_data.py", "test_data_images.py", "test_prometheus.py",
                 "test_two_view_methods_learn.py",
                 "test_eval_text.py", "test_eval_audio.py", "test_data_captions.py", "test_eval_clip.py",
                 "test_data_audio.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests keep their order
