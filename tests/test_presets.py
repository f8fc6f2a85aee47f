"""Every shipped preset validates, and every local preset trains a few steps through the CLI on 2 workers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import show
from test_sweep import write_sweep

from ssl_platform import cli, methods
from ssl_platform.config import ConfigError, list_presets, load_config
from ssl_platform.methods import method_spec, method_specs
from ssl_platform.tune.spec import load_sweep

LOCAL = ["simclr-digits", "simclr-digits-m", "byol-digits-m", "barlow-digits-m", "vicreg-digits-m", "rotnet-digits",
         "dino-digits", "clip-digit-captions", "clip-digits-m-captions", "siglip-digit-captions", "cpc-spoken-digits",
         "bert-python-docs", "gpt-python-docs"]
CLUSTER = ["simclr-resnet50-imagenet", "byol-resnet50-imagenet", "clip-vitb32-webdataset", "bert-base-parquet",
           "gpt2-small-parquet", "cpc-librispeech"]


def test_presets_are_the_local_and_cluster_ones():
    assert sorted(list_presets()) == sorted(LOCAL + CLUSTER)
    assert {load_config(p).method.name for p in LOCAL} == set(method_specs())  # every method has a local preset


@pytest.mark.parametrize("preset", LOCAL + CLUSTER)
def test_preset_validates_and_builds_its_method(preset):
    cfg = methods.validate(load_config(preset))
    assert cfg.train.batch_size % cfg.scaling.num_workers == 0
    if preset in CLUSTER:  # placeholders a user overrides, GPUs, and no local-only evaluation
        assert "YOUR-BUCKET" in cfg.data.path and cfg.scaling.use_gpu and not cfg.eval.enabled


@pytest.mark.ray
@pytest.mark.parametrize("preset", [p for p in LOCAL if p != "simclr-digits-m"])  # the demo's: test_run_e2e
def test_local_preset_trains_through_the_cli(ray_session, preset, tmp_path):
    # `sslp run` in this process, a job on the session's head (see conftest), in local mode
    # (scaling.num_workers=0: the loop runs here, so a run costs its training, not the ~60 CPU-s of
    # starting Ray Train's controller and worker processes); the preset's own model, data
    # pipeline, loss, optimizer and online metric. Data-parallel training is what test_run_e2e
    # (the demo's preset, 2 workers), test_faults, test_elastic and test_loop run. Each kind's
    # evaluation protocol (what the end of `sslp run` calls) is tested in test_eval_*.py.
    # BYOL's views get their colour, blur and solarize on the train worker's device (the CPU
    # here): data.augment_on=device, the default on GPUs (uint8 crops and draws from Ray Data).
    placement = ["data.augment_on=device"] if preset == "byol-digits-m" else []
    assert cli.main(["run", preset, f"runs_dir={tmp_path}", "scaling.num_workers=0", "train.max_steps=4",
                     "train.log_every=2", "train.checkpoint_every=4", "train.warmup_steps=1",
                     "eval.enabled=false", *placement]) == 0
    run_dir = tmp_path / preset
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    metric = method_spec(load_config(preset).method.name).online_metric
    assert metric not in rows[0] and rows[1][metric] >= 0  # online_every=50: evaluated at the last step only
    newest = max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    state = torch.load(newest / "state.pt", weights_only=True)
    assert state["step"] == 4
    if method_spec(state["config"]["method"]["name"]).data_kind == "text":  # the tokenizer travels with the checkpoint
        assert (newest / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.ray
def test_local_mode_keeps_its_checkpoints_and_resumes_from_them(ray_session, tmp_path, capsys):
    """Ray Train keeps no checkpoint in local mode; the loop stores them where Ray Train would, keeps
    the newest train.keep_checkpoints, and the same command resumes from the newest."""
    run = ["run", "simclr-digits", f"runs_dir={tmp_path}", "scaling.num_workers=0", "model.encoder_widths=[8,16]",
           "model.projector_width=32", "model.projector_dim=16", "train.batch_size=32", "train.log_every=1",
           "train.checkpoint_every=2", "train.keep_checkpoints=2", "eval.enabled=false"]
    assert cli.main([*run, "train.max_steps=6"]) == 0
    run_dir = tmp_path / "simclr-digits"
    kept = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [torch.load(p / "state.pt", weights_only=True)["step"] for p in kept] == [4, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checkpoint"] == str(kept[-1]) and summary["steps"] == 6
    capsys.readouterr()

    assert cli.main([*run, "train.max_steps=8"]) == 0
    assert "resumed from step 6" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # every step exactly once across the two commands
    kept = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [torch.load(p / "state.pt", weights_only=True)["step"] for p in kept] == [6, 8]
    assert not list(run_dir.glob(".checkpoint_*"))  # no staging copy left behind


def test_local_mode_refuses_what_needs_workers(tmp_path, capsys):
    assert cli.main(["run", "simclr-digits", "scaling.num_workers=0", "scaling.use_gpu=true", "--dry-run"]) == 0
    assert "local mode" in capsys.readouterr().out
    assert cli.main(["run", "simclr-digits", "scaling.num_workers=-1", "--dry-run"]) == cli.EXIT_USAGE
    assert "scaling.num_workers" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="local mode"):
        load_sweep(str(write_sweep(tmp_path / "s.yaml", tmp_path, overrides={"scaling.num_workers": 0})))
    runs = f"runs_dir={tmp_path}"
    assert cli.main(["run", "simclr-digits", runs, "scaling.num_workers=0", "--max-failures", "1"]) == cli.EXIT_USAGE
    assert "cannot be restarted" in capsys.readouterr().err and not (tmp_path / "simclr-digits").exists()


def test_resume_point_is_the_newest_checkpoint_and_with_workers_only_one_ray_train_does_not_know(tmp_path):
    from ssl_platform.train import local_mode

    def checkpoint(name: str, marked: bool) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
        if marked:
            (tmp_path / name / local_mode.MARKER).write_text("")

    assert local_mode.resume_point(str(tmp_path / "none-yet"), local=True) is None
    checkpoint("checkpoint_2026-01-01_00-00-00.000000", marked=False)  # Ray Train's, from a run with workers
    assert local_mode.resume_point(str(tmp_path), local=True).endswith("checkpoint_2026-01-01_00-00-00.000000")
    assert local_mode.resume_point(str(tmp_path), local=False) is None  # Ray Train hands its own back
    checkpoint("checkpoint_2026-01-02_00-00-00.000000", marked=True)  # then local mode went on
    (tmp_path / "checkpoint_2026-01-03_00-00-00.000000").mkdir()  # incomplete: no state.pt
    for local in (True, False):
        assert local_mode.resume_point(str(tmp_path), local=local).endswith("checkpoint_2026-01-02_00-00-00.000000")


@pytest.mark.ray
def test_a_local_mode_command_exits_0_after_stopping_mid_epoch(tmp_path):
    """`sslp run` in local mode on a Ray instance of its own (a laptop user's first command) stops
    its loop in the middle of an epoch; leaving Ray under Ray Data's still-running prefetch thread
    made Ray's core worker exit the finished run with status 1."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "ssl_platform.cli", "run", "simclr-digits", "--no-dashboard",
                           f"runs_dir={tmp_path}", "scaling.num_workers=0", "train.max_steps=2", "train.log_every=1",
                           "train.checkpoint_every=2", "model.encoder_widths=[8,16]", "model.projector_width=32",
                           "model.projector_dim=16", "train.batch_size=32", "eval.enabled=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, show(done)
    assert "steps       2/2" in done.stdout
