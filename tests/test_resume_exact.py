"""Exact mid-epoch resume (issue 18): a run whose worker dies mid-epoch and restarts from the
newest checkpoint (``--max-failures``, the SSLP_CRASH_AT_STEP fault injection) logs, step for
step, the losses of the run that was never interrupted: the same records, in the same order,
with the same views and crops, on every built-in corpus the ordered stream serves (images,
image-caption pairs, audio, GPT's blocks of python-docs). With 2 workers the restarted run matches the 1-worker
uninterrupted 2-worker run to 1e-5, and both the 1-worker run to 1e-4 (float summation order:
the order splits global batches, not records, across workers).

The checkpoint lands in the second epoch (the first for text), so the resumed stream starts at a
position inside an epoch other than the first; the crash comes a step later, so the restart
repeats a step.

Runs are `sslp run` jobs on the session's Ray head (conftest.sslp), 1 worker, tiny models.
The refusal of a changed fingerprint is tested in-process.
"""

import json
import re
from pathlib import Path

import pytest
from conftest import show

from ssl_platform.config import load_config
from ssl_platform.data.ordered import fingerprint_change
from ssl_platform.train.checkpoint import TrainState
from ssl_platform.train.loop import CRASH_AT_STEP_ENV
from ssl_platform.train.resume import place_in_epoch

COMMON = ("train.log_every=1", "train.warmup_steps=2", "eval.enabled=false",
          "eval.online_every=0", "scaling.num_workers=1")
# preset, global batch, tiny overrides
KINDS = {
    "image": ("simclr-digits", 128, ("data.image_size=16", "model.encoder_widths=[8,16]", "model.projector_width=32",
                                "model.projector_dim=16", "train.optimizer=adamw", "train.lr=0.001")),
    "image-caption": ("clip-digit-captions", 128, ("data.image_size=8", "model.patch_size=4", "model.embed_dim=8",
                                              "model.vision_width=16", "model.vision_layers=1", "model.vision_heads=2",
                                              "model.context_length=8", "model.text_width=16", "model.text_layers=1",
                                              "model.text_heads=2")),
    "text": ("gpt-python-docs", 32, ("data.vocab_size=300", "data.max_len=32", "model.dim=16", "model.depth=1",
                                     "model.heads=2")),
    "audio": ("cpc-spoken-digits", 32, ("data.crop_seconds=0.1", "model.channels=8", "model.context_dim=8",
                                    "method.num_steps=2")),
}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


# the train splits' records: 80% of the 1,797 digits, 380 spoken digits; python-docs' blocks
# follow the interpreter's docs (~2,600 of 32 tokens): the text run checkpoints in its first epoch
STEPS_PER_EPOCH = {"image": 1437 // 128, "image-caption": 1437 // 128, "audio": 380 // 32, "text": None}


def checkpoint_position(kind: str) -> tuple[int, int, int]:
    """(step, epoch, record of the epoch) of the checkpoint the restart resumes from."""
    spe, batch = STEPS_PER_EPOCH[kind], KINDS[kind][1]
    return (spe + 2, 1, 2 * batch) if spe else (5, 0, 5 * batch)


@pytest.fixture(scope="module")
def runs(sslp, tmp_path_factory):
    """Per kind, lazily: (reference losses, restarted losses, the restarted run's output)."""
    root, done = tmp_path_factory.mktemp("resume"), {}

    def get(kind: str, workers: int = 1):
        if (kind, workers) in done:
            return done[kind, workers]
        preset, batch, tiny = KINDS[kind]
        every, _, _ = checkpoint_position(kind)  # mostly: record 2 x batch of the second epoch
        steps, args = every + 3, (*COMMON, f"train.batch_size={batch}", *tiny, f"train.checkpoint_every={every}")
        ref = sslp("run", preset, f"name={kind}-ref-{workers}", f"runs_dir={root}", f"train.max_steps={steps}",
                   *args, f"scaling.num_workers={workers}", cwd=root)
        assert ref.returncode == 0, show(ref)
        name = f"{kind}-crash-{workers}"
        crashed = sslp("run", preset, f"name={name}", f"runs_dir={root}", f"train.max_steps={steps}", *args,
                       f"scaling.num_workers={workers}", "--max-failures", "1", cwd=root,
                       env={CRASH_AT_STEP_ENV: str(every + 2), "PYTHONUNBUFFERED": "1"})
        assert crashed.returncode == 0, show(crashed)
        done[kind, workers] = (losses(root / f"{kind}-ref-{workers}"), losses(root / name),
                               crashed.stdout + crashed.stderr, every)
        return done[kind, workers]

    return get


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_restart_mid_epoch_logs_the_losses_of_the_uninterrupted_run(runs, kind):
    reference, restarted, output, every = runs(kind)
    assert [s for s, _ in restarted] == [s for s, _ in reference] == list(range(1, every + 4))
    assert restarted == reference  # identical floats, every step, before and after the restart
    line = re.search(r"resumed from step (\d+), epoch (\d+) record ([\d,]+): (\d+) steps? repeated", output)
    assert line, output[-3000:]
    assert (int(line[1]), int(line[2]), int(line[3].replace(",", ""))) == checkpoint_position(kind)
    assert f"  resume      resumed from step {every}, epoch" in output  # the run summary says it too


def test_two_workers_restarted_mid_epoch_follow_the_uninterrupted_two_worker_run(runs):
    reference, restarted, output, every = runs("image", workers=2)
    assert [s for s, _ in restarted] == [s for s, _ in reference] == list(range(1, every + 4))
    for (step, want), (_, got) in zip(reference, restarted, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), f"step {step}"
    assert re.search(rf"resumed from step {every}, epoch 1 record 256: \d+ steps? repeated", output)
    # and the 2-worker run is the 1-worker run, up to float summation order (measured: 1.1e-5 at step 11)
    one_worker, *_ = runs("image")
    for (step, want), (_, got) in zip(one_worker, reference, strict=True):
        assert got == pytest.approx(want, rel=1e-4), f"step {step}"


# ----------------------------------------------------------------------------- in-process: the fingerprint


def test_a_changed_fingerprint_refuses_the_exact_resume_in_one_line_or_starts_a_fresh_epoch():
    stored = {"corpus": "digits", "records": 1437, "seed": 0, "batch_size": 64}
    assert fingerprint_change(stored, dict(stored)) is None
    assert fingerprint_change(stored, {**stored, "batch_size": 32}) == "batch_size 64 -> 32"
    cfg = load_config("simclr-digits", ["name=r"])
    state = TrainState(step=30, epoch=1, epoch_step=8, data=stored)
    with pytest.raises(ValueError, match=r"^cannot resume run r exactly from step 30: seed 0 -> 1; .*"
                                         r"train\.resume=steps_only") as e:
        place_in_epoch(state, {**stored, "seed": 1}, resuming=True, cfg=cfg)
    assert "\n" not in str(e.value)
    place_in_epoch(state, dict(stored), resuming=True, cfg=cfg)  # unchanged: the position stays
    assert (state.epoch, state.epoch_step) == (1, 8)
    lenient = load_config("simclr-digits", ["name=r", "train.resume=steps_only"])
    place_in_epoch(state, {**stored, "seed": 1}, resuming=True, cfg=lenient)
    assert (state.step, state.epoch, state.epoch_step, state.data["seed"]) == (30, 2, 0, 1)


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_checkpoints_the_current_step_and_the_rerun_repeats_none(sslp, tmp_path):
    """SIGTERM to `sslp run` (what `ray job stop`, a spot notice or a Kubernetes eviction sends):
    exit 143 with a checkpoint of the last step taken; the same command resumes there."""
    import signal

    from test_faults import checkpoint_step, wait_for

    from ssl_platform.train.metrics import read_metrics

    def logged_steps(run_dir: Path) -> list[int]:
        return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]  # a torn last line is left out

    preset, batch, tiny = KINDS["image"]
    args = ("run", preset, "name=term", f"runs_dir={tmp_path}", "train.max_steps=400", *COMMON,
            f"train.batch_size={batch}", *tiny, "train.checkpoint_every=1000")
    run_dir, log = tmp_path / "term", tmp_path / "term.log"
    proc = sslp.popen(*args, cwd=tmp_path, log=log, env={"PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: len(logged_steps(run_dir)) >= 3 or proc.poll() is not None, "the first steps")
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert returncode == 143, output[-3000:]
    assert "sslp: preempted: stopped on SIGTERM at step" in output.strip().splitlines()[-1]
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    stopped_at = checkpoint_step(checkpoints[-1])
    assert 3 <= stopped_at < 400 and logged_steps(run_dir)[-1] == stopped_at  # nothing past the checkpoint

    again = sslp(*args, cwd=tmp_path)
    assert again.returncode == 0, show(again)
    assert re.search(rf"resume +resumed from step {stopped_at}, epoch \d+ record [\d,]+: 0 steps repeated",
                     again.stdout), show(again)
    assert logged_steps(run_dir) == list(range(1, 401))


def test_the_driver_refuses_a_changed_fingerprint_before_any_worker_starts(tmp_path):
    from ssl_platform.train.checkpoint import POSITION_FILE, STATE_FILE
    from ssl_platform.train.storage import run_paths
    from ssl_platform.train.trainer import check_exact_resume

    cfg = load_config("simclr-digits", ["name=r", f"runs_dir={tmp_path}"])
    paths = run_paths(cfg)
    fingerprint = {"corpus": "digits", "records": 1437, "seed": 0, "batch_size": 256}
    check_exact_resume(cfg, paths, fingerprint)  # nothing to resume from
    checkpoint = paths.local / "checkpoint_2026-12-04_10-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=r"^cannot resume run r exactly from its newest checkpoint: the checkpoint "
                                         r"records no data position"):
        check_exact_resume(cfg, paths, fingerprint)
    position = {"step": 40, "epoch": 7, "epoch_step": 3, "data": {**fingerprint, "batch_size": 128}}
    (checkpoint / POSITION_FILE).write_text(json.dumps(position))
    with pytest.raises(ValueError, match=r"^cannot resume run r exactly from step 40: batch_size 128 -> 256; "):
        check_exact_resume(cfg, paths, fingerprint)
    check_exact_resume(load_config("simclr-digits", ["name=r", f"runs_dir={tmp_path}", "train.resume=steps_only"]),
                       paths, fingerprint)  # accepted
    (checkpoint / POSITION_FILE).write_text(json.dumps({**position, "data": fingerprint}))
    check_exact_resume(cfg, paths, fingerprint)  # the same data: exact


# ----------------------------------------------------------------------------- the per-worker stream


def test_the_stream_reads_only_the_ids_after_the_skip_in_order(ray_session):
    import numpy as np

    from ssl_platform.data.order import epoch_order, worker_ids
    from ssl_platform.data.ordered import AsIs, epoch_stream, ordered_corpus

    corpus = ordered_corpus("ids", {"id": np.arange(1000)}, seed=4, transform=AsIs)  # rows: the ids read
    order = epoch_order(1000, 4, 2)
    for rank in (0, 1):
        rows = epoch_stream(corpus, epoch=2, rank=rank, world=2, batch_size=64, skip=96, chunk=50).take_all()
        # Every row the transform saw is one of this worker's ids after the first 96, in order:
        # the skipped records were never read.
        assert [r["id"] for r in rows] == worker_ids(order, 64, rank, 2)[96:].tolist()
    assert epoch_stream(corpus, epoch=2, rank=0, world=2, batch_size=64, skip=15 * 32) is None  # all consumed
