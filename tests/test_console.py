"""The run's console (ssl_platform.train.console), without Ray: marked lines from the workers are
shown, the rest goes to RUN_DIR/ray.log; progress in a pipe is a plain line; the summary's restart
lines come from the events. End to end (a real run's console and ray.log): test_run_e2e, and the
restart line after a killed worker: test_faults."""

import contextlib
import io
import json

from ssl_platform.train import console
from ssl_platform.train.console import EVENT_MARK, MARK, PROGRESS_MARK, Console
from ssl_platform.train.trainer import restart_lines


def worker_lines(*lines: str) -> dict:
    return {"lines": list(lines), "pid": 123, "ip": "10.0.0.1", "is_err": False, "actor_name": "RayTrainWorker"}


def test_marked_lines_are_shown_and_rays_lines_go_to_the_log(tmp_path):
    out = io.StringIO()
    shown = Console(stream=out)
    shown.worker_output(worker_lines("Setting up process group for: env://", MARK + "2 x ddp, fp32"))
    shown.log_to(tmp_path / "ray.log")  # the lines before it are kept, then written
    shown.worker_output(worker_lines(
        "Reporting training result 1: TrainingReport(checkpoint=None)",
        PROGRESS_MARK + json.dumps({"step": 2, "max_steps": 4, "text": "step 2/4 | loss 1.0"})))
    assert out.getvalue() == "2 x ddp, fp32\nstep 2/4 | loss 1.0\n"  # a pipe: plain lines
    log = (tmp_path / "ray.log").read_text()
    assert "(RayTrainWorker pid=123, ip=10.0.0.1) Setting up process group" in log
    assert "Reporting training result 1" in log and "sslp" not in log


def test_verbose_also_shows_rays_lines(tmp_path):
    out = io.StringIO()
    shown = Console(verbose=True, stream=out)
    shown.log_to(tmp_path / "ray.log")
    shown.worker_output(worker_lines("Moving model to device: cpu"))
    assert "Moving model to device: cpu" in out.getvalue()
    assert "Moving model to device: cpu" in (tmp_path / "ray.log").read_text()


def test_a_worker_marks_its_lines_only_for_a_filtering_driver(capsys, monkeypatch):
    monkeypatch.delenv(console.CONSOLE_ENV, raising=False)
    console.say("resumed from step 20 (epoch 1)")  # a Tune trial: plain text
    console.event("start", step=20)  # nobody collects it: not printed
    monkeypatch.setenv(console.CONSOLE_ENV, "1")
    console.say("resumed from step 20 (epoch 1)")
    console.event("start", step=20)
    assert capsys.readouterr().out.splitlines() == [
        "resumed from step 20 (epoch 1)", MARK + "resumed from step 20 (epoch 1)",
        EVENT_MARK + json.dumps({"kind": "start", "step": 20})]


def test_the_summary_names_each_restart_its_cause_and_the_steps_repeated():
    shown = Console(stream=io.StringIO())
    shown.event({"kind": "start", "step": 10})
    shown.progress(24, 40, "step 24/40")
    shown.event({"kind": "failure", "workers": {
        "0": "worker rank 0 died (its process exited or was killed)",
        "1": "worker rank 1: RuntimeError: Connection closed by peer"}})  # a consequence, not the cause
    shown.event({"kind": "start", "step": 20})
    shown.event({"kind": "failure", "workers": {"1": "worker rank 1 died (its process exited or was killed)"}})
    shown.event({"kind": "start", "step": 20})  # killed again before it logged a step
    assert restart_lines(shown.events) == [
        ("worker rank 0 died (its process exited or was killed) after step 24; restarted from the "
         "checkpoint of step 20, 4 logged step(s) repeated"),
        "worker rank 1 died (its process exited or was killed) after step 20; restarted from the checkpoint of step 20"]
    assert restart_lines([{"kind": "start", "step": 0, "reached": None}]) == []  # one attempt: no restart


def test_an_elastic_runs_restarts_say_the_worker_count_and_a_growth_is_no_failure():
    shown = Console(stream=io.StringIO())
    shown.event({"kind": "start", "step": 0, "workers": 2})
    shown.progress(5, 24, "step 5/24")
    shown.event({"kind": "failure", "workers": {"1": "worker rank 1 died (its process exited or was killed)"}})
    shown.event({"kind": "start", "step": 4, "workers": 1})
    shown.progress(8, 24, "step 8/24")
    shown.event({"kind": "start", "step": 8, "workers": 2})  # no failure before it: Ray Train grew the group
    assert restart_lines(shown.events) == [
        ("worker rank 1 died (its process exited or was killed) after step 5; restarted from the checkpoint of step 4 "
         "on 1 worker, 1 logged step(s) repeated"),
        "the cluster had room for 2 workers after step 8; restarted from the checkpoint of step 8 on 2 workers"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_progress_is_one_line_updated_in_place():
    out = Terminal()
    shown = Console(stream=out)
    shown.progress(1, 4, "step 1/4 | loss 2.0")
    shown.progress(2, 4, "step 2/4 | loss 1.5")
    shown.show("data-bound: 40% wait")  # printed above the live line, which stays last
    shown.progress(4, 4, "step 4/4 | loss 1.0")
    shown.end_progress()
    text = out.getvalue()
    assert "\r" in text and "step 1/4 | loss 2.0\n" not in text  # overwritten, not a line of its own
    assert text.index("data-bound: 40% wait") < text.rindex("step 4/4 | loss 1.0")
    assert text.endswith("step 4/4 | loss 1.0\n")  # left on the screen when training ends


def test_a_sweep_keeps_its_trials_lines_in_the_log_and_shows_only_its_own(tmp_path):
    out = io.StringIO()
    shown = Console(stream=out, show_workers=False)  # several runs at once: the trial table shows them
    shown.log_to(tmp_path / "ray.log")
    shown.worker_output(worker_lines(
        MARK + "training simclr on digits",
        PROGRESS_MARK + json.dumps({"step": 5, "max_steps": 10, "text": "step 5/10"}),
        "Reporting training result 1: TrainingReport(checkpoint=None)"))
    with contextlib.redirect_stdout(shown.as_ray_output()):  # what Tune prints in the driver
        print("Configuration for experiment     tune")
    shown.show("trial t_00001 (train.lr=0.005): step 5/10 | loss 4.25")
    assert out.getvalue() == "trial t_00001 (train.lr=0.005): step 5/10 | loss 4.25\n"
    log = (tmp_path / "ray.log").read_text()
    for line in ("training simclr on digits", "step 5/10", "Reporting training result 1",
                 "Configuration for experiment"):
        assert line in log


def test_an_unexpected_error_reaches_the_console_with_the_log_to_read(tmp_path):
    from ssl_platform.command import failure_line

    shown = Console(stream=io.StringIO())
    shown.log_to(tmp_path / "ray.log")
    try:
        raise RuntimeError("Traceback (most recent call last):\n  File 'x.py'\n"
                           "ValueError: encode returned 'features' of shape ()")
    except RuntimeError as e:
        line = failure_line(e, shown)
    assert line == (f"sslp: failed: RuntimeError: ValueError: encode returned 'features' of shape (); "
                    f"full error in {tmp_path / 'ray.log'}")
    assert "Traceback (most recent call last)" in (tmp_path / "ray.log").read_text()


def test_the_platforms_ray_data_settings_give_no_deprecation_warning():
    """Ray 2.60's DataContext warns about its own deprecated fields when it is made; the platform
    makes it without them and sets no deprecated option (a fresh process: the context is made once)."""
    import subprocess
    import sys

    code = ("from ssl_platform.data.context import configure_data_context\n"
            "configure_data_context(progress_bars=True, per_operator=True)\n")
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_rays_hint_that_the_progress_bars_are_off_is_not_logged_where_the_platform_turned_them_off():
    """Ray Data logs a WARNING the first time a process runs a Dataset without bars, saying how to
    turn them on; the platform turns them off on purpose, so that line would be noise on a user's
    console (it was the one Ray line `sslp bench train --preset gpt-python-docs` printed)."""
    import logging

    from ssl_platform.data.context import configure_data_context

    configure_data_context()
    configure_data_context()  # again: still one filter
    progress_log = logging.getLogger("ray.data._internal.progress")  # where Ray 2.60 logs the hint
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    progress_log.addHandler(handler)
    try:
        progress_log.warning("Progress bars disabled. To enable, set "
                             "`ray.data.DataContext.get_current().enable_progress_bars = True`.")
        progress_log.warning("Progress bars for operators disabled. To enable, set "
                             "`ray.data.DataContext.get_current().enable_operator_progress_bars = True`.")
        progress_log.warning("Progress will be logged because stdout is a non-interactive terminal.")
    finally:
        progress_log.removeHandler(handler)
    assert seen == ["Progress will be logged because stdout is a non-interactive terminal."]
    assert len(progress_log.filters) == 1
