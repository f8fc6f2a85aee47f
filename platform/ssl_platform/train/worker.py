"""What Ray Train runs on every worker: :func:`train_worker`, the per-worker loop of ``train.loop``
wrapped in what only concerns where it runs (node placement, artifacts, the injected crash, a URI
run's metrics.jsonl).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import torch.distributed as dist

from ssl_platform.data.skips import NAMESPACE
from ssl_platform.train import console
from ssl_platform.train.loop import CRASH_AT_STEP_ENV, train_func
from ssl_platform.train.storage import METRICS_FILE, run_filesystem


def train_worker(loop_config: dict) -> None:
    """The function Ray Train runs on every worker: the per-worker loop (``train_func``) plus
    what only concerns where it runs. Rank 0 prints the worker placement; artifacts the driver
    shipped are written where this node cannot see the driver's run directory; the injected
    crash fires once per ``sslp run``; a URI run's metrics.jsonl is fetched and stored back."""
    rank = ray.train.get_context().get_world_rank()
    _announce_placement(rank, ray.train.get_context().get_world_size())
    _localize_artifacts(loop_config)
    _disarm_spent_crash(rank, loop_config.get("crash_token"))
    with _metrics_in_storage(rank, loop_config):
        train_func(loop_config)


def _announce_placement(rank: int, world: int) -> None:
    """One line from rank 0: which node runs which ranks (checks SPREAD/PACK, finds a slow node)."""
    here = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    nodes = [here]
    if world > 1 and dist.is_initialized():
        nodes = [None] * world
        # gloo: an object gather over NCCL would need each rank's CUDA device set first.
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        dist.all_gather_object(nodes, here, group=group)
    if rank == 0:
        ranks_by_node: dict[tuple[str, str], list[int]] = {}
        for r, node in enumerate(nodes):
            ranks_by_node.setdefault(tuple(node), []).append(r)
        where = "; ".join(f"node {node_id[:12]} ({ip}): ranks {','.join(map(str, ranks))}"
                          for (node_id, ip), ranks in ranks_by_node.items())
        console.say(f"{world} workers on {len(ranks_by_node)} node(s): {where}")


def pack_dir(path: Path) -> dict[str, bytes]:
    """The files under ``path`` by relative path: how the driver ships an artifact (:func:`_localize_artifacts`)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _localize_artifacts(loop_config: dict) -> None:
    """Artifacts a checkpoint carries (the tokenizer) are made on the driver; a worker on another
    node without a shared disk writes them from the bytes shipped in the loop config."""
    for name, path in loop_config["artifacts"].items():
        if not Path(path).exists():
            target = Path(tempfile.mkdtemp(prefix="sslp-artifact-")) / name
            for rel, data in loop_config["artifact_files"][name].items():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(data)
            loop_config["artifacts"][name] = str(target)


@ray.remote(num_cpus=0)
class OneShot:
    """A token that can be taken once: the injected crash must kill the first attempt only,
    not every restart it causes (those resume before the crash step)."""

    def __init__(self):
        self.taken = False

    def take(self) -> bool:
        taken, self.taken = self.taken, True
        return not taken


def _disarm_spent_crash(rank: int, token: str | None) -> None:
    if (rank == 0 and token and CRASH_AT_STEP_ENV in os.environ
            and not ray.get(ray.get_actor(token, namespace=NAMESPACE).take.remote())):
        del os.environ[CRASH_AT_STEP_ENV]


@contextmanager
def _metrics_in_storage(rank: int, loop_config: dict):
    """URI runs: rank 0 appends to a node-local metrics.jsonl, fetched from storage when this node
    has none (first attempt here) and copied back when the attempt ends. A worker that dies hard
    does not copy back; the rows since its attempt started are then only on its node."""
    uri = loop_config.get("storage_uri")
    if rank != 0 or not uri:
        yield
        return
    local = Path(loop_config["run_dir"]) / METRICS_FILE
    local.parent.mkdir(parents=True, exist_ok=True)
    fs, root = run_filesystem(uri)
    stored, here = f"{root}/{METRICS_FILE}", pyarrow.fs.LocalFileSystem()
    if not local.exists() and fs.get_file_info(stored).type != pyarrow.fs.FileType.NotFound:
        pyarrow.fs.copy_files(stored, str(local), source_filesystem=fs, destination_filesystem=here)
    try:
        yield
    finally:
        if local.exists():
            fs.create_dir(root, recursive=True)
            pyarrow.fs.copy_files(str(local), stored, source_filesystem=here, destination_filesystem=fs)
