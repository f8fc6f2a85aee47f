"""`sslp run` end to end on the demo's preset (simclr-digits-m, tiny): 2 Ray Train workers, checkpoint,
metrics, report, and `sslp eval`.

Each command is a job on the session's Ray head (conftest.sslp); refusals are tested in-process.
Resuming a run by its name is tested in test_faults (after a failure and after Ctrl-C).
"""

import json

import pytest
import torch
from conftest import show

from ssl_platform import cli

pytestmark = pytest.mark.ray

TINY = ["model.encoder_widths=[8,16]", "model.projector_width=64", "model.projector_dim=32",
        "data.image_size=16", "train.batch_size=64", "train.log_every=2", "train.checkpoint_every=10",
        "train.warmup_steps=2", "train.optimizer=adamw", "train.lr=0.001", "eval.supervised_epochs=1"]


@pytest.fixture(scope="module")
def first_run(sslp, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    done = sslp("run", "simclr-digits-m", "name=tiny", f"runs_dir={root}", "train.max_steps=30", *TINY, cwd=root)
    assert done.returncode == 0, show(done)
    return root / "tiny", done


def test_run_writes_config_metrics_checkpoint_and_report(first_run):
    run_dir, done = first_run
    assert "run directory:" in done.stdout
    assert (run_dir / "config.yaml").is_file()
    for name in ("results.json", "results.md", "report.png"):
        assert (run_dir / name).is_file(), name
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # not Ray's snapshot json
    assert 1 <= len(checkpoints) <= 2  # keep_checkpoints=2 of the 3 written (steps 10, 20, 30)
    state = torch.load(checkpoints[-1] / "state.pt", weights_only=True)
    assert state["step"] == 30
    # The progress line a user watches.
    assert "step 30/30 | loss" in done.stdout and "samples/s" in done.stdout and "ETA" in done.stdout
    table = (run_dir / "results.md").read_text()
    for row in ("random init", "SimCLR (this run)", "supervised (labels)"):
        assert row in table


def test_the_console_shows_the_platform_and_ray_log_keeps_what_ray_prints(first_run):
    run_dir, done = first_run
    console = done.stdout + done.stderr
    for ray_line in ("Reporting training result", "TrainingReport", "Checkpoint successfully created",
                     "Setting up process group", "core_worker", "exclude_resources", "Progress bars disabled",
                     "[sslp", "ERROR", "execution finished", "deprecated"):
        assert ray_line not in console, show(done)
    assert "training simclr on" in done.stdout and "summary of run tiny:" in done.stdout  # the platform's own
    log = (run_dir / "ray.log").read_text()
    assert "Reporting training result" in log and "Setting up process group" in log


def test_loss_decreases_on_average(first_run):
    run_dir, _ = first_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 31, 2))
    losses = [r["loss"] for r in rows]
    third = len(losses) // 3
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third


def test_sslp_eval_of_the_checkpoint_reproduces_the_end_of_run_table(sslp, first_run, tmp_path):
    run_dir, _ = first_run
    checkpoint = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    done = sslp("eval", str(checkpoint), "--out", str(tmp_path), "eval.supervised_epochs=0", cwd=tmp_path)
    assert done.returncode == 0, show(done)
    assert "SimCLR (this run)" in done.stdout
    # A quiet console (a pipe): the table, not Ray Data's lines (in OUT/ray.log) nor Ray's own deprecation notices.
    for ray_line in ("Dataset", "execution finished", "Registered dataset logger", "core_worker", "deprecated",
                     "INFO", "WARNING"):
        assert ray_line not in done.stdout + done.stderr, show(done)
    assert "execution finished" in (tmp_path / "ray.log").read_text()
    again = {r["encoder"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    at_end = {r["encoder"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    assert "supervised (labels)" not in again  # eval.supervised_epochs=0 took effect
    for encoder in ("raw pixels", "random init", "SimCLR (this run)"):  # same weights, same split: same numbers
        assert again[encoder]["linear_probe_top1"] == pytest.approx(at_end[encoder]["linear_probe_top1"], abs=1e-6)
        assert again[encoder]["knn_top1"] == pytest.approx(at_end[encoder]["knn_top1"], abs=1e-6)


def test_sslp_eval_rejects_what_it_cannot_evaluate(first_run, tmp_path, capsys):
    run_dir, _ = first_run
    for args, says in [((str(tmp_path),), "holds no checkpoint"),
                       ((str(tmp_path / "missing"),), "does not exist"),
                       ((str(run_dir), "model.projector_dim=4"), "takes eval.* settings only"),
                       ((str(run_dir), "eval.knn_k=0"), "eval.knn_k")]:
        assert cli.main(["eval", *args]) == cli.EXIT_USAGE, args
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, (args, err)
