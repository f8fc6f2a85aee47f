"""Driver side of a training run: Ray start-up, where the run lives, resource planning, the
TorchTrainer, worker failures, Ctrl-C and the end-of-run summary.

Where a run lives (:func:`run_paths`):

- ``runs_dir`` a local path: checkpoints, Ray's run snapshot, config.yaml, metrics.jsonl,
  summary.json and the evaluation report all live in ``RUNS_DIR/NAME``. A relative ``runs_dir``
  is resolved on the driver (Ray Train workers run in a directory of their own). With workers on
  several nodes it must be a shared filesystem; Ray checks that and says so.
- ``runs_dir`` a URI (``s3://``, ``gs://``, ``file://``, whatever ``pyarrow.fs`` opens): Ray
  writes checkpoints and its snapshot to ``URI/NAME``. The driver writes its files in a local
  staging directory and copies them to ``URI/NAME``; rank 0 writes metrics.jsonl on its own node
  and copies it to ``URI/NAME`` when its attempt ends (:func:`train_worker`).

Re-running the same name resumes from the newest checkpoint (``RunConfig(name, storage_path)``);
a run whose summary.json says it reached ``train.max_steps`` is not trained again. A worker that
dies restarts the worker group from the newest checkpoint ``--max-failures`` times (tests kill
rank 0 once at step N with ``SSLP_CRASH_AT_STEP=N``); Ctrl-C lets Ray abort the workers, keeps
the registered checkpoints and raises KeyboardInterrupt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer

from ssl_platform import methods
from ssl_platform.config import ExperimentConfig, save_yaml
from ssl_platform.data.labelled import check_eval_data
from ssl_platform.data.online import online_split
from ssl_platform.data.pipeline import pretraining_data
from ssl_platform.data.skips import (
    NAMESPACE,
    SkipReporter,
    format_summary,
    get_or_create_ledger,
    ledger_name,
    skip_summary,
)
from ssl_platform.data.sources import filesystem
from ssl_platform.train import local_mode
from ssl_platform.train.loop import CRASH_AT_STEP_ENV, train_func
from ssl_platform.train.metrics import format_duration

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ERROR_FILE = "config.yaml", "metrics.jsonl", "summary.json", "error.log"
# Driver environment variables with this prefix reach every worker (SSLP_CRASH_AT_STEP, the
# worker-kill fault injection of tests/test_faults.py, is one).
ENV_PREFIX = "SSLP_"
# Ray Train gives up placing the worker group after 60 s and tries again; bounded retries turn
# "the cluster stays busy" into an error instead of waiting forever.
PLACEMENT_TIMEOUT_S = 60.0


class ResourceError(RuntimeError):
    """The cluster can never (or not in time) satisfy the request; the message says what to change."""


class DataError(RuntimeError):
    """The corpus cannot be trained on (missing path, no usable record); the message names it."""


class StorageError(RuntimeError):
    """``runs_dir`` cannot be opened (an unknown URI scheme, a store without credentials)."""


class TrainingFailed(RuntimeError):
    """Training stopped on a worker error; the message is one line, the full error is in error.log."""


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def init_ray(address: str | None = None, dashboard: bool = True) -> str | None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local cluster. Returns the dashboard URL."""
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train V2 re-routes print() in workers to its logger *and* stdout, and Ray Data logs a
    # line per pass over the data; the training progress line is what the terminal should show.
    # A user's own setting of either variable wins.
    quiet = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_LOG_LEVEL": "WARNING"}
    if not address:
        # Ray Data lists a parquet corpus with a pool of footer-reading actors, 32 of them by
        # default: on a laptop, 32 processes that each take ~3 CPU-s to start, for a few files.
        # One per CPU of the local cluster (a joined cluster keeps Ray's default).
        quiet[FOOTER_ACTORS_ENV] = str(min(32, os.cpu_count() or 1))
    env = {k: os.environ.get(k, v) for k, v in quiet.items()}
    if FOOTER_ACTORS_ENV in env:  # the listing may run in this process too
        os.environ[FOOTER_ACTORS_ENV] = env[FOOTER_ACTORS_ENV]
    # Workers on a joined cluster do not inherit the driver's environment; the job's runtime_env does reach them.
    env.update({k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)})
    runtime_env = {"env_vars": env}
    if address:
        ctx = ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # address="local": start our own cluster even when another one runs on this machine
        # (plain ray.init() would silently join it); joining is what --address is for.
        ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                       runtime_env=runtime_env)
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


# ----------------------------------------------------------------------------- where a run lives

@dataclass(frozen=True)
class RunPaths:
    """``storage``: Ray's storage path, an absolute local path or a URI; ``local``: the driver's
    run directory, ``storage/name`` itself for local storage, else a staging directory."""

    storage: str
    name: str
    local: Path
    remote: bool  # storage is a URI: the driver's files are copied there

    @property
    def uri(self) -> str:
        return f"{self.storage}/{self.name}"


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: as ``data.path`` (see data.sources.filesystem)."""
    return "://" in path


def run_paths(cfg: ExperimentConfig) -> RunPaths:
    if is_uri(cfg.runs_dir):
        storage = cfg.runs_dir.rstrip("/")
        digest = hashlib.sha1(f"{storage}/{cfg.name}".encode()).hexdigest()[:8]
        return RunPaths(storage, cfg.name, Path(tempfile.gettempdir()) / "sslp-runs" / f"{cfg.name}-{digest}", True)
    storage = str(Path(cfg.runs_dir).expanduser().resolve())  # on the driver, before workers chdir elsewhere
    return RunPaths(storage, cfg.name, Path(storage) / cfg.name, False)


def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        fs, path, _ = filesystem(uri, what="run storage")
    except ValueError as e:
        raise StorageError(f"{e}; check runs_dir (a local path or a URI such as s3://bucket/runs)") from None
    return fs, path


def read_run_file(paths: RunPaths, name: str) -> str | None:
    """A file of the run directory (in storage for a URI run) as text, None if there is none."""
    fs, root = _fs(paths.uri if paths.remote else str(paths.local))
    if fs.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read().decode()


def copy_to_storage(paths: RunPaths, *names: str) -> None:
    """Copy files of the driver's run directory to a URI run's storage (no-op for local storage)."""
    if not paths.remote:
        return
    fs, root = _fs(paths.uri)
    fs.create_dir(root, recursive=True)
    for name in names:
        if (paths.local / name).is_file():
            pyarrow.fs.copy_files(str(paths.local / name), f"{root}/{name}",
                                  source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def _remove_run_file(paths: RunPaths, name: str) -> None:
    (paths.local / name).unlink(missing_ok=True)
    if paths.remote:
        fs, root = _fs(paths.uri)
        if fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(f"{root}/{name}")


def completed_run(paths: RunPaths, max_steps: int) -> dict | None:
    """The summary of this run if it already reached ``max_steps`` (its checkpoint still there), else None."""
    text = read_run_file(paths, SUMMARY_FILE)
    summary = json.loads(text) if text else None
    if not summary or summary.get("steps", 0) < max_steps:
        return None
    if not paths.remote and not Path(summary["checkpoint"]).is_dir():
        return None
    return summary


# ----------------------------------------------------------------------------- resources

@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int
    cpus_per_worker: float
    use_gpu: bool

    def describe(self) -> str:
        if self.num_workers == 0:
            return f"local mode (this process{', on its GPU' if self.use_gpu else ''})"
        return f"{self.num_workers} workers x {self.resources()}"

    def resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = 1
        return res


def plan_workers(cfg: ExperimentConfig, nodes: list[dict[str, float]]) -> WorkerPlan:
    """Size the train workers so the data pipeline always keeps ``scaling.data_cpus`` CPUs.

    ``nodes`` are the alive nodes' total resources. Ray Train workers hold their CPUs for the
    whole run; if they took every CPU, Ray Data could never schedule a transform and the run
    would hang, so an infeasible request is refused here, before anything is scheduled.
    """
    s = cfg.scaling
    if s.num_workers == 0:  # local mode: the driver is the only rank; Ray Data may use every CPU of the cluster
        if s.use_gpu and not torch.cuda.is_available():
            raise ResourceError("scaling.num_workers=0 trains in this process, which sees no GPU; set "
                                "scaling.use_gpu=false, or scaling.num_workers=1 to train on a GPU node of the cluster")
        return WorkerPlan(0, 0.0, s.use_gpu)
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    if s.use_gpu and total_gpu < s.num_workers:
        raise ResourceError(
            f"scaling.use_gpu=true needs {s.num_workers} GPUs (one per worker) but the cluster has {total_gpu:g}; "
            + (f"set scaling.num_workers={int(total_gpu)} or scaling.use_gpu=false" if total_gpu >= 1 else
               "set scaling.use_gpu=false")
        )
    free_for_train = total_cpu - s.data_cpus
    if s.cpus_per_worker is None:
        # One CPU each where there is room, else an equal fraction (e.g. 0.5 on a 2-core laptop).
        cpus = min(1.0, math.floor(free_for_train / s.num_workers * 100) / 100)
        if cpus < 0.05:
            raise ResourceError(
                f"the cluster has {total_cpu:g} CPUs: not enough for {s.num_workers} train workers plus "
                f"scaling.data_cpus={s.data_cpus:g} for the data pipeline; lower scaling.num_workers or "
                f"scaling.data_cpus"
            )
    else:
        cpus = s.cpus_per_worker
        if cpus * s.num_workers > free_for_train + 1e-9:
            raise ResourceError(
                f"{s.num_workers} workers x scaling.cpus_per_worker={cpus:g} + scaling.data_cpus={s.data_cpus:g} "
                f"exceeds the cluster's {total_cpu:g} CPUs; lower scaling.cpus_per_worker or scaling.num_workers"
            )
    biggest = max((n.get("CPU", 0.0) for n in nodes if not s.use_gpu or n.get("GPU", 0) >= 1), default=0.0)
    if cpus > biggest:
        raise ResourceError(f"scaling.cpus_per_worker={cpus:g} does not fit on any node (largest has {biggest:g} CPUs)")
    return WorkerPlan(s.num_workers, cpus, s.use_gpu)


def alive_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def worker_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """What a run asks of the cluster: one bundle per train worker plus the data pipeline's CPUs."""
    s = cfg.scaling
    worker = {"CPU": s.cpus_per_worker if s.cpus_per_worker is not None else 1.0, **({"GPU": 1.0} if s.use_gpu else {})}
    return [dict(worker) for _ in range(s.num_workers)] + ([{"CPU": s.data_cpus}] if s.data_cpus else [])


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def cluster_nodes(cfg: ExperimentConfig, nodes=alive_nodes, request=_request_resources, sleep=time.sleep,
                  clock=time.monotonic) -> list[dict[str, float]]:
    """The nodes to plan the train workers on.

    With ``scaling.autoscale`` the cluster may start without the nodes a run needs (a GPU worker
    group that scales from 0), and :func:`plan_workers` would refuse it. Nothing asks the
    autoscaler for nodes before Ray Train's placement group exists, so the run asks for its
    bundles itself (``ray.autoscaler.sdk.request_resources``), waits at most
    ``scaling.wait_for_resources_s`` for a cluster that :func:`plan_workers` accepts, then
    withdraws the request: the placement group holds the nodes from there on (and is itself the
    demand that brings a lost node back).
    """
    if not cfg.scaling.autoscale:
        return nodes()
    timeout = cfg.scaling.wait_for_resources_s
    bundles = worker_bundles(cfg)
    deadline = clock() + timeout
    request(bundles)
    announced = False
    try:
        while True:
            current = nodes()
            try:
                plan_workers(cfg, current)
                return current
            except ResourceError as e:
                if clock() >= deadline:
                    raise ResourceError(
                        f"{e} (the autoscaler did not add the nodes within scaling.wait_for_resources_s={timeout:g} s: "
                        f"check the worker group's max_workers / maxReplicas and `ray status`)") from None
            if not announced:
                want = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
                print(f"asked the autoscaler for {want['CPU']:g} CPUs and {want['GPU']:g} GPUs; waiting up to "
                      f"{timeout:g} s for the nodes", flush=True)
                announced = True
            sleep(min(5.0, max(deadline - clock(), 0.0)))
    finally:
        request([])


def wait_for_free_resources(plan: WorkerPlan, data_cpus: float, timeout_s: float, free=None,
                            sleep=time.sleep, clock=time.monotonic) -> None:
    """Wait until the cluster has the plan's resources free, at most ``timeout_s`` seconds.

    :func:`plan_workers` checks the cluster's *total* resources; on a shared cluster other jobs
    may hold them. Ray would wait for them without a word, so the driver says what it waits
    for and gives up with a :class:`ResourceError` after the timeout. ``free`` (default
    ``ray.available_resources``) returns the cluster's free resources.
    """
    free = free or ray.available_resources
    need = {"CPU": plan.num_workers * plan.cpus_per_worker + data_cpus,
            "GPU": plan.num_workers if plan.use_gpu else 0}  # local mode: the driver's own GPU is not Ray's
    deadline = clock() + timeout_s
    announced = False
    while True:
        have = free()
        short = {k: v for k, v in need.items() if v and have.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        held = ", ".join(f"{k} {need[k]:g} needed, {have.get(k, 0.0):g} free" for k in short)
        if clock() >= deadline:
            raise ResourceError(
                f"other jobs hold the resources this run needs ({held}) and did not release them within "
                f"scaling.wait_for_resources_s={timeout_s:g} s; wait for them, raise that timeout, "
                f"or lower scaling.num_workers / scaling.cpus_per_worker / scaling.data_cpus"
            )
        if not announced:
            print(f"waiting up to {timeout_s:g} s for resources held by other jobs ({held})", flush=True)
            announced = True
        sleep(min(2.0, max(deadline - clock(), 0.0)))


# ----------------------------------------------------------------------------- what runs on each worker

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
        print(f"{world} workers on {len(ranks_by_node)} node(s): {where}", flush=True)


def _pack_dir(path: Path) -> dict[str, bytes]:
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
class _OneShot:
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
    fs, root = _fs(uri)
    stored, here = f"{root}/{METRICS_FILE}", pyarrow.fs.LocalFileSystem()
    if not local.exists() and fs.get_file_info(stored).type != pyarrow.fs.FileType.NotFound:
        pyarrow.fs.copy_files(stored, str(local), source_filesystem=fs, destination_filesystem=here)
    try:
        yield
    finally:
        if local.exists():
            fs.create_dir(root, recursive=True)
            pyarrow.fs.copy_files(str(local), stored, source_filesystem=here, destination_filesystem=fs)


# ----------------------------------------------------------------------------- the run

@dataclass
class RunSummary:
    """What a finished run prints and writes to ``summary.json``."""

    run: str
    steps: int
    max_steps: int
    wall_time_s: float  # this fit(): data set-up, worker start-up (and restarts) and training
    samples_per_s: float | None  # mean over the training time of the last attempt (the loop's count)
    tokens_per_s: float | None  # text methods
    final_loss: float | None  # mean over workers at the last logged step
    skipped_records: dict
    checkpoint: str

    def text(self) -> str:
        rate = "n/a" if self.samples_per_s is None else f"{self.samples_per_s:,.0f} samples/s"
        if self.tokens_per_s is not None:
            rate += f", {self.tokens_per_s:,.0f} tokens/s"
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        return "\n".join([
            f"summary of run {self.run}:",
            f"  steps       {self.steps}/{self.max_steps}",
            f"  wall time   {format_duration(self.wall_time_s)} (data set-up, worker start-up and training)",
            f"  throughput  {rate}",
            f"  final loss  {loss}",
            f"  data        {format_summary(self.skipped_records)}",
            f"  checkpoint  {self.checkpoint}",
        ])


def fit(cfg: ExperimentConfig, paths: RunPaths, max_failures: int = 0,
        callbacks: list[ray.train.UserCallback] | None = None, data_builder=pretraining_data, build=None) -> RunSummary:
    """Pretrain with Ray Train (Ray must be initialised); returns the summary, also written to
    ``summary.json``. Ctrl-C raises KeyboardInterrupt after Ray has stopped the workers.

    ``callbacks`` go to the trainer's RunConfig: a Tune trial passes ``TuneReportCallback`` so
    that each report of rank 0 (step, loss, online metrics) reaches Tune. ``data_builder`` (the
    signature of ``pretraining_data``) and ``build`` (``(cfg, **derived) -> module``, run on every
    worker; default ``methods.build``) let `sslp finetune` train a classifier with the same loop."""
    t0 = time.time()
    paths.local.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, paths.local / CONFIG_FILE)
    _remove_run_file(paths, SUMMARY_FILE)  # not complete again until this fit says so
    copy_to_storage(paths, CONFIG_FILE)

    plan = plan_workers(cfg, cluster_nodes(cfg))
    if plan.num_workers == 0 and (max_failures or callbacks):
        raise ResourceError(f"scaling.num_workers=0 trains in this process: it cannot be restarted "
                            f"({'--max-failures' if max_failures else 'a Tune trial'} needs Ray Train workers); "
                            f"set scaling.num_workers=1 or more")
    wait_for_free_resources(plan, cfg.scaling.data_cpus, cfg.scaling.wait_for_resources_s)
    skips = ledger_name(cfg.name)
    ledger = get_or_create_ledger(skips)
    try:
        data = data_builder(cfg, paths.local, SkipReporter(skips, cfg.data.strict), methods.architecture(cfg))
        check_eval_data(cfg)  # a labelled eval.data that the evaluation cannot use fails now, not after training
    except (ValueError, FileNotFoundError) as e:  # a path that does not exist, a corpus with no usable record
        ray.kill(ledger)
        raise DataError(str(e)) from None
    # Training reads again the records that the probe for an empty corpus (pretraining_data) read:
    # their skips are counted then, not twice.
    ray.get(ledger.reset.remote())
    ranks = cfg.scaling.ranks
    local_batch = cfg.train.batch_size // ranks
    if data.num_records is not None and data.num_records // ranks < local_batch:
        ray.kill(ledger)
        raise ResourceError(
            f"train.batch_size={cfg.train.batch_size} needs {local_batch} records per worker but each of the "
            f"{ranks} rank(s) gets {data.num_records // ranks}; lower train.batch_size"
        )
    online = None  # the online evaluation's held-out split, in the object store (a reference in the loop config)
    if cfg.eval.online_every:
        try:
            online = ray.put(online_split(cfg, methods.architecture(cfg), data.artifacts))
        except (ValueError, FileNotFoundError) as e:
            ray.kill(ledger)
            raise DataError(str(e)) from None
    print(f"training {cfg.method.name} on {data.description}: {plan.describe()}, "
          f"global batch {cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.effective_lr()[1]}"
          f"{f', beta2 {cfg.train.adam_beta2:g}' if cfg.train.optimizer == 'adamw' else ''}", flush=True)

    crash_token = _crash_token(cfg.name)  # the actor handle (it keeps the actor alive), or None
    token_name = _crash_token_name(cfg.name) if crash_token is not None else None
    if plan.num_workers == 0 and cfg.data.seed is not None:  # what _dataset_config asks of the workers' shards
        data.train.context.execution_options.preserve_order = True
    trainer = _trainer(cfg, paths, plan, data, token_name, max_failures, callbacks or [], online, build)
    try:
        with _ray_sigint_as_keyboard_interrupt():
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        (paths.local / ERROR_FILE).write_text(str(e) + "\n")
        copy_to_storage(paths, ERROR_FILE)
        raise TrainingFailed(_failure_reason(e, cfg, paths, max_failures)) from None
    except Exception as e:  # local mode: the loop's own error, raised in this process
        if plan.num_workers:
            raise
        import traceback

        (paths.local / ERROR_FILE).write_text("".join(traceback.format_exception(e)))
        copy_to_storage(paths, ERROR_FILE)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise TrainingFailed(f"the loop failed in local mode: {type(e).__name__}: {lines[-1] if lines else ''}; full "
                             f"error in {paths.local / ERROR_FILE}; run the same command again to resume run "
                             f"{cfg.name} from its newest checkpoint") from None
    finally:
        skipped = skip_summary(ledger)
        ray.kill(ledger)  # detached so every data task finds it; it must not outlive the run
        if crash_token is not None:
            ray.kill(crash_token)
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.name} finished without a checkpoint in {paths.uri}")

    summary = _summarize(cfg, paths, result, skipped, t0)
    (paths.local / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    copy_to_storage(paths, SUMMARY_FILE)
    return summary


def _trainer(cfg: ExperimentConfig, paths: RunPaths, plan: WorkerPlan, data, crash_token: str | None,
             max_failures: int, callbacks: list, online_split_ref: ray.ObjectRef | None = None,
             build=None) -> TorchTrainer:
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(), "run_dir": str(paths.local), "derived": data.derived,
            "storage_uri": paths.uri if paths.remote else None, "crash_token": crash_token,
            "artifacts": {name: str(path) for name, path in data.artifacts.items()},
            "artifact_files": {name: _pack_dir(Path(path)) for name, path in data.artifacts.items()},
            "online_split": online_split_ref, "build": build, "local": plan.num_workers == 0,
            "resume_from": local_mode.resume_point(paths.uri if paths.remote else str(paths.local),
                                                   local=plan.num_workers == 0),
        },
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources() if plan.num_workers else None,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=paths.storage,
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures,
                controller_failure_limit=max(1, math.ceil(cfg.scaling.wait_for_resources_s / PLACEMENT_TIMEOUT_S))),
        ),
        dataset_config=_dataset_config(cfg),
        datasets={"train": data.train},
    )


def _crash_token_name(run: str) -> str:
    return f"sslp-crash-{run}"


def _crash_token(run: str) -> ray.actor.ActorHandle | None:
    """The once-only token of the fault injection, when the driver's environment sets it."""
    if CRASH_AT_STEP_ENV not in os.environ:
        return None
    return _OneShot.options(name=_crash_token_name(run), namespace=NAMESPACE, get_if_exists=True).remote()


def _dataset_config(cfg: ExperimentConfig) -> ray.train.DataConfig:
    """With ``data.seed`` set, which rows each worker gets must be reproducible too: Ray Data then
    keeps the blocks' order (Ray Train splits them in that order, ignoring locality)."""
    if cfg.data.seed is None:
        return ray.train.DataConfig()
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


@contextmanager
def _ray_sigint_as_keyboard_interrupt():
    """Ray Train's ``fit()`` installs its own SIGINT handler: it aborts the run (workers stop, the
    registered checkpoints stay) and then leaves through ``sys.exit``. Turn that exit into
    KeyboardInterrupt and put the previous handler back (a later Ctrl-C, during evaluation,
    must not reach a handler that aborts a finished run)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _failure_reason(error: ray.train.TrainingFailedError, cfg: ExperimentConfig, paths: RunPaths,
                    max_failures: int) -> str:
    """One line: which worker failed and how, where the full error is, how to go on."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, exc = min(failures.items())
        died = (exc, getattr(exc, "health_check_failure", None))  # a dead process fails the health check
        if any(isinstance(e, ray.exceptions.RayActorError) for e in died):
            what = f"worker rank {rank} died (its process exited or was killed)"
        else:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            what = f"worker rank {rank}: {lines[-1] if lines else type(exc).__name__}"
    else:
        cause = getattr(error, "controller_failure", error)
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
            return (f"the train workers could not be placed within {cfg.scaling.wait_for_resources_s:g} s (other jobs "
                    f"hold the resources, or a node left); raise scaling.wait_for_resources_s or lower "
                    f"scaling.num_workers")
        first = str(cause).splitlines()[0] if str(cause) else ""
        what = f"the Ray Train controller failed: {type(cause).__name__}: {first}"
    retries = (f"after {max_failures} restart(s)" if max_failures else
               "pass --max-failures N to restart from the newest checkpoint automatically")
    return (f"{what}; full error in {paths.local / ERROR_FILE}; {retries}; run the same command again to resume "
            f"run {cfg.name} from its newest checkpoint")


def _summarize(cfg: ExperimentConfig, paths: RunPaths, result: ray.train.Result, skipped: dict,
               t0: float) -> RunSummary:
    """The final report's metrics carry the loop's own totals (last logged loss, throughput)."""
    m = result.metrics or {}
    # Checkpoint paths are inside the storage's filesystem, without the URI's scheme.
    checkpoint = f"{paths.uri}/{Path(result.checkpoint.path).name}" if paths.remote else result.checkpoint.path
    return RunSummary(
        run=cfg.name, steps=int(m.get("step", cfg.train.max_steps)), max_steps=cfg.train.max_steps,
        wall_time_s=time.time() - t0, samples_per_s=m.get("samples_per_s"), tokens_per_s=m.get("tokens_per_s"),
        final_loss=m.get("loss"), skipped_records=skipped, checkpoint=checkpoint,
    )


def local_checkpoint(paths: RunPaths, checkpoint: str) -> Path:
    """A checkpoint as a local directory (a URI run's is downloaded into the staging directory)."""
    if not paths.remote:
        return Path(checkpoint)
    target = paths.local / "checkpoints" / Path(urlparse(checkpoint).path).name
    if not target.is_dir():
        ray.train.Checkpoint(checkpoint).to_directory(str(target))
    return target
