"""The demo's table at full size (`make test-slow`, ~8 minutes on 2 cores): the shipped
simclr-digits-m preset, 500 steps on 2 workers through `sslp run`, against raw pixels and a random
encoder on digits-m, as the README's table says: the linear probe at least 30 points above raw
pixels and 15 above random init, the kNN ahead of both. That the corpus defeats raw pixels is
tested in `make test` (test_transforms.py::test_digits_m_is_digits_on_photos_...), and that a
trained encoder beats random init at tiny size too
(test_eval_image.py::test_pretrained_simclr_and_supervised_beat_random_init)."""

import json

import pytest
from conftest import show

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_the_demo_preset_beats_raw_pixels_and_random_init_at_full_size(sslp, tmp_path):
    done = sslp("run", "simclr-digits-m", "name=demo", f"runs_dir={tmp_path}", "eval.supervised_epochs=0",
                cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, show(done)
    rows = {r["encoder"]: r for r in json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]}
    trained, raw, random_init = rows["SimCLR (this run)"], rows["raw pixels"], rows["random init"]
    assert trained["linear_probe_top1"] >= raw["linear_probe_top1"] + 0.30, rows
    assert trained["linear_probe_top1"] >= random_init["linear_probe_top1"] + 0.15, rows
    assert trained["knn_top1"] > max(raw["knn_top1"], random_init["knn_top1"]), rows
