"""Driver side of a training run: :func:`fit` builds the data, runs the TorchTrainer, turns a
failed worker into a one-line error and Ctrl-C into KeyboardInterrupt, and writes the summary.

Re-running the same name resumes from the newest checkpoint (``RunConfig(name, storage_path)``);
a run whose summary.json says it reached ``train.max_steps`` is not trained again. A worker that
dies restarts the worker group from the newest checkpoint ``--max-failures`` times (tests kill
rank 0 once at step N with ``SSLP_CRASH_AT_STEP=N``); Ctrl-C lets Ray abort the workers, keeps
the registered checkpoints and raises KeyboardInterrupt.

Around it: Ray start-up and the errors (``train.session``), where a run lives (``train.storage``),
resource planning (``train.resources``) and what runs on each worker (``train.worker``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ssl_platform import methods
from ssl_platform.config import ExperimentConfig, save_yaml, worker_counts
from ssl_platform.data.labelled import check_eval_data
from ssl_platform.data.online import online_split
from ssl_platform.data.ordered import fingerprint_change
from ssl_platform.data.pipeline import pretraining_data
from ssl_platform.data.skips import (
    NAMESPACE,
    SkipReporter,
    format_summary,
    get_or_create_ledger,
    ledger_name,
    on_this_node,
    skip_summary,
)
from ssl_platform.train import console, local_mode
from ssl_platform.train.checkpoint import saved_position
from ssl_platform.train.elastic import ElasticRangeError, ElasticTorchTrainer
from ssl_platform.train.loop import CRASH_AT_STEP_ENV, accumulation_words
from ssl_platform.train.metrics import data_advice, data_bound, format_duration, format_spill
from ssl_platform.train.preemption import Preempted, sigterm_checkpoints, stop_flag, stop_flag_name
from ssl_platform.train.resources import (
    PLACEMENT_TIMEOUT_S,
    WorkerPlan,
    cluster_nodes,
    plan_workers,
    wait_for_free_resources,
)
from ssl_platform.train.resume import inexact_resume, resume_line
from ssl_platform.train.session import DataError, ResourceError, TrainingFailed, spilled_bytes
from ssl_platform.train.storage import (
    CONFIG_FILE,
    ERROR_FILE,
    SUMMARY_FILE,
    RunPaths,
    copy_to_storage,
    remove_run_file,
)
from ssl_platform.train.worker import OneShot, pack_dir, train_worker


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
    data_wait_fraction: float | None = None  # steady-state share of the training time spent waiting for data
    data_advice: str = ""  # what to give a data-bound run
    spilled_bytes: int | None = None  # object store -> disk during this fit(), cluster-wide; None: unknown
    restarts: list[str] = field(default_factory=list)  # one line per worker-group restart: cause, steps repeated
    workers: list[int] = field(default_factory=list)  # the workers of each attempt of this fit(), in order
    elastic: str = ""  # an elastic run's scaling.num_workers, "[MIN, MAX]"; "" for a fixed count
    resumed: str = ""  # what the last resume of this fit() cost (train.loop.resume_line), "" if it started fresh

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
            *([f"  data wait   {self.data_wait_fraction:.0%} of training time"
               + (f" ({bound})" if (bound := data_bound(self.data_wait_fraction, self.data_advice)) else "")]
              if self.data_wait_fraction is not None else []),
            f"  final loss  {loss}",
            *([f"  resume      {self.resumed}"] if self.resumed else []),
            *([(f"  workers     {' -> '.join(map(str, self.workers))} (one count per attempt; elastic "
                f"scaling.num_workers={self.elastic})")] if self.elastic and self.workers else []),
            f"  restarts    {len(self.restarts) or 'none'}",
            *(f"    {line}" for line in self.restarts),
            f"  data        {format_summary(self.skipped_records)}",
            *([f"  spill       {format_spill(self.spilled_bytes)}"] if self.spilled_bytes is not None else []),
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
    t0, spilled_before = time.time(), spilled_bytes()
    paths.local.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, paths.local / CONFIG_FILE)
    remove_run_file(paths, SUMMARY_FILE)  # not complete again until this fit says so
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
    try:  # refuse an inexact resume now, before any worker starts
        check_exact_resume(cfg, paths, data.ordered.fingerprint(cfg.train.batch_size))
    except ValueError as e:
        ray.kill(ledger)
        raise DataError(str(e)) from None
    ranks = max(1, worker_counts(cfg)[-1])  # an elastic run's largest count: the fewest records per worker
    local_batch = cfg.train.batch_size // ranks
    if data.num_records // ranks < local_batch:
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
    console.say(f"training {cfg.method.name} on {data.description}: {plan.describe()}, "
                f"global batch {cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.effective_lr()[1]}"
                f"{f', beta2 {cfg.train.adam_beta2:g}' if cfg.train.optimizer == 'adamw' else ''}"
                f"{describe_accumulation(cfg)}")
    shown = console.active()
    first_event = len(shown.events) if shown else 0  # this fit's events: attempts and failures

    crash_token = _crash_token(cfg.name)  # the actor handle (it keeps the actor alive), or None
    token_name = _crash_token_name(cfg.name) if crash_token is not None else None
    stop = stop_flag(cfg.name)  # SIGTERM raises it; the workers checkpoint their step and stop
    trainer = _trainer(cfg, paths, plan, data, token_name, max_failures, callbacks or [], online, build,
                       stop_flag_name(cfg.name))
    try:
        with _ray_sigint_as_keyboard_interrupt(), sigterm_checkpoints(stop) as sigterm:
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
        if shown:
            shown.end_progress()
        skipped = skip_summary(ledger)
        ray.kill(ledger)  # detached so every data task finds it; it must not outlive the run
        if crash_token is not None:
            ray.kill(crash_token)
        ray.kill(stop)
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.name} finished without a checkpoint in {paths.uri}")
    step = int((result.metrics or {}).get("step", cfg.train.max_steps))
    if sigterm and step < cfg.train.max_steps:
        raise Preempted(f"stopped on SIGTERM at step {step} of {cfg.train.max_steps} with a checkpoint of that step "
                        f"({result.checkpoint.path}); run the same command again to resume run {cfg.name}, "
                        f"repeating no step")

    summary = _summarize(cfg, paths, result, skipped, t0)
    spilled_after = spilled_bytes()
    if spilled_before is not None and spilled_after is not None:
        summary.spilled_bytes = spilled_after - spilled_before
    events = shown.events[first_event:] if shown else []
    summary.restarts = restart_lines(events)
    summary.workers = [e["workers"] for e in events if e["kind"] == "start" and "workers" in e]
    summary.elastic = str(cfg.scaling.num_workers) if cfg.scaling.elastic else ""
    (paths.local / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    copy_to_storage(paths, SUMMARY_FILE)
    return summary


def _trainer(cfg: ExperimentConfig, paths: RunPaths, plan: WorkerPlan, data, crash_token: str | None,
             max_failures: int, callbacks: list, online_split_ref: ray.ObjectRef | None = None,
             build=None, stop: str | None = None) -> TorchTrainer:
    # An elastic run: Ray Train's elastic scaling on the counts that split the global batch (train.elastic).
    elastic = {"policy": {"sizes": plan.sizes, "cpus_per_worker": plan.cpus_per_worker, "use_gpu": plan.use_gpu,
                          "data_cpus": cfg.scaling.data_cpus, "wait_s": cfg.scaling.wait_for_resources_s,
                          "max_steps": cfg.train.max_steps}} if plan.sizes else {}
    return (ElasticTorchTrainer if plan.sizes else TorchTrainer)(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(), "run_dir": str(paths.local), "derived": data.derived,
            "storage_uri": paths.uri if paths.remote else None, "crash_token": crash_token,
            "artifacts": {name: str(path) for name, path in data.artifacts.items()},
            "artifact_files": {name: pack_dir(Path(path)) for name, path in data.artifacts.items()},
            "online_split": online_split_ref, "build": build, "local": plan.num_workers == 0,
            "stop_flag": stop,  # the named actor SIGTERM raises (train.preemption)
            "ordered": data.ordered,  # each worker reads its ids of the epoch's order
            "resume_from": local_mode.resume_point(paths.uri if paths.remote else str(paths.local),
                                                   local=plan.num_workers == 0),
        },
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(plan.sizes[0], plan.sizes[-1]) if plan.sizes else plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources() if plan.num_workers else None,
            placement_strategy=cfg.scaling.placement_strategy,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=paths.storage,
            callbacks=[*callbacks, _FailureEvents()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures,
                controller_failure_limit=max(1, math.ceil(cfg.scaling.wait_for_resources_s / PLACEMENT_TIMEOUT_S))),
        ),
        **elastic,
    )


def check_exact_resume(cfg: ExperimentConfig, paths: RunPaths, fingerprint: dict) -> None:
    """With ``train.resume=exact``, a ValueError (one line, what changed) when the checkpoint this
    run would resume from was written for other data, seed or batch size (what the loop checks
    again on every worker, here before the workers start)."""
    newest = local_mode.resume_point(paths.uri if paths.remote else str(paths.local), local=True)
    if newest is None or cfg.train.resume != "exact":
        return
    position = saved_position(newest)
    change = fingerprint_change(position["data"] if position else None, fingerprint)
    if change:
        raise ValueError(inexact_resume(cfg.name, position["step"] if position else None, change))


def _crash_token_name(run: str) -> str:
    return f"sslp-crash-{run}"


def _crash_token(run: str) -> ray.actor.ActorHandle | None:
    """The once-only token of the fault injection, when the driver's environment sets it."""
    if CRASH_AT_STEP_ENV not in os.environ:
        return None
    return OneShot.options(name=_crash_token_name(run), namespace=NAMESPACE, get_if_exists=True,
                           scheduling_strategy=on_this_node()).remote()


def describe_accumulation(cfg: ExperimentConfig) -> str:
    """", k micro-batches a step (how they combine)" for the run header; "" without accumulation."""
    k = cfg.train.grad_accum_steps
    if k == 1:
        return ""
    import torch

    from ssl_models.distributed import has_batchnorm

    with torch.device("meta"):  # the architecture alone: no memory, no initialisation cost
        batchnorm = has_batchnorm(methods.build(cfg, **methods.expected_derived(cfg)))
    return f", {k} micro-batches a step" + accumulation_words(cfg.train.grad_accum_mode, k,
                                                               methods.method_spec(cfg.method.name), batchnorm)


class _FailureEvents(ray.train.UserCallback):
    """On the Ray Train controller: each worker failure, as an event for the driver's summary."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        console.event("failure", workers={int(rank): describe_failure(rank, exc)
                                          for rank, exc in sorted(worker_exceptions.items())})


def describe_failure(rank: int, exc: BaseException) -> str:
    """"worker rank 1 died (its process exited or was killed)", or the error's last line."""
    died = (exc, getattr(exc, "health_check_failure", None))  # a dead process fails the health check
    if any(isinstance(e, ray.exceptions.RayActorError) for e in died):
        return f"worker rank {rank} died (its process exited or was killed)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"worker rank {rank}: {lines[-1] if lines else type(exc).__name__}"


def restart_lines(events: list[dict]) -> list[str]:
    """One line per restart of the worker group, from the events of one fit (``train.console``):
    an attempt's ``start`` (its step, its workers, and the last step logged before it) after a
    ``failure``, or without one when an elastic run's group grew (``train.elastic``)."""
    lines, cause, attempts, workers, failed = [], "the worker group restarted", 0, None, False
    for e in events:
        if e["kind"] == "failure":  # a worker that died takes the others' collectives down with it
            died = [what for what in e["workers"].values() if " died " in what]
            cause = "; ".join(died or list(e["workers"].values())[:1]) or cause
            failed = True
        elif e["kind"] == "start":
            attempts += 1
            now = e.get("workers")
            if attempts > 1:
                reached, step = e.get("reached"), e["step"]
                if not failed and now is not None and workers is not None and now > workers:
                    cause = f"the cluster had room for {now} workers"  # an elastic run grew
                after = f" after step {reached}" if reached is not None else ""
                repeated = f", {reached - step} logged step(s) repeated" if (reached or 0) > step else ""
                on = f" on {now} worker{'s' * (now != 1)}" if now is not None and now != workers else ""
                lines.append(f"{cause}{after}; restarted from the checkpoint of step {step}{on}{repeated}")
            cause, workers, failed = "the worker group restarted", now, False
    return lines


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
        what = describe_failure(*min(failures.items()))
    else:
        cause = getattr(error, "controller_failure", error)
        if isinstance(cause, ElasticRangeError):
            return f"{cause}; run the same command again to resume run {cfg.name} from its newest checkpoint"
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
            return (f"the train workers could not be placed within {cfg.scaling.wait_for_resources_s:g} s (other jobs "
                    f"hold the resources, or a node left); raise scaling.wait_for_resources_s or lower "
                    f"scaling.num_workers")
        first = str(cause).splitlines()[0] if str(cause) else ""
        what = f"the Ray Train controller failed: {type(cause).__name__}: {first}"
    retries = (f"after {max_failures} restart(s)" if max_failures else
               "pass --max-failures N to restart from the newest checkpoint automatically")
    shown = console.active()
    logs = f" (Ray's log: {shown.log_path})" if shown and shown.log_path else ""
    return (f"{what}; full error in {paths.local / ERROR_FILE}{logs}; {retries}; run the same command again to "
            f"resume run {cfg.name} from its newest checkpoint")


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
        data_wait_fraction=m.get("data_wait_fraction"), data_advice=data_advice(cfg),
        resumed=resume_line(m) if "resumed_step" in m else "",
    )
