"""`sslp submit` against a real head node: a run that succeeds, a job that fails, and refusals
that submit nothing.

The module starts a head of its own with the dashboard, which serves the Jobs API (the
session's head runs without it; conftest.start_head: `ray start --head` on 127.0.0.1, every port
picked free, the session's token); jobs run `python` from this virtual environment.
"""

from pathlib import Path

import pytest
import torch
from conftest import free_ports, start_head, stop_head, wait_for_head
from ray.job_submission import JobSubmissionClient

from ssl_platform.cli import main as sslp
from ssl_platform.submit import token_header

pytestmark = pytest.mark.ray

# A few steps of a tiny SimCLR, one worker, no evaluation: what matters here is the job around it.
TINY = ["train.max_steps=3", "train.batch_size=16", "train.log_every=1", "train.warmup_steps=0",
        "scaling.num_workers=1", "eval.enabled=false", "eval.online_every=0", "data.image_size=16",
        "model.encoder_widths=[8,16]", "model.projector_width=32", "model.projector_dim=16"]
def submitted_id(out: str) -> str:
    return next(line.split(" as job ")[1].split()[0] for line in out.splitlines() if " as job " in line)


@pytest.fixture(scope="module")
def head():
    """The dashboard address (the Jobs API) of a fresh single-node cluster with 2 CPUs."""
    proc, ports, temp_dir = start_head("--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                       "--object-store-memory=200000000")
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        wait_for_head(proc, f"{address}/api/version")
        yield address
    finally:
        stop_head(proc, temp_dir)


@pytest.fixture(scope="module")
def client(head):
    return JobSubmissionClient(head, headers=token_header())


def test_refusals_submit_nothing(head, client, tmp_path, capsys, monkeypatch):
    """Config and path errors exit 2 with one line before anything reaches the cluster."""
    cases = {
        "unknown preset 'simclr-digit'": ["simclr-digit", f"runs_dir={tmp_path}"],
        "unknown config key 'train.max_step'": ["simclr-digits", f"runs_dir={tmp_path}", "train.max_step=3"],
        "runs_dir=runs is relative": ["simclr-digits", "runs_dir=runs"],
        "data.path=corpus is relative": ["simclr-digits", f"runs_dir={tmp_path}", "data.path=corpus",
                                         "eval.enabled=false", "eval.online_every=0"],
        "unknown sweep": ["--sweep", "simclr", f"runs_dir={tmp_path}"],
        "--max-failures applies to a run, not a sweep": ["--sweep", "simclr-digits", f"runs_dir={tmp_path}",
                                                         "--max-failures", "1"],
    }
    before = len(client.list_jobs())
    for expected, args in cases.items():
        assert sslp(["submit", "--address", head, *args]) == 2, args
        err = capsys.readouterr().err
        assert expected in err and err.startswith("sslp: config error:") and len(err.strip().splitlines()) == 1, err
    # A token that is not the cluster's.
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert sslp(["submit", "--address", head, "simclr-digits", f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sslp: submit: the Ray dashboard at {head} refused this machine") and "RAY_AUTH_TOKEN" in err
    assert len(err.splitlines()) == 1
    monkeypatch.undo()
    assert len(client.list_jobs()) == before


def test_bad_address_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    nobody = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert sslp(["submit", "--address", nobody, "simclr-digits", f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sslp: submit: no Ray dashboard at {nobody}: start the cluster or check --address")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # Without --address the environment names the cluster, as for `ray job submit`; with neither, say so.
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", nobody)
    assert sslp(["submit", "simclr-digits", f"runs_dir={tmp_path}"]) == 2
    assert f"no Ray dashboard at {nobody}" in capsys.readouterr().err
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert sslp(["submit", "simclr-digits", f"runs_dir={tmp_path}"]) == 2
    assert "no cluster address; give --address" in capsys.readouterr().err


def test_submitted_run_succeeds_with_shipped_code(head, client, tmp_path, capsys):
    assert sslp(["submit", "--address", head, "simclr-digits", "name=submitted", f"runs_dir={tmp_path}", *TINY,
                 "--max-failures", "2", "--follow"]) == 0
    out = capsys.readouterr().out
    job_id = submitted_id(out)
    assert f"sslp jobs logs -f {job_id} --address {head}" in out and f"sslp jobs stop {job_id}" in out
    assert "step 3/3 | loss" in out  # the streamed log of the job's driver
    info = client.get_job_info(job_id)
    assert str(info.status) == "SUCCEEDED"
    assert len(info.runtime_env["py_modules"]) == 2  # --code ship (default): ssl_platform and ssl_models
    assert info.entrypoint.endswith("run config.yaml --max-failures 2")
    run_dir = tmp_path / "submitted"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and torch.load(checkpoints[-1] / "state.pt", weights_only=True)["step"] == 3


def test_failing_job_returns_its_exit_code_and_log_tail(head, client, tmp_path, capsys):
    """A data.path that does not exist on the cluster passes the client's checks (its file system is
    not the cluster's) and fails in the job with sslp run's data error, exit 2."""
    missing = "/nonexistent/sslp-corpus"
    status = sslp(["submit", "--address", head, "simclr-digits", "name=broken", f"runs_dir={tmp_path}", *TINY,
                   f"data.path={missing}", "--code", "installed", "--wait"])
    out, err = capsys.readouterr()
    assert status == 2, err
    job_id = submitted_id(out)
    assert "py_modules" not in (client.get_job_info(job_id).runtime_env or {})  # --code installed
    assert "step 1/" not in out  # --wait does not stream the log
    assert "last" in err and "sslp: data:" in err and missing in err  # the job's own error line, in the tail
    assert err.strip().splitlines()[-1].startswith(f"sslp: submit: job {job_id} FAILED (exit code 2)")


def test_jobs_list_status_logs_stop_and_a_run_name_trained_twice_is_refused(head, client, tmp_path, capsys,
                                                                           monkeypatch):
    """Ctrl-C while `sslp submit --follow` streams the log leaves the job running and says how to stop
    it; `sslp jobs` against the real head: that job is listed, its status and log are shown, a second
    submission of the same run (same runs_dir/name) is refused naming the job, and stop stops it; an
    unknown id, a wrong token and a wrong address are one line each. (One long job serves them all,
    and it trains in local mode, `scaling.num_workers=0`, in the job's driver: what is tested here is
    the job around the run, and Ray Train's worker group is the costly part of a run on 2 cores; the
    submitted run above trains with a worker.)"""
    from ssl_platform import submit

    async def interrupted(*_):
        raise KeyboardInterrupt

    long_run = ["simclr-digits", "name=twice", f"runs_dir={tmp_path}", *TINY, "train.max_steps=100000",
                "scaling.num_workers=0"]
    with monkeypatch.context() as patched:
        patched.setattr(submit, "_stream_logs", interrupted)
        assert sslp(["submit", "--address", head, *long_run, "--follow"]) == 130
    out, err = capsys.readouterr()
    job_id = submitted_id(out)
    assert f"job {job_id} keeps running on the cluster" in err and f"sslp jobs stop {job_id} --address {head}" in err
    assert str(client.get_job_status(job_id)) in ("PENDING", "RUNNING")

    assert sslp(["jobs", "list", "--address", head]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["JOB", "STATUS", "KIND", "STARTED"]
    row = next(line for line in out if line.startswith(job_id))
    assert row.split()[1] in ("PENDING", "RUNNING") and row.split()[2] == "run" and row.endswith(f"{tmp_path}/twice")

    before = len(client.list_jobs())
    assert sslp(["submit", "--address", head, *long_run]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sslp: submit: job {job_id} (") and f"already trains {tmp_path}/twice" in err
    assert f"sslp jobs stop {job_id} --address {head}" in err and len(err.splitlines()) == 1
    assert len(client.list_jobs()) == before
    # Another name in the same runs_dir is a different run: not refused by this check (stopped at once:
    # that it was accepted is the point).
    assert sslp(["submit", "--address", head, *long_run[:1], "name=other", *long_run[2:]]) == 0
    other = submitted_id(capsys.readouterr().out)
    client.stop_job(other)

    assert sslp(["jobs", "status", job_id, "--address", head]) == 0
    assert capsys.readouterr().out.startswith(f"job {job_id}: ")
    assert sslp(["jobs", "logs", job_id, "--address", head]) == 0
    assert sslp(["jobs", "stop", job_id, "--address", head]) == 0
    assert f"asked job {job_id} to stop" in capsys.readouterr().out
    client_wait_terminal(client, job_id)
    assert str(client.get_job_status(job_id)) == "STOPPED"
    assert sslp(["jobs", "status", job_id, "--address", head]) == 1
    assert "STOPPED" in capsys.readouterr().out
    client_wait_terminal(client, other)

    assert sslp(["jobs", "status", "sslp-nothing-here", "--address", head]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sslp: jobs status: no job sslp-nothing-here on the cluster at {head} "
                   f"(`sslp jobs list --address {head}` lists them)")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert sslp(["jobs", "list", "--address", head]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sslp: jobs list: the Ray dashboard at {head} refused this machine")
    assert "RAY_AUTH_TOKEN" in err and len(err.splitlines()) == 1
    monkeypatch.undo()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nobody = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert sslp(["jobs", "stop", job_id, "--address", nobody]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sslp: jobs stop: no Ray dashboard at {nobody}") and len(err.splitlines()) == 1


def client_wait_terminal(client, job_id: str, timeout_s: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not client.get_job_status(job_id).is_terminal():
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        time.sleep(1.0)


def test_a_sweep_ships_its_local_preset_beside_it(tmp_path, monkeypatch):
    """A sweep whose base preset is a YAML of this machine: the staged folder (the job's working
    directory) holds both, and loads there as the same sweep."""
    import argparse

    import yaml

    from ssl_platform.submit import _prepare
    from ssl_platform.tune.spec import load_sweep

    local = tmp_path / "mine"
    local.mkdir()
    (local / "base.yaml").write_text(yaml.safe_dump({"method": {"name": "simclr"}, "train": {"max_steps": 20}}))
    (local / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "s", "preset": "base.yaml", "overrides": {"eval.online_every": 0, "eval.enabled": False},
        "space": {"method.temperature": {"choice": [0.1, 0.2]}}}))
    args = argparse.Namespace(sweep=True, target=str(local / "sweep.yaml"), code="ship", max_failures=0,
                              overrides=[f"runs_dir={tmp_path}/runs", "num_samples=2"])
    job = _prepare(args)
    assert job.kind == "sweep" and job.entrypoint == "python -m ssl_platform.cli sweep sweep.yaml"
    assert [Path(p).name for p in job.py_modules] == ["ssl_platform", "ssl_models"]
    staged = tmp_path / "staged"
    staged.mkdir()
    job.stage(staged)
    assert sorted(p.name for p in staged.iterdir()) == ["preset.yaml", "sweep.yaml"]
    monkeypatch.chdir(staged)  # where the job runs
    shipped, original = load_sweep("sweep.yaml"), load_sweep(args.target, args.overrides)
    assert shipped.num_samples == 2 and shipped.base == original.base
    assert {**shipped.to_dict(), "preset": None} == {**original.to_dict(), "preset": None}


def test_the_token_is_sent_even_after_a_local_ray_set_the_auth_mode(monkeypatch):
    """A `ray.init` in this process sets RAY_AUTH_MODE=token and caches its own cluster's token,
    which Ray's job client would send instead; the token this machine holds now goes first."""
    from ssl_platform.submit import token_header

    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert token_header() == {"Authorization": f"Bearer {'a' * 64}"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert token_header() == {}


def test_a_head_without_a_job_agent_yet_is_asked_again_until_the_wait_ends():
    """The Jobs API answers 500 "No available agent" while a new head's agent starts (seen on a
    loaded 2-core machine): submit asks again every 2 s; any other refusal is final at once."""
    from ssl_platform.submit import NO_AGENT, _submit_when_an_agent_is_up

    class Job:
        entrypoint, kind, name, location = "python -c pass", "run", "n", "here"

        def new_submission_id(self) -> str:
            return "id"

        def runtime_env(self, folder: Path) -> dict:
            return {}

    class Client:
        def __init__(self, answers: list):
            self.answers, self.calls = answers, 0

        def submit_job(self, **_) -> str:
            self.calls += 1
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    busy = RuntimeError(f"Request failed with status code 500: {NO_AGENT}, please try again later.")
    client = Client([busy, busy, "sslp-id"])
    assert _submit_when_an_agent_is_up(client, Job(), Path("."), wait_s=60, sleep=sleep, clock=clock) == "sslp-id"
    assert client.calls == 3 and now[0] == 4.0
    client = Client([RuntimeError("package too large"), "never"])
    with pytest.raises(RuntimeError, match="too large"):
        _submit_when_an_agent_is_up(client, Job(), Path("."), wait_s=60, sleep=sleep, clock=clock)
    assert client.calls == 1
    client = Client([busy] * 10)
    with pytest.raises(RuntimeError, match=NO_AGENT):
        _submit_when_an_agent_is_up(client, Job(), Path("."), wait_s=5, sleep=sleep, clock=clock)
    assert client.calls == 4  # at 0, 2, 4 and 6 s: the last one after the 5 s wait
