"""The demo's table at full size (`make test-slow`, ~10 minutes on 2 cores): the shipped
simclr-digits preset, 300 steps on 2 workers through `sslp run`, beats random init under both
protocols, as the README's table says. The same claim at tiny size runs in `make test`
(test_eval_image.py::test_pretrained_simclr_and_supervised_beat_random_init)."""

import json

import pytest
from conftest import show

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_the_demo_preset_beats_random_init_at_full_size(sslp, tmp_path):
    done = sslp("run", "simclr-digits", "name=demo", f"runs_dir={tmp_path}", "eval.supervised_epochs=0",
                cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, show(done)
    rows = {r["encoder"]: r for r in json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]}
    trained, random_init = rows["SimCLR (this run)"], rows["random init"]
    assert trained["knn_top1"] > random_init["knn_top1"] + 0.03, rows
    assert trained["linear_probe_top1"] > random_init["linear_probe_top1"], rows
