"""`sslp sweep`: the sweep YAML is checked before Ray, and a 2-trial sweep on 2 CPUs finishes,
with ASHA stopping the trial that cannot learn, a resumed interruption that keeps the finished
trial, and a best.yaml that `sslp run` takes as it is.

The integration part runs the real command line in subprocesses (jobs on the session's Ray
head, see conftest): the sweep is interrupted with SIGINT once a trial has finished and run
again to the end. Trials are tiny (1 worker x 0.5 CPU, 10 steps: what is tested is Tune's side, and
each Ray Train worker process costs ~15 CPU-s on 2 cores); one at a time, so ASHA's
decision does not depend on which trial reaches a rung first.
"""

import io
import re
import signal
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ssl_platform.config import ConfigError
from ssl_platform.tune.spec import Param, concurrent_trials, list_sweeps, load_sweep, split_overrides
from ssl_platform.tune.sweep import EXIT_INTERRUPTED, EXIT_USAGE, run_sweep

TINY = {
    "model.encoder_widths": [8, 16], "model.projector_width": 64, "model.projector_dim": 32, "data.image_size": 16,
    "train.batch_size": 64, "train.max_steps": 10, "train.log_every": 5, "train.checkpoint_every": 5,
    "train.warmup_steps": 0, "train.optimizer": "adamw", "scaling.num_workers": 1,
    "scaling.cpus_per_worker": 0.5,
    "eval.online_every": 0,  # the metric here is the training loss; online evaluation has tests of its own
}


def write_sweep(path: Path, runs_dir: Path, **changes) -> Path:
    """A sweep over train.lr in {0.005, 0}: a trial with lr=0 cannot learn, so its loss at the
    rung (step 5; the only one below 10 steps with reduction factor 2) is clearly worse than
    that of a trial that trains. The grid runs lr=0.005, then 0."""
    spec = {
        "name": "tiny", "preset": "simclr-digits", "overrides": {"runs_dir": str(runs_dir), **TINY},
        "metric": "loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 1,
        "scheduler": {"grace_period": 5, "reduction_factor": 2},
        "space": {"train.lr": {"grid": [0.005, 0.0]}},
        **changes,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the sweep YAML (no Ray)

def test_shipped_sweeps_search_temperature_batch_size_and_width():
    sweeps = list_sweeps()
    assert {"simclr-digits", "clip-digit-captions"} <= set(sweeps)
    widths = {"simclr-digits": "model.projector_width", "clip-digit-captions": "model.embed_dim"}
    metrics = {"simclr-digits": ("val_knn_top1", "max"), "clip-digit-captions": ("val_zero_shot_top1", "max")}
    for name, width in widths.items():
        spec = load_sweep(name)  # also builds every sampled trial config once
        kinds = {p.key: p.kind for p in spec.space}
        assert kinds == {"method.temperature": "loguniform", "train.batch_size": "choice", width: "choice"}
        assert (spec.metric, spec.mode) == metrics[name]
        assert spec.base.eval.online_every > 0 and spec.grace_period < spec.max_steps


def test_search_space_forms_and_trial_count(tmp_path):
    spec = load_sweep(str(write_sweep(tmp_path / "s.yaml", tmp_path, num_samples=3, space={
        "train.lr": {"grid": [0.1, 0.2]}, "method.temperature": {"loguniform": [0.05, 0.5]},
        "data.crop_scale_min": {"choice": [0.3, 0.5]}, "train.weight_decay": {"uniform": [0.0, 0.1]},
        "eval.knn_k": {"randint": [1, 5]}})))
    assert spec.num_trials == 3 * 2  # the grid runs in every sample
    params = {p.key: p for p in spec.space}
    assert params["eval.knn_k"].samples() == [1, 4]  # randint's high end is exclusive
    assert params["method.temperature"].samples() == [0.05, 0.5] and params["method.temperature"].log_scale
    from ray import tune

    space = spec.param_space()
    assert space["train.lr"] == {"grid_search": [0.1, 0.2]}
    assert isinstance(space["method.temperature"], tune.search.sample.Float)
    assert isinstance(space["data.crop_scale_min"], tune.search.sample.Categorical)
    assert isinstance(space["eval.knn_k"], tune.search.sample.Integer)


def test_overrides_go_to_the_sweep_or_to_every_trial(tmp_path):
    sweep, config = split_overrides(["num_samples=4", "scheduler.grace_period=10", "train.max_steps=40",
                                     "space.train.lr={grid: [0.1, 1.0]}"])
    assert sweep == {"num_samples": 4, "scheduler.grace_period": 10, "space.train.lr": {"grid": [0.1, 1.0]}}
    assert config == {"train.max_steps": 40}
    spec = load_sweep(str(write_sweep(tmp_path / "s.yaml", tmp_path)),
                      ["num_samples=4", "scheduler.grace_period=10", "train.max_steps=40",
                       "space.train.lr={grid: [0.1, 1.0]}"])
    assert spec.num_samples == 4 and spec.grace_period == 10
    assert spec.base.train.max_steps == 40 and spec.max_steps == 40
    assert [p.values for p in spec.space if p.key == "train.lr"] == [(0.1, 1.0)]
    with pytest.raises(ConfigError, match="neither a sweep key"):
        split_overrides(["trian.max_steps=3"])


@pytest.mark.parametrize("changes, message", [
    ({"space": {"method.temprature": {"loguniform": [0.05, 0.5]}}}, "did you mean method.temperature"),
    ({"space": {"data.jitter_strength": {"choice": [0.5, 3.0]}}}, "data.jitter_strength=3.0"),
    ({"space": {"train.batch_size": {"choice": [64]}}}, "both searched"),
    ({"space": {"method.temperature": {"loguniform": [0.0, 0.5]}}}, "bounds must be positive"),
    ({"space": {"method.temperature": {"normal": [0.1, 0.5]}}}, "expected one of"),
    ({"space": {"train.lr": {"uniform": [0.5, 0.1]}}}, "low < high"),
    ({"space": {"scaling.num_workers": {"choice": [1, 2]}}}, "fixed per sweep"),
    ({"overrides": {"scaling.num_workers": [1, 2]}}, "an elastic range cannot resize"),
    ({"space": {}}, "at least one searched key"),
    ({"metric": "val_knn_top1", "mode": "max"}, "eval.online_every=0"),
    ({"scheduler": {"grace_period": 10}}, "not below train.max_steps"),
    ({"scheduler": {"reduction_factor": 1}}, "reduction_factor"),
    ({"num_samples": 0}, "num_samples"),
    ({"metric": "knn", "mode": None}, "mode"),
    ({"sampels": 3}, "unknown sweep key"),
])
def test_bad_sweeps_fail_before_ray_naming_what_to_change(tmp_path, changes, message):
    path = write_sweep(tmp_path / "s.yaml", tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        load_sweep(str(path))


def test_bad_override_in_the_fixed_config_names_the_key(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"train.max_stepz"):
        load_sweep(str(path), ["train.max_stepz=3"])


def test_run_config_is_not_a_sweep(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": {"name": "simclr"}, "train": {"max_steps": 3}}))
    with pytest.raises(ConfigError, match="is a run config, not a sweep"):
        load_sweep(str(config))


def test_run_sweep_exits_2_on_a_config_error_without_starting_ray(tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a sweep with a config error")

    monkeypatch.setattr(ray, "init", no_ray)
    path = write_sweep(tmp_path / "s.yaml", tmp_path, space={"train.lr": {"grid": [-1.0]}})
    assert run_sweep(str(path), [], dashboard=False) == EXIT_USAGE
    assert "train.lr=-1.0" in capsys.readouterr().err


def test_max_concurrent_trials_fit_the_cluster():
    # 2 workers x 0.5 CPU + 1 data CPU on a 2-CPU laptop: one trial at a time.
    assert concurrent_trials({"CPU": 2.0, "GPU": 0.0}, {"CPU": 2.0}) == 1
    assert concurrent_trials({"CPU": 3.0, "GPU": 0.0}, {"CPU": 16.0}) == 5
    assert concurrent_trials({"CPU": 3.0, "GPU": 2.0}, {"CPU": 64.0, "GPU": 4.0}) == 2  # GPUs bound it
    assert concurrent_trials({"CPU": 8.0, "GPU": 0.0}, {"CPU": 4.0}) == 1  # never less than one
    assert concurrent_trials({"CPU": 2.0}, {"CPU": 16.0}, requested=3) == 3


def test_param_samples_cover_every_choice():
    assert Param("train.batch_size", "choice", (32, 64, 128)).samples() == [32, 64, 128]


# ----------------------------------------------------------------------------- the live trial table (no Ray)

def fake_trial(trial_id: str, lr: float, status: str = "RUNNING", **last_result) -> SimpleNamespace:
    """What TrialTable reads of a Tune trial."""
    return SimpleNamespace(trial_id=trial_id, config={"train.lr": lr}, status=status, last_result=last_result,
                           get_error=lambda: RuntimeError("Traceback\nTrainingFailed: worker rank 0: out of memory"))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_trial_table_is_a_line_per_event_in_a_pipe_and_updated_in_place_on_a_terminal(tmp_path, monkeypatch,
                                                                                           capsys):
    from ssl_platform.train import console
    from ssl_platform.tune.live import TrialTable

    spec = load_sweep(str(write_sweep(tmp_path / "s.yaml", tmp_path)))
    earlier = fake_trial("t_00000", 0.01, status="TERMINATED", step=10, loss=3.5)  # finished before a resume
    good, bad = fake_trial("t_00001", 0.005), fake_trial("t_00002", 0.0, status="PENDING")
    trials = [earlier, good, bad]

    def play(table: TrialTable) -> None:
        # Tune calls on_trial_result before the trial's last_result holds the result.
        table.on_trial_start(0, trials, good)
        table.on_trial_result(0, trials, good, {"step": 5, "loss": 4.25})
        good.last_result = {"step": 5, "loss": 4.25}
        table.on_trial_result(0, trials, good, {"step": 10})  # a report without the metric: the last one stays
        good.last_result = {"step": 10}
        table.on_trial_complete(0, trials, good)
        bad.status = "RUNNING"
        table.on_trial_start(0, trials, bad)
        table.on_trial_result(0, trials, bad, {"step": 5, "loss": 4.9})
        bad.last_result = {"step": 5, "loss": 4.9}
        table.on_trial_complete(0, trials, bad)  # ASHA's stop: the run ended itself before max_steps

    pipe = io.StringIO()
    monkeypatch.setattr(console, "_installed", [console.Console(stream=pipe)])
    play(TrialTable(spec))
    assert pipe.getvalue().splitlines() == [
        "trial t_00001 (train.lr=0.005): started",
        "trial t_00001 (train.lr=0.005): step 5/10 | loss 4.25",
        "trial t_00001 (train.lr=0.005): step 10/10 | loss 4.25",
        "trial t_00001 (train.lr=0.005): complete at step 10 | loss 4.25",
        "trial t_00002 (train.lr=0): started",
        "trial t_00002 (train.lr=0): step 5/10 | loss 4.9",
        "trial t_00002 (train.lr=0): stopped early at step 5 | loss 4.9"]

    terminal = Terminal()
    monkeypatch.setattr(console, "_installed", [console.Console(stream=terminal)])
    table = TrialTable(spec)
    play(table)
    lines = table.lines(trials)
    assert lines[0].split() == ["trial", "train.lr", "step", "loss", "(min)", "status"]
    assert [line.split()[0] for line in lines[1:]] == ["t_00000", "t_00001", "t_00002"]  # one row per trial
    assert lines[1].endswith("complete") and "3.5" in lines[1]  # the trial that ended before the resume
    assert lines[2].split()[1:4] == ["0.005", "10", "4.25"] and lines[2].endswith("complete")
    assert lines[3].endswith("stopped early")
    text = terminal.getvalue()
    assert "\r" in text and "started" not in text  # rewritten in place, no line per event
    assert lines[3] in text  # the table's last state was drawn
    assert re.search(r"t_00001 +0\.005 +5 +4\.25 +running", text)  # and the running trial's progress before it
    console.active().end_progress()  # the final table (trials.md) follows; the live one is cleared

    table.on_trial_error(0, trials, bad)
    assert table.lines(trials)[3].endswith("failed")
    monkeypatch.setattr(console, "_installed", [console.Console(stream=pipe)])
    table.on_trial_error(0, trials, bad)
    assert pipe.getvalue().splitlines()[-1] == ("trial t_00002 (train.lr=0): failed at step 5: "
                                                "TrainingFailed: worker rank 0: out of memory")
    monkeypatch.setattr(console, "_installed", [])  # run_sweep on a caller's Ray connection: no console
    table.on_trial_start(0, trials, good)
    assert capsys.readouterr().out == "trial t_00001 (train.lr=0.005): started\n"


# ----------------------------------------------------------------------------- a real sweep

def finished_trials(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("trials/*/summary.json"))


@pytest.fixture(scope="module")
def sweep(sslp):
    """Start the sweep, SIGINT it once a trial has finished, run the same command again.
    (A directory of its own: pytest's numbered base directories are rotated by other pytest
    runs on the machine, and this fixture lives for minutes.)"""
    with tempfile.TemporaryDirectory(prefix="sslp-sweep-test-") as d:
        yield run_interrupted_sweep(sslp, Path(d))


def run_interrupted_sweep(sslp, root: Path) -> dict:
    spec = write_sweep(root / "tiny.yaml", root)
    sweep_dir = root / "tiny"
    first = sslp.popen("sweep", str(spec), cwd=root, log=root / "first.log")
    try:
        deadline = time.monotonic() + 900
        while not finished_trials(sweep_dir) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert finished_trials(sweep_dir), f"no trial finished:\n{(root / 'first.log').read_text()[-4000:]}"
        done = finished_trials(sweep_dir)[0]
        before = {name: ((done / name).read_bytes(), (done / name).stat().st_mtime_ns)
                  for name in ("summary.json", "metrics.jsonl")}
        checkpoints_before = sorted(p.name for p in done.glob("checkpoint_*"))
        first.send_signal(signal.SIGINT)
        first_rc = first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()

    second = sslp.popen("sweep", str(spec), cwd=root, log=root / "second.log")
    try:
        second_rc = second.wait(timeout=1500)
    finally:
        if second.poll() is None:
            second.kill()
    return {"root": root, "spec": spec, "dir": sweep_dir, "first_rc": first_rc, "second_rc": second_rc,
            "first_log": (root / "first.log").read_text(), "second_log": (root / "second.log").read_text(),
            "done": done, "before": before, "checkpoints_before": checkpoints_before}


def rows_of(sweep_dir: Path) -> list[dict]:
    import csv

    with (sweep_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
def test_interrupted_sweep_exits_130_and_the_rerun_finishes_both_trials(sweep):
    assert sweep["first_rc"] == EXIT_INTERRUPTED, sweep["first_log"][-4000:]
    assert sweep["second_rc"] == 0, sweep["second_log"][-6000:]
    assert "resuming sweep tiny" in sweep["second_log"]
    rows = rows_of(sweep["dir"])
    assert len(rows) == 2
    assert sorted(float(r["train.lr"]) for r in rows) == [0.0, 0.005]
    for name in ("trials.md", "best.yaml", "curves.png", "metric_vs_train.lr.png"):
        assert (sweep["dir"] / name).is_file(), name


@pytest.mark.ray
def test_the_console_shows_the_trials_and_the_sweeps_ray_log_keeps_what_ray_and_tune_print(sweep):
    console = sweep["first_log"] + sweep["second_log"]  # stdout and stderr, as a pipe
    assert re.search(r"trial \S+ \(train\.lr=0\.005\): complete at step 10 \| loss \d", console), console[-4000:]
    assert re.search(r"trial \S+ \(train\.lr=0\): stopped early at step 5 \| loss \d", console), console[-4000:]
    assert "| rank | trial |" in sweep["second_log"]  # the final table stays
    for ray_line in ("Trial status", "Configuration for experiment", "View detailed results", "Reporting training",
                     "Setting up process group", "training simclr on", "core_worker", "INFO"):
        assert ray_line not in console, (ray_line, console[-4000:])
    log = (sweep["dir"] / "ray.log").read_text()
    for line in ("Configuration for experiment", "Reporting training result", "training simclr on"):
        assert line in log, line


@pytest.mark.ray
def test_rerun_does_not_train_a_finished_trial_again(sweep):
    done = sweep["done"]
    for name, (data, mtime) in sweep["before"].items():
        assert (done / name).read_bytes() == data, f"{name} of finished trial {done.name} changed"
        assert (done / name).stat().st_mtime_ns == mtime, f"{name} of finished trial {done.name} was rewritten"
    assert sorted(p.name for p in done.glob("checkpoint_*")) == sweep["checkpoints_before"]
    row = next(r for r in rows_of(sweep["dir"]) if r["trial"] == done.name)
    assert row["status"] == "complete" and int(row["step"]) == 10


@pytest.mark.ray
def test_asha_stops_the_trial_that_cannot_learn_at_the_first_rung(sweep):
    rows = rows_of(sweep["dir"])
    stopped = [r for r in rows if r["status"] == "stopped early"]
    complete = [r for r in rows if r["status"] == "complete"]
    assert stopped, "ASHA stopped no trial"
    assert [float(r["train.lr"]) for r in stopped] == [0.0] and all(int(r["step"]) == 5 for r in stopped)
    assert [float(r["train.lr"]) for r in complete] == [0.005] and all(int(r["step"]) == 10 for r in complete)
    assert max(float(r["loss"]) for r in complete) < min(float(r["loss"]) for r in stopped)
    # A stopped trial's run ended at its rung, short of its summary (written only by a complete run).
    for r in stopped:
        run = sweep["dir"] / "trials" / r["trial"]
        assert not (run / "summary.json").exists()
    # Sorted by the metric: the best (lowest loss) complete trial first.
    assert rows[0]["status"] == "complete"
    assert float(rows[0]["loss"]) == min(float(r["loss"]) for r in complete)


@pytest.mark.ray
def test_best_yaml_is_the_best_trials_config_and_sslp_run_takes_it(sweep, capsys):
    from ssl_platform import cli
    from ssl_platform.config import load_config

    best = sweep["dir"] / "best.yaml"
    cfg = yaml.safe_load(best.read_text())
    assert cfg["name"] == "tiny-best" and cfg["train"]["lr"] == 0.005
    # The best trial's own resolved config (its run wrote it) under a new name, beside the sweep's
    # folder, with the preset's evaluation (trials skip it): `sslp run best.yaml` trains what that
    # trial trained (training itself has tests of its own).
    trial = load_config(str(sweep["dir"] / "trials" / rows_of(sweep["dir"])[0]["trial"] / "config.yaml"))
    expected = {**trial.to_dict(), "name": "tiny-best", "runs_dir": str(sweep["root"]),
                "eval": load_config("simclr-digits").to_dict()["eval"]}
    assert load_config(str(best)).to_dict() == expected
    assert cli.main(["run", str(best), "--dry-run"]) == 0
    assert "# run directory:" in capsys.readouterr().out


@pytest.mark.ray
def test_finished_sweep_rerun_prints_results_and_other_settings_are_refused(sweep, capsys):
    assert run_sweep(str(sweep["spec"]), [], dashboard=False) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "| rank | trial |" in out
    assert run_sweep(str(sweep["spec"]), ["num_samples=3"], dashboard=False) == EXIT_USAGE
    assert "different settings (num_samples)" in capsys.readouterr().err
