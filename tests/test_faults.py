"""Faults and interruptions of `sslp run`, through the CLI as a user meets them.

- A worker process killed mid-run: without --max-failures the CLI exits 1 with one line; with
  it the run restarts the worker group from the newest checkpoint and finishes, whether the
  worker died by itself (the SSLP_CRASH_AT_STEP fault injection: rank 0 calls ``os._exit`` at
  that step, once per invocation) or was killed from outside (SIGKILL of its pid, as a node's
  OOM killer does). Because loop.py waits until Ray has registered each reported checkpoint, a
  restart repeats at most ``train.checkpoint_every`` steps, and metrics.jsonl still holds every
  step exactly once.
- Whatever the interruptions, the run is the uninterrupted one: in float64
  (``train.precision=fp64``, where 1 and 2 ranks differ only by summation order, ~1e-15) every
  logged loss of the twice-restarted 2-worker run equals, to 1e-9, the loss of the same run
  never interrupted, on one rank in local mode (float32's rounding, which training amplifies,
  would hide a wrong record or view: README Resume).
- Re-running a finished run neither trains nor starts Ray.
- Ctrl-C (SIGINT to the CLI) stops the run with status 130, keeps the newest checkpoint, leaves
  no Ray process behind, and the same command resumes and reaches the same final step. That
  run keeps its files in ``file://`` storage, the code path of s3:// and gs:// runs.

The runs are jobs on the session's Ray head (conftest.sslp), except the one interrupted with
Ctrl-C, which starts (and must take down) a local cluster of its own.
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
from conftest import show
from test_run_e2e import TINY

from ssl_platform import cli
from ssl_platform.config import load_config
from ssl_platform.train.loop import CRASH_AT_STEP_ENV, STEP_DELAY_ENV
from ssl_platform.train.storage import run_paths

pytestmark = pytest.mark.ray

EVERY = 10  # TINY's train.checkpoint_every
STEPS = 40
RUN = ("run", "simclr-digits", f"train.max_steps={STEPS}", "eval.enabled=false", *TINY, "train.log_every=1",
       "train.precision=fp64")


def resumed_steps(stdout: str) -> list[int]:
    """The step of each resume rank 0 announced (the summary's indented `resume` line repeats the last)."""
    return [int(s) for s in re.findall(r"^resumed from step (\d+)", stdout, flags=re.MULTILINE)]


def checkpoint_step(path: str | Path) -> int:
    return int(torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)["step"])


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_worker_pids(temp_dir: str) -> list[int]:
    """Pids of the live Ray Train worker processes of the cluster whose temp dir is ``temp_dir``
    (their title names the actor; their environment, the raylet that started them). Another
    cluster's workers on the machine (pytest-xdist runs two sessions) are left alone."""
    procs = [p for p in Path("/proc").glob("[0-9]*") if p.name.isdigit()]

    def cmdline(proc: Path) -> bytes:
        try:
            return (proc / "cmdline").read_bytes()
        except OSError:
            return b""

    raylets = {p.name for p in procs if b"raylet" in cmdline(p).split(b"\0")[0] and temp_dir.encode() in cmdline(p)}
    pids = []
    for proc in procs:
        if not cmdline(proc).startswith(b"ray::RayTrainWorker"):
            continue
        try:
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"RAY_RAYLET_PID", b"").decode() in raylets:
            pids.append(int(proc.name))
    return pids


def wait_for(condition, what: str, seconds: float = 300) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` if it never is (never hang)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def killed_runs(sslp, tmp_path_factory):
    """One run name, three commands: killed at step 15 without retries; the same command with
    --max-failures 2, where rank 0 dies by itself at step 25 and, once the group has restarted
    from step 20, a worker is SIGKILLed from outside (each step of that command sleeps 0.25 s, so
    the kill lands while the run still trains: its last 20 steps took 2 s); and once more after
    it finished.
    ``runs_dir`` is relative: the driver resolves it, the workers run in a directory of Ray's."""
    root = tmp_path_factory.mktemp("faults")
    run_dir = root / "runs" / "killed"
    args = (*RUN, "name=killed", "runs_dir=runs")
    failed = sslp(*args, cwd=root, env={CRASH_AT_STEP_ENV: "15"})

    log = root / "restarted.log"
    proc = sslp.popen(*args, "--max-failures", "2", cwd=root, log=log,
                      env={CRASH_AT_STEP_ENV: "25", "PYTHONUNBUFFERED": "1", STEP_DELAY_ENV: "0.25"})
    try:
        wait_for(lambda: resumed_steps(log.read_text())[1:] or proc.poll() is not None,
                 "the restart after the crash at step 25")
        wait_for(lambda: train_worker_pids(sslp.head.temp_dir) or proc.poll() is not None, "a live train worker")
        killed = train_worker_pids(sslp.head.temp_dir)[:1]
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        returncode = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    restarted = subprocess.CompletedProcess(proc.args, returncode, log.read_text(), "")
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    return run_dir, failed, restarted, killed, (checkpoints, metrics)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory) -> list[tuple[int, float]]:
    """The killed run's (step, loss) never interrupted: local mode, one rank holding the global
    batch, in this process (the cheapest run that is never interrupted)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main([*RUN, "name=ref", f"runs_dir={root}", "scaling.num_workers=0"]) == 0
    return [(r["step"], r["loss"]) for r in map(json.loads, (root / "ref" / "metrics.jsonl").read_text().splitlines())]


def test_a_killed_worker_without_retries_fails_with_one_line(killed_runs):
    run_dir, failed, *_ = killed_runs
    assert failed.returncode == 1, show(failed)
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("sslp: training failed: worker rank 0 died"), show(failed)
    assert "--max-failures" in last and "run the same command again" in last
    assert str(run_dir / "ray.log") in last  # where Ray's own lines of the failure are
    assert "Training failed due to worker errors" in (run_dir / "error.log").read_text()  # the full error


def test_max_failures_survives_a_crash_and_an_outside_kill_from_the_newest_checkpoint(killed_runs):
    run_dir, _, restarted, killed, _ = killed_runs
    assert killed, "no train worker was alive to kill"
    assert restarted.returncode == 0, show(restarted)
    # The command resumes from the failed run's checkpoint (step 10); rank 0 dies at step 25 and
    # the group restarts from the checkpoint of step 20 (5 steps trained twice); the outside kill
    # comes during that attempt, whose newest checkpoint is then at most one interval old.
    first, second, third = resumed_steps(restarted.stdout)
    assert (first, second) == (10, 20), show(restarted)
    # Step 15's crash came before it was logged: steps 11-14 are trained again, and said so.
    assert "resumed from step 10, epoch 0 record 640: 4 steps repeated" in restarted.stdout, show(restarted)
    assert third in range(20, STEPS, EVERY), show(restarted)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and checkpoint_step(summary["checkpoint"]) == STEPS
    assert Path(summary["checkpoint"]).parent == run_dir  # the relative runs_dir, resolved on the driver


def test_metrics_hold_every_step_once_after_the_failures(killed_runs):
    run_dir, *_ = killed_runs
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))


def test_every_logged_loss_is_the_uninterrupted_runs(killed_runs, uninterrupted):
    """Three interruptions (the failed command at step 15, the crash at 25, the outside kill), each
    resumed from a checkpoint mid-way through an epoch (22 steps of 64 digits): every step's loss
    is the one the run makes uninterrupted on one rank."""
    run_dir, *_ = killed_runs
    got = [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert [s for s, _ in got] == [s for s, _ in uninterrupted] == list(range(1, STEPS + 1))
    for (step, want), (_, loss) in zip(uninterrupted, got, strict=True):
        assert loss == pytest.approx(want, rel=1e-9, abs=0), f"step {step}"


def test_the_driver_prints_and_writes_a_summary(killed_runs):
    run_dir, _, restarted, *_ = killed_runs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples_per_s"] > 0 and summary["wall_time_s"] > 0 and summary["skipped_records"]["total"] == 0
    assert summary["final_loss"] == pytest.approx(
        [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["loss"])
    text = restarted.stdout[restarted.stdout.index("summary of run killed:"):]
    for line in (f"steps       {STEPS}/{STEPS}", "samples/s", f"final loss  {summary['final_loss']:.4f}",
                 "skipped 0 records", f"checkpoint  {summary['checkpoint']}", "restarts    2",
                 # rank 0 dies at step 25, before logging it; the group resumes from the checkpoint of step 20
                 ("worker rank 0 died (its process exited or was killed) after step 24; restarted from the "
                 "checkpoint of step 20, 4 logged step(s) repeated")):
        assert line in text, show(restarted)
    assert len(summary["restarts"]) == 2 and " died " in summary["restarts"][1]  # the outside kill


def test_a_finished_run_is_not_trained_again(killed_runs, capsys, monkeypatch):
    import ray

    run_dir, *_, (checkpoints, metrics) = killed_runs
    monkeypatch.chdir(run_dir.parent.parent)  # runs_dir=runs is relative to it

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a finished run")

    monkeypatch.setattr(ray, "init", no_ray)
    assert cli.main([*RUN, "name=killed", "runs_dir=runs"]) == 0
    out = capsys.readouterr().out
    assert f"run killed is already complete: step {STEPS} of train.max_steps={STEPS}" in out
    assert "training simclr" not in out and "run directory" not in out
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
def interrupted_run(sslp, tmp_path_factory):
    """A 30-step run in file:// storage on a local cluster of its own, SIGINT once Ray has
    registered its first checkpoint (Ray's snapshot file appears), then the same command again
    (on the session's head: where it runs does not matter to the resume)."""
    root = tmp_path_factory.mktemp("ctrlc")
    steps = 30
    args = (*RUN, "name=ctrlc", f"runs_dir={(root / 'store').as_uri()}", f"train.max_steps={steps}")
    # Its own Ray temp dir marks this cluster's processes; short, as Ray's socket paths must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="sslp-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}  # no RAY_ADDRESS (see conftest): a local cluster
    proc = subprocess.Popen([sys.executable, "-m", "ssl_platform.cli", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshot = root / "store" / "ctrlc" / "checkpoint_manager_snapshot.json"
    try:
        wait_for(lambda: snapshot.exists() or proc.poll() is not None, "the first registered checkpoint")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    leftovers, deadline = ray_processes(ray_tmp), time.monotonic() + 180
    while leftovers and time.monotonic() < deadline:  # exiting processes may take a while on a busy machine
        time.sleep(0.5)
        leftovers = ray_processes(ray_tmp)
    kept = sorted(checkpoint_step(p) for p in (root / "store" / "ctrlc").glob("checkpoint_*") if p.is_dir())
    resumed = sslp(*args, cwd=root)
    yield root / "store" / "ctrlc", steps, interrupted, leftovers, kept, resumed
    shutil.rmtree(ray_tmp, ignore_errors=True)
    staging = run_paths(load_config("simclr-digits", [f"runs_dir={(root / 'store').as_uri()}", "name=ctrlc"])).local
    shutil.rmtree(staging, ignore_errors=True)  # the driver's staging directory of a URI run


def test_ctrl_c_stops_cleanly_and_keeps_the_newest_checkpoint(interrupted_run):
    _store, steps, interrupted, leftovers, kept, _ = interrupted_run
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
    # Rows of both invocations, every step exactly once: the steps after the checkpoint it
    # resumed from were logged by the interrupted run and dropped when they were trained again.
    assert logged_steps(store) == list(range(1, steps + 1))
