"""Training metrics: the names, the per-interval meter, metrics.jsonl across resumes, the progress line."""

import io
import json
import time

import pytest
import torch
from gloo import run_on_ranks

from ssl_platform.data.skips import SKIPPED_METRIC
from ssl_platform.train.metrics import (
    GAUGES,
    METRICS,
    MetricsLogger,
    StepMeter,
    count_tokens,
    data_bound,
    drop_rows_after,
    read_metrics,
)


def test_one_prefix_and_one_list_of_names():
    assert all(name.startswith("sslp_") for name in METRICS)
    assert METRICS[SKIPPED_METRIC][0] == "counter"  # emitted by the data pipeline, listed here too
    assert set(GAUGES) == {n for n, (kind, _) in METRICS.items() if kind == "gauge"}
    for wanted in ("loss", "samples_per_second", "tokens_per_second", "step_seconds", "data_wait_seconds",
                   "data_wait_fraction", "learning_rate"):
        assert f"sslp_train_{wanted}" in GAUGES
    assert all(description for _, description in METRICS.values())


def test_tokens_are_the_non_padding_ones():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert int(count_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])})) == 8
    assert int(count_tokens({"input_ids": ids})) == 10  # GPT blocks without a mask are all real tokens
    assert count_tokens({"view1": torch.zeros(2, 1, 4, 4), "view2": torch.zeros(2, 1, 4, 4)}) == 0


def test_meter_means_over_steps_and_counts_data_wait():
    meter = StepMeter()

    def slow():
        for i in range(2):
            time.sleep(0.02)
            yield i

    for i in meter.timed(slow()):
        meter.add({"loss": torch.tensor(float(i + 1)), "acc": torch.tensor(0.5)}, samples=4, tokens=torch.tensor(10))
    interval = meter.pop(world=1, device=torch.device("cpu"))
    assert interval["loss"] == pytest.approx(1.5) and interval["acc"] == pytest.approx(0.5)
    assert (interval["samples"], interval["tokens"], interval["steps"]) == (8, 20, 2)
    assert interval["data_wait_s"] >= 0.04
    assert meter.steps == 0 and meter.data_wait_s == 0.0  # a new interval


def _meter_worker(rank: int) -> dict:
    meter = StepMeter()
    meter.data_wait_s = 1.0 + rank  # rank 1 waited longest
    for step in range(2):
        meter.add({"loss": torch.tensor(float(rank + step))}, samples=4, tokens=3 + rank)
    return meter.pop(world=2, device=torch.device("cpu"))


def test_meter_reduces_over_ranks(tmp_path):
    for interval in run_on_ranks(_meter_worker, tmp_path):
        assert interval["loss"] == pytest.approx((0 + 1 + 1 + 2) / 4)  # mean over both ranks and steps
        assert (interval["samples"], interval["tokens"]) == (16, 2 * 3 + 2 * 4)  # global counts
        assert interval["data_wait_s"] == 2.0  # the slowest rank's wait


def _interval(loss: float, tokens: int = 0) -> dict:
    return {"loss": loss, "samples": 64, "tokens": tokens, "steps": 2, "data_wait_s": 0.0}


def test_rows_after_the_resumed_step_are_dropped_with_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    drop_rows_after(path, 4)
    assert [r["step"] for r in read_metrics(path)] == [2, 4]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2
    drop_rows_after(tmp_path / "absent.jsonl", 4)  # a new run: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_every_logged_step_once_across_a_resume(tmp_path, capsys):
    # Session 1 logs steps 2, 4, 6; its newest checkpoint is step 4; then a worker dies.
    first = MetricsLogger(tmp_path, "run", max_steps=8, start_step=0, enabled=True)
    for step in (2, 4, 6):
        first.log(step, _interval(1.0 / step), lr=0.1)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # killed mid-write
    # Ray restarts the worker group from step 4: steps 6 and 8 are done (and logged) again.
    MetricsLogger(tmp_path, "run", max_steps=8, start_step=4, enabled=False)  # rank 1 leaves the file alone
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 6]
    second = MetricsLogger(tmp_path, "run", max_steps=8, start_step=4, enabled=True)
    for step in (6, 8):
        second.log(step, _interval(0.5 / step), lr=0.05)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[2]["loss"] == pytest.approx(0.5 / 6)  # the redone step's row, not the first session's
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_row_progress_line_and_summary(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, "run", max_steps=10, start_step=0, enabled=True)
    row = logger.log(2, _interval(0.7), lr=0.01, epoch=0)
    line = capsys.readouterr().out
    assert "step  2/10 | loss 0.7000 | lr 0.01 |" in line
    assert "samples/s" in line and "s/step" in line and "data wait 0%" in line and "ETA" in line
    for key in ("step", "loss", "lr", "epoch", "samples_per_s", "step_time_s", "data_wait_s", "data_wait_fraction"):
        assert key in row
    assert "tokens_per_s" not in row
    text = logger.log(4, _interval(0.6, tokens=1000), lr=0.01)
    assert "tokens/s" in capsys.readouterr().out and text["tokens_per_s"] > 0
    summary = logger.summary()
    assert summary["loss"] == pytest.approx(0.6) and summary["samples_per_s"] > 0 and summary["tokens_per_s"] > 0
    assert summary["train_seconds"] > 0


def test_a_data_bound_run_is_told_what_to_give_it(tmp_path, capsys):
    """Over 10% of the steady-state time waiting for data: the progress line marks it, the advice
    is printed once, and the summary carries the fraction. The first interval (the pipeline's
    start) does not count."""
    logger = MetricsLogger(tmp_path, "run", max_steps=10, start_step=0, enabled=True, data_advice="add CPUs")
    logger.log(2, {**_interval(0.7), "data_wait_s": 1e6})  # start-up: capped, and not steady state
    assert "data-bound" not in capsys.readouterr().out and logger.summary()["data_wait_fraction"] == 1.0
    time.sleep(0.05)
    logger.log(4, {**_interval(0.6), "data_wait_s": 0.0})
    assert "data-bound" not in capsys.readouterr().out and logger.summary()["data_wait_fraction"] == 0.0
    time.sleep(0.05)
    logger.log(6, {**_interval(0.5), "data_wait_s": 1e6})  # all of this interval: half the steady time or so
    out = capsys.readouterr().out.splitlines()
    assert "(data-bound)" in out[0] and out[1].startswith("data-bound: ") and out[1].endswith("wait; add CPUs")
    time.sleep(0.05)
    logger.log(8, {**_interval(0.5), "data_wait_s": 1e6})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "(data-bound)" in out[0]  # the advice only once
    assert 0.5 < logger.summary()["data_wait_fraction"] < 1.0
    assert data_bound(0.18, "add CPUs") == "data-bound: 18% wait; add CPUs" and data_bound(0.05, "x") == ""


def test_the_data_bound_advice_is_shown_once_per_run_across_a_restart(tmp_path, capsys, monkeypatch):
    """A restarted worker group is a new process with a new logger: it gives the advice again, and
    the driver's console shows it only the first time (the line is marked with its key)."""
    from ssl_platform.train import console

    monkeypatch.setenv(console.CONSOLE_ENV, "1")  # workers of a driver with a quiet console
    for start in (0, 4):  # the first attempt, then the one restarted from the checkpoint of step 4
        logger = MetricsLogger(tmp_path, "run", max_steps=10, start_step=start, enabled=True, data_advice="add CPUs")
        for step in (start + 2, start + 4):
            time.sleep(0.01)
            logger.log(step, {**_interval(0.5), "data_wait_s": 1e6})  # waiting for data throughout
    printed = capsys.readouterr().out.splitlines()
    assert sum("data-bound: " in line for line in printed) == 2  # each attempt says it
    shown = console.Console(stream=io.StringIO())
    shown.worker_output({"lines": printed, "pid": 1, "ip": "127.0.0.1", "actor_name": "RayTrainWorker"})
    advice = [line for line in shown.stream.getvalue().splitlines() if line.startswith("data-bound: ")]
    assert advice == ["data-bound: 100% wait; add CPUs"]
    assert [e["step"] for e in shown.events if e["kind"] == "start"] == [0, 4]  # both attempts reached it


def test_a_data_bound_run_of_small_images_is_told_to_lengthen_ray_datas_tasks():
    """Left empty, the records per Ray Data task follow the image side (long tasks for small
    images); a data-bound run whose transform batch was set below that is told to leave it empty,
    and only then: not for 224-px images, text, or a batch already long."""
    from ssl_platform.config import load_config
    from ssl_platform.data.pipeline import transform_records
    from ssl_platform.train.metrics import data_advice

    def advice(preset: str, *overrides: str) -> str:
        return data_advice(load_config(preset, list(overrides)))

    def records(preset: str, *overrides: str) -> int:
        return transform_records(load_config(preset, list(overrides)))

    assert records("simclr-digits") == records("clip-digit-captions") == 2048  # 24 px
    assert [records("simclr-digits", f"data.image_size={side}") for side in (32, 40, 48, 64, 90, 96, 224)] == [
        2048, 1024, 512, 512, 256, 256, 256]
    assert records("bert-python-docs") == records("cpc-spoken-digits") == 256
    assert records("simclr-digits", "data.transform_batch_size=100") == 100
    assert records("simclr-resnet50-imagenet") == 128  # the preset's own

    short = advice("simclr-digits", "data.transform_batch_size=256")
    assert "data.transform_batch_size=256" in short and "leave it empty (2048 records a task)" in short
    assert "leave it empty (2048" in advice("clip-digit-captions", "data.transform_batch_size=512")
    assert "scaling.data_cpus" in advice("simclr-digits")
    for long_enough in [advice("simclr-digits"), advice("simclr-digits", "data.transform_batch_size=4096"),
                        advice("simclr-resnet50-imagenet"), advice("bert-python-docs", "data.transform_batch_size=64")]:
        assert "transform_batch_size" not in long_enough
    assert "data.augment_on=device" in advice("simclr-digits", "scaling.use_gpu=true", "data.augment_on=cpu")
