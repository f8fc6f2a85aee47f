"""Every shipped preset validates, and every local preset trains a few steps through the CLI on 2 workers."""

import json

import pytest
import torch

from ssl_platform import cli, methods
from ssl_platform.config import METHOD_KINDS, list_presets, load_config
from ssl_platform.train.online import ONLINE_METRIC

LOCAL = ["simclr-digits", "simclr-digits-m", "byol-digits", "barlow-digits", "vicreg-digits", "clip-digit-captions",
         "cpc-spoken-digits", "bert-python-docs", "gpt-python-docs"]
CLUSTER = ["simclr-resnet50-imagenet", "byol-resnet50-imagenet", "clip-vitb32-webdataset", "bert-base-parquet",
           "gpt2-small-parquet", "cpc-librispeech"]


def test_presets_are_the_local_and_cluster_ones():
    assert sorted(list_presets()) == sorted(LOCAL + CLUSTER)
    assert {load_config(p).method.name for p in LOCAL} == set(METHOD_KINDS)  # every method has a local preset


@pytest.mark.parametrize("preset", LOCAL + CLUSTER)
def test_preset_validates_and_builds_its_method(preset):
    cfg = methods.validate(load_config(preset))
    assert cfg.train.batch_size % cfg.scaling.num_workers == 0
    if preset in CLUSTER:  # placeholders a user overrides, GPUs, and no local-only evaluation
        assert "YOUR-BUCKET" in cfg.data.path and cfg.scaling.use_gpu and not cfg.eval.enabled


@pytest.mark.ray
@pytest.mark.parametrize("preset", [p for p in LOCAL if p != "simclr-digits-m"])  # the demo's: test_run_e2e
def test_local_preset_trains_through_the_cli(ray_session, preset, tmp_path):
    # `sslp run` in this process, a job on the session's head (see conftest); test_run_e2e runs
    # the demo's simclr-digits-m as a subprocess, with the end-of-run evaluation. Every method's online metric
    # is reported here; each kind's evaluation protocol (what the end of `sslp run` calls) is
    # tested in test_eval_*.py, so it is off: it would double the time of this test.
    assert cli.main(["run", preset, f"runs_dir={tmp_path}", "train.max_steps=4", "train.log_every=2",
                     "train.checkpoint_every=4", "train.warmup_steps=1", "eval.enabled=false"]) == 0
    run_dir = tmp_path / preset
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    metric, _ = ONLINE_METRIC[load_config(preset).method.name]
    assert metric not in rows[0] and rows[1][metric] >= 0  # online_every=50: evaluated at the last step only
    newest = max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    state = torch.load(newest / "state.pt", weights_only=True)
    assert state["step"] == 4
    if METHOD_KINDS[state["config"]["method"]["name"]] == "text":  # the tokenizer travels with the checkpoint
        assert (newest / "tokenizer" / "tokenizer.json").is_file()
