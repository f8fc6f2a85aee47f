"""Driver side of a training run: Ray start-up, resource planning, the TorchTrainer, fit().

The run directory is ``RUNS_DIR/NAME``; Ray Train stores its checkpoints there too
(``RunConfig(storage_path=RUNS_DIR, name=NAME)``), so running the same name again resumes from
the newest checkpoint.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ssl_platform import methods
from ssl_platform.config import ExperimentConfig, save_yaml
from ssl_platform.data.pipeline import pretraining_data
from ssl_platform.data.skips import SkipReporter, format_summary, get_or_create_ledger, ledger_name, skip_summary
from ssl_platform.train.checkpoint import load_payload
from ssl_platform.train.loop import train_func


class ResourceError(RuntimeError):
    """The cluster can never satisfy the request; the message says which key to change."""


class DataError(RuntimeError):
    """The corpus cannot be trained on (missing path, no usable record); the message names it."""


def init_ray(address: str | None = None, dashboard: bool = True) -> str | None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local cluster. Returns the dashboard URL."""
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train V2 re-routes print() in workers to its logger *and* stdout, and Ray Data logs a
    # line per pass over the data; the training progress line is what the terminal should show.
    # A user's own setting of either variable wins.
    quiet = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_LOG_LEVEL": "WARNING"}
    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in quiet.items()}}
    if address:
        ctx = ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        ctx = ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                       runtime_env=runtime_env)
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int
    cpus_per_worker: float
    use_gpu: bool

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
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    if s.use_gpu and total_gpu < s.num_workers:
        raise ResourceError(
            f"scaling.use_gpu=true needs {s.num_workers} GPUs (one per worker) but the cluster has {total_gpu:g}; "
            f"set scaling.num_workers={int(total_gpu)} or scaling.use_gpu=false"
        )
    free_for_train = total_cpu - s.data_cpus
    if s.cpus_per_worker is None:
        # One CPU each where there is room, else an equal fraction (e.g. 0.5 on a 2-core laptop).
        cpus = min(1.0, math.floor(free_for_train / s.num_workers * 100) / 100)
        if cpus < 0.05:
            raise ResourceError(
                f"the cluster has {total_cpu:g} CPUs: not enough for {s.num_workers} train workers plus "
                f"scaling.data_cpus={s.data_cpus:g} for the data pipeline; lower scaling.num_workers or scaling.data_cpus"
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


def fit(cfg: ExperimentConfig, max_failures: int = 0) -> Path:
    """Pretrain with Ray Train (Ray must be initialised); returns the newest checkpoint directory."""
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")

    plan = plan_workers(cfg, alive_nodes())
    skips = ledger_name(cfg.name)
    ledger = get_or_create_ledger(skips)
    try:
        data = pretraining_data(cfg, run_dir, SkipReporter(skips, cfg.data.strict), methods.architecture(cfg))
    except (ValueError, FileNotFoundError) as e:  # a path that does not exist, a corpus with no usable record
        raise DataError(str(e)) from None
    local_batch = cfg.train.batch_size // plan.num_workers
    if data.num_records is not None and data.num_records // plan.num_workers < local_batch:
        raise ResourceError(
            f"train.batch_size={cfg.train.batch_size} needs {local_batch} records per worker but each of the "
            f"{plan.num_workers} workers gets {data.num_records // plan.num_workers}; lower train.batch_size"
        )
    print(f"training {cfg.method.name} on {data.description}: {plan.num_workers} workers x {plan.resources()}, "
          f"global batch {cfg.train.batch_size}", flush=True)

    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "derived": data.derived,
                           "artifacts": {name: str(path) for name, path in data.artifacts.items()}},
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources(),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": data.train},
    )
    try:
        result = trainer.fit()
    finally:
        skipped = skip_summary(ledger)
        ray.kill(ledger)  # detached so every data task finds it; it must not outlive the run
        print(format_summary(skipped), flush=True)
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.name} finished without a checkpoint in {run_dir}")
    path = Path(result.checkpoint.path)
    (run_dir / "latest_checkpoint").write_text(str(path) + "\n")
    load_payload(path)  # fail here, not in evaluation, if the checkpoint is unreadable
    return path
