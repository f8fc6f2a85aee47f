"""Faults and interruptions of `sslp run`, through the CLI as a user meets them.

- A worker process killed mid-run (the SSLP_CRASH_AT_STEP fault injection: rank 0 exits at that
  step, once per invocation): without --max-failures the CLI exits 1 with one line; with it the
  run restarts the worker group from the newest checkpoint and finishes. Because loop.py
  waits until Ray has registered each reported checkpoint, the restart repeats at most
  ``train.checkpoint_every`` steps.
- Re-running a finished run neither trains nor starts Ray.
- Ctrl-C (SIGINT to the CLI) stops the run with status 130, keeps the newest checkpoint, leaves
  no Ray process behind, and the same command resumes and reaches the same final step. That
  run keeps its files in ``file://`` storage, the code path of s3:// and gs:// runs.

Each CLI call starts and stops its own local Ray cluster; this module starts none.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_run_e2e import TINY

from ssl_platform.config import load_config
from ssl_platform.train.loop import CRASH_AT_STEP_ENV
from ssl_platform.train.trainer import run_paths

pytestmark = pytest.mark.ray

EVERY = 10  # TINY's train.checkpoint_every
STEPS = 30
RUN = ("run", "simclr-digits", f"train.max_steps={STEPS}", "eval.enabled=false", "--no-dashboard", *TINY)


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ssl_platform.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def show(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def resumed_steps(stdout: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from step (\d+)", stdout)]


def checkpoint_step(path: str | Path) -> int:
    return int(torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)["step"])


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """One run name, three commands: killed at step 15 without retries; the same command with
    --max-failures 1, killed again at step 25; and once more after it finished. ``runs_dir`` is
    relative: the driver resolves it, the workers run in a directory of Ray's."""
    root = tmp_path_factory.mktemp("faults")
    args = (*RUN, "name=killed", "runs_dir=runs")
    failed = cli(*args, cwd=root, env={CRASH_AT_STEP_ENV: "15"})
    restarted = cli(*args, "--max-failures", "1", cwd=root, env={CRASH_AT_STEP_ENV: "25"})
    checkpoints = sorted(p.name for p in (root / "runs" / "killed").glob("checkpoint_*") if p.is_dir())
    metrics = (root / "runs" / "killed" / "metrics.jsonl").read_bytes()
    again = cli(*args, cwd=root)
    return root / "runs" / "killed", failed, restarted, again, (checkpoints, metrics)


def test_a_killed_worker_without_retries_fails_with_one_line(killed_runs):
    run_dir, failed, *_ = killed_runs
    assert failed.returncode == 1, show(failed)
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("sslp: training failed: worker rank 0 died"), show(failed)
    assert "--max-failures" in last and "run the same command again" in last
    assert "Training failed due to worker errors" in (run_dir / "error.log").read_text()  # the full error


def test_max_failures_restarts_from_the_newest_checkpoint(killed_runs):
    run_dir, _, restarted, *_ = killed_runs
    assert restarted.returncode == 0, show(restarted)
    # The command resumes from the failed run's checkpoint (step 10), is killed at step 25 and
    # restarts from the checkpoint it wrote at step 20: 5 steps are trained twice.
    assert resumed_steps(restarted.stdout) == [10, 20], show(restarted)
    assert 25 - 20 <= EVERY
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and checkpoint_step(summary["checkpoint"]) == STEPS
    assert Path(summary["checkpoint"]).parent == run_dir  # the relative runs_dir, resolved on the driver


def test_the_driver_prints_and_writes_a_summary(killed_runs):
    run_dir, _, restarted, *_ = killed_runs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples_per_s"] > 0 and summary["wall_time_s"] > 0 and summary["skipped_records"]["total"] == 0
    assert summary["final_loss"] == pytest.approx(
        [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["loss"])
    text = restarted.stdout[restarted.stdout.index("summary of run killed:"):]
    for line in (f"steps       {STEPS}/{STEPS}", "samples/s", f"final loss  {summary['final_loss']:.4f}",
                 "skipped 0 records", f"checkpoint  {summary['checkpoint']}"):
        assert line in text


def test_a_finished_run_is_not_trained_again(killed_runs):
    run_dir, *_, again, (checkpoints, metrics) = killed_runs
    assert again.returncode == 0, show(again)
    assert f"run killed is already complete: step {STEPS} of train.max_steps={STEPS}" in again.stdout
    assert "training simclr" not in again.stdout and "run directory" not in again.stdout  # Ray never started
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == checkpoints
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


# ----------------------------------------------------------------------------- Ctrl-C

def ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (the cluster's RAY_TMPDIR)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline[:200])
    return found


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A 60-step run in file:// storage, SIGINT once Ray has registered its first checkpoint
    (Ray's snapshot file appears), then the same command again."""
    root = tmp_path_factory.mktemp("ctrlc")
    steps = 60
    args = (*RUN, "name=ctrlc", f"runs_dir={(root / 'store').as_uri()}", f"train.max_steps={steps}")
    # Its own Ray temp dir marks this cluster's processes; short, as Ray's socket paths must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="sslp-", dir="/tmp")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "ssl_platform.cli", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshot = root / "store" / "ctrlc" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not snapshot.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    interrupted = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    leftovers, deadline = ray_processes(ray_tmp), time.monotonic() + 30
    while leftovers and time.monotonic() < deadline:  # give exiting processes a moment
        time.sleep(0.5)
        leftovers = ray_processes(ray_tmp)
    kept = sorted(checkpoint_step(p) for p in (root / "store" / "ctrlc").glob("checkpoint_*") if p.is_dir())
    resumed = cli(*args, cwd=root)
    yield root / "store" / "ctrlc", steps, interrupted, leftovers, kept, resumed
    shutil.rmtree(ray_tmp, ignore_errors=True)
    shutil.rmtree(run_paths(load_config("simclr-digits", [f"runs_dir={(root / 'store').as_uri()}", "name=ctrlc"])).local,
                  ignore_errors=True)  # the driver's staging directory of a URI run


def test_ctrl_c_stops_cleanly_and_keeps_the_newest_checkpoint(interrupted_run):
    store, steps, interrupted, leftovers, kept, _ = interrupted_run
    assert interrupted.returncode == 130, show(interrupted)
    assert interrupted.stderr.strip().splitlines()[-1].startswith("sslp: interrupted; the newest checkpoint stays in")
    assert leftovers == []  # the local cluster the CLI started is gone, workers included
    assert kept and EVERY <= max(kept) < steps


def test_the_same_command_resumes_an_interrupted_run(interrupted_run):
    store, steps, _, _, kept, resumed = interrupted_run
    assert resumed.returncode == 0, show(resumed)
    # From the newest checkpoint Ray had registered when Ctrl-C came; a newer directory whose
    # registration the abort cut short may lie beside it, unused.
    [start] = resumed_steps(resumed.stdout)
    assert start in kept and start >= EVERY
    summary = json.loads((store / "summary.json").read_text())
    assert summary["steps"] == steps and summary["checkpoint"].startswith("file://")
    assert checkpoint_step(summary["checkpoint"].removeprefix("file://")) == steps
    # The driver's and rank 0's files reached the storage, not only the local staging directory.
    assert (store / "config.yaml").is_file()
    logged = [json.loads(r)["step"] for r in (store / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == 2 and logged[-1] == steps  # rows of both invocations
