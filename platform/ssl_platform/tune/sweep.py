"""``sslp sweep``: a Ray Tune search over any config key, one multi-worker training run per trial.

The Train V2 pattern: each trial is a function trainable (:func:`run_trial`) that loads the
base config with the trial's values and calls :func:`ssl_platform.train.trainer.fit` with a
``TuneReportCallback`` (:class:`ssl_platform.tune.asha.ReportAndObey`), so every report of
rank 0 (``step``, ``loss`` at checkpoints, the ``val_*`` online metrics) reaches Tune. ASHA
stops trials early on the sweep's metric, with ``time_attr="step"`` (the step the loop
reports); a stopped trial shuts its own training run down (see tune/asha.py for why).

Where a sweep lives, ``RUNS_DIR/NAME`` (RUNS_DIR from the base config):

    sweep.yaml       the resolved sweep (command-line overrides applied)
    tune/            Ray Tune's experiment state (what ``Tuner.restore`` reads)
    trials/TRIAL_ID/ each trial's run directory: config.yaml, metrics.jsonl, checkpoints
    trials.md, trials.csv, best.yaml, metric_vs_KEY.png, curves.png   (see tune/report.py)

Resources. A Train V2 run schedules its own workers and its controller holds no CPU, so a trial
driver that reserved the default 1 CPU would only take it away from the data pipeline (on 2
cores: 1 CPU for the driver + 2 workers x 0.5 leaves nothing for Ray Data, which hangs). The
trainable therefore reserves memory only, and ``max_concurrent_trials: auto`` runs as many
trials at once as the cluster holds: its CPUs (and GPUs) // one trial's train workers plus
``scaling.data_cpus``. A larger explicit value makes later trials wait for resources (at most
``scaling.wait_for_resources_s``).

Resume. Interrupting (Ctrl-C) saves Tune's state; running the same command again restores it
(``Tuner.restore(resume_unfinished=True, resume_errored=True)``): finished trials are kept,
an interrupted trial resumes its training run from its newest checkpoint. Re-running a sweep
that finished prints its table. A different sweep under the same name is refused.

What it shows: the sweep's header, one live table of the trials (tune/live.py) instead of Tune's
status dumps, and the final table (trials.md). Everything Ray, Tune and the trials print goes to
the sweep directory's ray.log (also to the console with ``--verbose``); an error still reaches
the console, with that file's path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from ssl_platform.command import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, failure_line
from ssl_platform.config import ConfigError, from_dict
from ssl_platform.tune.spec import SweepSpec, concurrent_trials, list_sweeps, load_sweep, trial_raw, trial_resources

__all__ = ["list_sweeps", "run_sweep"]

SPEC_FILE, STATE_FILE, TUNE_DIR, TRIALS_DIR, LOG_FILE = "sweep.yaml", "sweep.json", "tune", "trials", "ray.log"
# What a trial's driver (this trainable) holds: memory for its process, no CPU (see above).
DRIVER_MEMORY = 256 * 1024**2


def sweep_dir(spec: SweepSpec) -> Path:
    return Path(spec.base.runs_dir).expanduser().resolve() / spec.name


def run_sweep(spec: str, overrides: list[str], *, address: str | None = None, dashboard: bool = True,
              verbose: bool = False) -> int:
    """``sslp sweep SWEEP_OR_YAML [key=value ...]``. Returns the exit status: 0 all trials done,
    1 a trial failed (the others' results are still written), 2 a config or resource error,
    130 interrupted (run the same command again to resume). ``verbose``: also show what Ray prints."""
    try:
        sweep = load_sweep(spec, overrides)
        where = sweep_dir(sweep)
        done = _previous_run(sweep, where)
    except ConfigError as e:
        print(f"sslp: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if done:
        print(f"sweep {sweep.name} is already complete ({done['trials']} trials); its results:\n", flush=True)
        print((where / "trials.md").read_text(), flush=True)
        print(f"sweep directory: {where}; use a new name= to sweep again", flush=True)
        return EXIT_OK

    import ray

    from ssl_platform.train.console import Console
    from ssl_platform.train.resources import cluster_nodes, plan_workers
    from ssl_platform.train.session import ResourceError, init_ray

    started = not ray.is_initialized()
    # The trials' own lines (each run's header and progress) go to the log with Ray's: the table shows them.
    # A caller's own Ray connection (a notebook) keeps its output as it is: no console then.
    console = Console(verbose=verbose, show_workers=False) if started else None
    if console is not None:
        console.log_to(where / LOG_FILE)
    try:
        url = init_ray(address, dashboard=dashboard, console=console)
        if url:
            print(f"Ray dashboard: {url}", flush=True)
        plan = plan_workers(sweep.base, cluster_nodes(sweep.base))
        per_trial = trial_resources(plan.cpus_per_worker, plan.num_workers, plan.use_gpu, sweep.base.scaling.data_cpus)
        concurrent = concurrent_trials(per_trial, ray.cluster_resources(), sweep.max_concurrent_trials)
        print(f"sweep {sweep.name}: {sweep.num_trials} trials of {sweep.base.method.name} from {sweep.preset}, "
              f"{concurrent} at a time (each: {plan.num_workers} workers x {plan.resources()} + "
              f"{sweep.base.scaling.data_cpus:g} data CPUs); ASHA on {sweep.metric} ({sweep.mode}) by step, "
              f"grace {sweep.grace_period}, reduction {sweep.reduction_factor:g}, max {sweep.max_steps}", flush=True)
        print(f"sweep directory: {where} (Ray's log: {LOG_FILE})", flush=True)
        # Tune prints its header box in this process at any verbosity: into the log.
        with contextlib.redirect_stdout(console.as_ray_output()) if console else contextlib.nullcontext():
            results, interrupted = _tune(sweep, where, concurrent)
    except ResourceError as e:
        print(f"sslp: resources: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before Tune took over Ctrl-C (it turns it into a saved, stopped sweep)
        print(f"\nsslp: interrupted; run the same command again to resume sweep {sweep.name}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # Tune's or Ray's own failure: one line here, the traceback in the log
        if console is None:
            raise
        message = failure_line(e, console)
        _leave_ray(started, console)
        print(message, file=sys.stderr)
        return EXIT_FAILED
    finally:
        _leave_ray(started, console)
    return _finish(sweep, where, results, interrupted)


def _leave_ray(started: bool, console) -> None:
    """Shut down the cluster this sweep started, then give the console back (idempotent)."""
    import ray

    if started and ray.is_initialized():
        ray.shutdown()
    if console is not None:
        console.uninstall()


def _previous_run(sweep: SweepSpec, where: Path) -> dict | None:
    """Refuse a different sweep under this name; the saved state when this one already finished."""
    saved = where / SPEC_FILE
    if saved.is_file():
        before = yaml.safe_load(saved.read_text())
        if before != _plain(sweep.to_dict()):
            now = _plain(sweep.to_dict())
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(f"sweep {sweep.name} in {where} was started with different settings "
                              f"({', '.join(changed)}); run it with the same ones to resume, or set a new name=")
    else:
        where.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(_plain(sweep.to_dict()), sort_keys=False))
    state = where / STATE_FILE
    if state.is_file() and (where / "trials.md").is_file():
        info = json.loads(state.read_text())
        return info if info.get("complete") else None
    return None


def _plain(value):
    """YAML-round-trip form (tuples as lists) so that saved and new specs compare equal."""
    return yaml.safe_load(yaml.safe_dump(value))


def _tune(sweep: SweepSpec, where: Path, concurrent: int):
    from ray import tune

    from ssl_platform.train.console import say
    from ssl_platform.tune.asha import GracefulASHA
    from ssl_platform.tune.live import TrialTable

    # A checkpoint reported before the first online evaluation (or the first logged loss) lacks
    # the metric; ASHA skips such results, Tune's strict check would fail the trial.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=sweep.base.to_dict(), trials_dir=str(where / TRIALS_DIR)),
        {"CPU": 0, "memory": DRIVER_MEMORY})
    experiment = str(where / TUNE_DIR)
    if tune.Tuner.can_restore(experiment):
        say(f"resuming sweep {sweep.name} from {experiment}: finished trials are kept")  # stdout is the log here
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.param_space(),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                max_concurrent_trials=concurrent,
                # Rungs strictly before the last step; trials stopped by their own run (tune/asha.py).
                scheduler=GracefulASHA(str(where / TRIALS_DIR), time_attr="step", max_t=sweep.max_steps - 1,
                                       grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor,
                                       stop_last_trials=False),
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            # verbose=0: no status dumps from Tune; the trial table (tune/live.py) shows the trials.
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(where), verbose=0,
                                      callbacks=[TrialTable(sweep)]),
        )
    return _fit_noting_ctrl_c(tuner)


def _fit_noting_ctrl_c(tuner):
    """``tuner.fit()`` and whether it ended on Ctrl-C. Tune's SIGINT handler saves the handler
    it replaces and puts it back on the first Ctrl-C only; an interrupted trial may then count
    as errored, so the trial statuses alone cannot tell an interruption from a failure."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def second_ctrl_c(sig, frame):  # what Tune restores after the first Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, second_ctrl_c)
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is second_ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


def trial_name(trial) -> str:
    """Trial and directory name: Tune's trial id (also the trial's run name)."""
    return trial.trial_id


def run_trial(values: dict, *, base: dict, trials_dir: str) -> None:
    """One trial: the base config with ``values``, trained with fit(); rank 0's reports reach Tune.
    A trial whose run already reached train.max_steps (it finished just before an interruption)
    is not trained again: its last metrics are reported from its metrics.jsonl."""
    from ray import tune

    from ssl_platform import methods
    from ssl_platform.train.metrics import read_metrics
    from ssl_platform.train.storage import METRICS_FILE, completed_run, run_paths
    from ssl_platform.train.trainer import fit
    from ssl_platform.tune.asha import ReportAndObey, decision_path, read_decision

    trial_id = tune.get_context().get_trial_id()
    cfg = methods.validate(from_dict(trial_raw(base, values, name=trial_id, runs_dir=trials_dir)))
    paths = run_paths(cfg)
    done = completed_run(paths, cfg.train.max_steps)
    if done:
        last: dict = {}
        for row in read_metrics(paths.local / METRICS_FILE):
            last.update(row)
        tune.report({**last, "step": done["steps"]})
        return
    decisions = decision_path(trials_dir, trial_id)
    try:
        fit(cfg, paths, callbacks=[ReportAndObey(str(decisions))])
    except Exception:
        decision = read_decision(decisions)
        if decision and decision["stop"]:  # our own abort: ASHA stopped this trial
            print(f"trial {trial_id} stopped early by ASHA at step {decision['stopped_at']}", flush=True)
            return
        raise


def _finish(sweep: SweepSpec, where: Path, results, interrupted: bool) -> int:
    from ssl_platform.tune.report import FAILED, best_row, trial_rows, write_report

    # Terminated: ran to its end or stopped by ASHA. Trials not yet created do not appear at all.
    if interrupted or results.num_terminated + results.num_errors < sweep.num_trials:
        finished = results.num_terminated
        print(f"\nsslp: sweep interrupted after {finished} of {sweep.num_trials} trials; run the same command again "
              f"to resume (finished trials are kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    rows = trial_rows(results, sweep)
    files = write_report(where, rows, sweep)
    best = best_row(rows)
    failed = [r for r in rows if r.status == FAILED]
    (where / STATE_FILE).write_text(json.dumps({
        "complete": not failed, "trials": len(rows), "metric": sweep.metric, "mode": sweep.mode,
        "best": best.trial if best else None, "best_metric": best.metric if best else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2) + "\n")
    print("\n" + files["trials.md"].read_text(), flush=True)
    print(f"sweep directory: {where} (trials.md, trials.csv, {'best.yaml, ' if best else ''}plots)", flush=True)
    if failed:
        print(f"sslp: {len(failed)} trial(s) failed ({failed[0].trial}: {failed[0].error}); their run directories "
              f"are in {where / TRIALS_DIR}, Ray's log in {where / LOG_FILE}; run the same command again to retry "
              f"them", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
