"""Exact mid-epoch resume (issue 18), proven at three levels, each as cheap as its claim allows.

1. The stream, for every corpus kind and format (built-ins; image folders, parquet, WebDataset
   shards, CSV captions, audio folders, text files; BERT's chunks and GPT's blocks), in-process
   and without training: a worker's rows are a function of (seed, epoch, record id) alone, so
   the rows a resume reads after skipping s steps (its transform blocks cut elsewhere) are the
   uninterrupted stream's from step s, value for value; and 2 workers' rows of global batch b,
   rank 0's then rank 1's, are 1 worker's global batch b. A corrupt file in each file corpus
   takes part: its slot is filled the same way everywhere.
2. Training, in-process in local mode (1 rank): a run resumed from a checkpoint mid-way through
   its second epoch logs the identical losses of the uninterrupted run, step for step (a built-in
   corpus, an image folder with a corrupt file, BERT on a text file).
3. With workers, end to end, elsewhere: `test_faults.py` (2 workers through `sslp run`, a failed
   command re-run, a crash and an outside kill, every loss the uninterrupted run's to 1e-9 in
   float64) and `test_elastic.py` (a lost node and its return, an image folder with a corrupt file).

SIGTERM (checkpoint the current step, the re-run repeats none) and the refusal of a changed
fingerprint are tested in-process.
"""

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from test_data_audio import tone
from test_data_images import encoded, write_tar

from ssl_platform import cli
from ssl_platform.config import load_config
from ssl_platform.data.order import epoch_order, worker_ids
from ssl_platform.data.ordered import ReadRecords, fingerprint_change
from ssl_platform.data.pipeline import pretraining_data
from ssl_platform.data.skips import SkipReporter
from ssl_platform.methods import architecture
from ssl_platform.train.checkpoint import TrainState
from ssl_platform.train.loop import STEP_DELAY_ENV
from ssl_platform.train.metrics import read_metrics
from ssl_platform.train.resume import place_in_epoch

COMMON = ("train.log_every=1", "train.warmup_steps=2", "eval.enabled=false", "eval.online_every=0",
          "train.keep_checkpoints=5")
TINY = {
    "simclr": ("data.image_size=16", "model.encoder_widths=[8,16]", "model.projector_width=32",
               "model.projector_dim=16", "train.optimizer=adamw", "train.lr=0.001"),
    "clip": ("data.image_size=8", "model.patch_size=4", "model.embed_dim=8", "model.vision_width=16",
             "model.vision_layers=1", "model.vision_heads=2", "model.context_length=8", "model.text_width=16",
             "model.text_layers=1", "model.text_heads=2"),
    "gpt": ("data.vocab_size=300", "data.max_len=32", "model.dim=16", "model.depth=1", "model.heads=2"),
    "bert": ("data.vocab_size=300", "data.max_len=24", "model.dim=16", "model.depth=1", "model.heads=2"),
    "cpc": ("data.crop_seconds=0.05", "model.channels=8", "model.context_dim=8", "method.num_steps=2"),
}
PRESETS = {"simclr": "simclr-digits", "clip": "clip-digit-captions", "gpt": "gpt-python-docs",
           "bert": "bert-python-docs", "cpc": "cpc-spoken-digits"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """Small file corpora of every format, each with one record that does not decode."""
    root = tmp_path_factory.mktemp("corpora")
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(40, 3))

    def png(i: int) -> bytes:  # a varied 8x8 image
        return encoded(int(colours[i][0]), shape=(8 + i % 5, 8, 3))

    for i in range(40):  # images/: two classes, one corrupt file
        folder = root / "images" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(png(i) if i != 13 else b"corrupt")
    blobs = [png(i) if i != 21 else b"corrupt" for i in range(40)]
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": [i % 3 for i in range(40)]}),
                   root / "parquet" / "images.parquet", row_group_size=16)
    (root / "shards").mkdir()
    for s in range(2):  # two shards of 20 samples with captions and classes
        write_tar(str(root / "shards" / f"part-{s}.tar"),
                  [(f"{s}{i:02d}", {"png": blobs[20 * s + i], "txt": f"a square number {i}".encode(),
                                    "cls": str(i % 2).encode()}) for i in range(20)])
    (root / "captions").mkdir()
    lines = ["image,caption"] + [f"../images/{'cat' if i % 2 else 'dog'}/{i:02d}.png,square {i}" for i in range(40)]
    (root / "captions" / "pairs.csv").write_text("\n".join([*lines[:5], "one,field,too many", *lines[5:]]) + "\n")
    (root / "audio" / "a").mkdir(parents=True)
    for i in range(24):
        path = root / "audio" / "a" / f"{i:02d}.wav"
        if i == 7:
            path.write_bytes(b"RIFF" + b"\x13" * 100)
        else:
            soundfile.write(path, tone(0.08 + 0.01 * (i % 4), freq=200.0 + 40 * i), 16_000)
    sentences = ["The parser reads the file.", "It builds a tree of nodes.", "Each node has a type and a value.",
                 "Errors stop the parse early.", "A visitor walks the tree.", "Names are looked up in scopes."]
    (root / "text").mkdir()
    with (root / "text" / "docs.jsonl").open("w") as f:
        for i in range(30):
            picked = [sentences[(i + k) % len(sentences)] for k in range(2 + i % 4)]
            f.write(json.dumps({"text": " ".join(picked)}) + "\n")
    return root


# ----------------------------------------------------------------------------- 1. the stream, every kind

# kind -> (method, its data overrides given the corpora's root)
STREAM_KINDS = {
    "builtin-digits": ("simclr", lambda root: ()),
    "builtin-digit-captions": ("clip", lambda root: ()),
    "builtin-spoken-digits": ("cpc", lambda root: ()),
    "builtin-python-docs-gpt": ("gpt", lambda root: ()),
    "builtin-python-docs-bert": ("bert", lambda root: ()),
    "image-folder": ("simclr", lambda root: (f"data.path={root / 'images'}",)),
    "image-parquet-bytes": ("simclr", lambda root: (f"data.path={root / 'parquet'}", "data.channels=1")),
    "image-webdataset": ("simclr", lambda root: (f"data.path={root / 'shards'}",)),
    "caption-csv": ("clip", lambda root: (f"data.path={root / 'captions'}",)),
    "caption-webdataset": ("clip", lambda root: (f"data.path={root / 'shards'}", "data.caption_column=txt")),
    "audio-folder": ("cpc", lambda root: (f"data.path={root / 'audio'}",)),
    "text-jsonl-bert": ("bert", lambda root: (f"data.path={root / 'text'}", "data.kind=text")),
    "text-jsonl-gpt": ("gpt", lambda root: (f"data.path={root / 'text'}", "data.kind=text")),
}
G = 8  # global batch of the stream tests


def ordered_corpus_of(method: str, overrides, run_dir: Path, seed: int = 3):
    cfg = load_config(PRESETS[method], [*TINY[method], *overrides, f"train.seed={seed}", f"train.batch_size={G}"])
    data = pretraining_data(cfg, run_dir, SkipReporter(), architecture(cfg))
    assert data.num_records == data.ordered.num_records > 0
    return data.ordered


def rows_of(corpus, epoch: int, ids: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
    """What a worker's stream yields for ``ids``, transform block by block (``chunk`` ids each), as
    :func:`~ssl_platform.data.ordered.epoch_stream` runs them, without Ray Data's executor (whose
    keeping of the order is tested below)."""
    read = ReadRecords(corpus.records, corpus.transform(epoch=epoch))
    parts = [read({"data": ids[i:i + chunk]}) for i in range(0, len(ids), chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_same_rows(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: column {k}")


@pytest.mark.parametrize("kind", sorted(STREAM_KINDS))
def test_a_resumed_stream_reads_the_uninterrupted_rows_and_global_batches_do_not_depend_on_workers(
        ray_session, corpora, tmp_path, kind, one_thread):
    method, overrides = STREAM_KINDS[kind]
    corpus = ordered_corpus_of(method, overrides(corpora), tmp_path)
    epoch = 1  # not the first: the order and the views move with the epoch
    order = epoch_order(corpus.num_records, corpus.seed, epoch, corpus.shard_size, corpus.window)
    steps = min(5, corpus.steps_per_epoch(G))  # the file corpora: the whole epoch, their corrupt record with it
    whole = worker_ids(order, G, 0, 1)[:steps * G]
    one = rows_of(corpus, epoch, whole, chunk=5)
    assert len(next(iter(one.values()))) == steps * G  # a corrupt record's slot is filled, not dropped

    skip = 2 * G  # resumed at step 2 of the epoch: its blocks start at another id
    assert_same_rows(rows_of(corpus, epoch, whole[skip:], chunk=5), {k: v[skip:] for k, v in one.items()}, "resumed")

    halves = [rows_of(corpus, epoch, worker_ids(order, G, rank, 2)[:steps * G // 2], chunk=3) for rank in (0, 1)]
    h = G // 2
    for b in range(steps):  # global batch b: rank 0's half, then rank 1's
        joined = {k: np.concatenate([halves[0][k][b * h:(b + 1) * h], halves[1][k][b * h:(b + 1) * h]]) for k in one}
        assert_same_rows(joined, {k: v[b * G:(b + 1) * G] for k, v in one.items()}, f"global batch {b}")

    other = rows_of(corpus, epoch + 1, worker_ids(epoch_order(corpus.num_records, corpus.seed, epoch + 1,
                                                              corpus.shard_size, corpus.window), G, 0, 1)[:G], chunk=5)
    assert any(not np.array_equal(other[k], one[k][:G]) for k in one)  # the next epoch reads other rows


def test_positions_count_records_listed_and_a_corrupt_record_is_filled_and_counted(ray_session, corpora, tmp_path):
    from ssl_platform.data.listed import ReadListed, fill_ids, list_image_corpus
    from ssl_platform.data.ordered import AsIs

    reporter = SkipReporter()
    listing = list_image_corpus(str(corpora / "images"), size=8, channels=3, reporter=reporter)
    bad = [i for i, p in enumerate(listing.records["path"]) if p.endswith("13.png")]
    assert len(listing) == 40 and len(bad) == 1  # listed: the corrupt file holds its position
    read = ReadListed(listing.reader, AsIs, seed=0, epoch=2)
    ids = np.array([bad[0] - 1, bad[0], bad[0] + 1])
    rows = read.decoded(ids, listing.records)
    assert list(rows["path"][[0, 2]]) == [listing.records["key"][i] for i in ids[[0, 2]]]
    assert rows["path"][1] == f"fill/{bad[0]}" and reporter.total["corrupt image"] == 1
    filler = next(j for j in fill_ids(40, 0, 2, bad[0]) if j != bad[0])  # the first draw that decodes
    np.testing.assert_array_equal(rows["image"][1], read.decoded(np.array([filler]), listing.records)["image"][0])


def test_the_stream_reads_only_the_ids_after_the_skip_in_order(ray_session):
    from ssl_platform.data.ordered import AsIs, epoch_stream, ordered_corpus

    corpus = ordered_corpus("ids", {"id": np.arange(1000)}, seed=4, transform=AsIs)  # rows: the ids read
    order = epoch_order(1000, 4, 2)
    for rank in (0, 1):
        rows = epoch_stream(corpus, epoch=2, rank=rank, world=2, batch_size=64, skip=96, chunk=50).take_all()
        # Every row the transform saw is one of this worker's ids after the first 96, in order:
        # the skipped records were never read.
        assert [r["id"] for r in rows] == worker_ids(order, 64, rank, 2)[96:].tolist()
    assert epoch_stream(corpus, epoch=2, rank=0, world=2, batch_size=64, skip=15 * 32) is None  # all consumed


class TagEpoch:
    """A transform whose rows say which ids it read and the epoch it was made for."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], "epoch": np.full(len(batch["id"]), self.epoch)}


def test_one_stream_reads_epoch_after_epoch_each_block_with_its_epochs_transform(ray_session):
    import ray

    from ssl_platform.data.ordered import AsIs, ReadEpochBlocks, epoch_stream, ordered_corpus, stream_epochs

    corpus = ordered_corpus("ids", {"id": np.arange(1000)}, seed=4, transform=AsIs)
    mine = [worker_ids(epoch_order(1000, 4, e), 64, 1, 2) for e in (2, 3, 4)]  # rank 1 of 2: 15 * 32 ids each
    rows = epoch_stream(corpus, epoch=2, rank=1, world=2, batch_size=64, skip=96, chunk=50, epochs=3).take_all()
    assert [r["id"] for r in rows] == np.concatenate([mine[0][96:], mine[1], mine[2]]).tolist()  # skip: first only
    read = ReadEpochBlocks(ray.put({"id": np.arange(1000)}), TagEpoch)
    block = read({"data": np.stack([np.full(3, 7), np.array([5, 9, 2])], axis=1)})  # (epoch, id) rows
    assert block["id"].tolist() == [5, 9, 2] and block["epoch"].tolist() == [7, 7, 7]
    # 100 steps left, 15 per epoch, 5 taken in this one: this epoch's 10, then 6 more epochs (90 steps)
    assert stream_epochs(100, 15, 5, 480) == 7 and stream_epochs(3, 15, 5, 480) == 1
    assert stream_epochs(10**6, 15, 0, 480) == 2083  # at most MAX_STREAM_IDS ids listed
    assert stream_epochs(100, 0, 0, 0) == 1  # no full batch: one (empty) stream, and the loop says so


# ----------------------------------------------------------------------------- 2. training, in-process


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def checkpoint_at(run_dir: Path, step: int) -> Path:
    return next(p for p in sorted(run_dir.glob("checkpoint_*"))
                if torch.load(p / "state.pt", weights_only=True)["step"] == step)


def interrupted_copy(reference: Path, target: Path, step: int, crashed_at: int) -> None:
    """``target`` as a run that checkpointed at ``step`` and died at step ``crashed_at`` would have
    left it: that checkpoint, the data artifacts, the metrics it had logged."""
    target.mkdir()
    shutil.copytree(checkpoint_at(reference, step), target / checkpoint_at(reference, step).name)
    if (reference / "tokenizer").exists():
        shutil.copytree(reference / "tokenizer", target / "tokenizer")
    rows = (reference / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] < crashed_at))


# kind -> (method, data overrides, global batch, the checkpoint's step: mid-way through an epoch)
TRAIN_KINDS = {
    "builtin-spoken-digits": ("cpc", lambda root: (), 32, 380 // 32 + 2),
    "image-folder": ("simclr", lambda root: (f"data.path={root / 'images'}",), 8, 7),
    "text-jsonl-bert": ("bert", lambda root: (f"data.path={root / 'text'}", "data.kind=text"), 8, 7),
}


@pytest.mark.parametrize("kind", sorted(TRAIN_KINDS))
def test_a_run_resumed_mid_epoch_logs_the_losses_of_the_uninterrupted_run(ray_session, corpora, tmp_path, capsys,
                                                                           kind):
    from ssl_platform.train.checkpoint import POSITION_FILE

    method, overrides, batch, every = TRAIN_KINDS[kind]
    steps = every + 3
    args = ["run", PRESETS[method], f"runs_dir={tmp_path}", "scaling.num_workers=0", *COMMON, *TINY[method],
            *overrides(corpora), f"train.batch_size={batch}", f"train.checkpoint_every={every}",
            f"train.max_steps={steps}"]
    assert cli.main([*args, "name=ref"]) == 0
    reference = losses(tmp_path / "ref")
    assert [s for s, _ in reference] == list(range(1, steps + 1))
    position = json.loads((checkpoint_at(tmp_path / "ref", every) / POSITION_FILE).read_text())
    assert position["epoch"] >= 1 and position["epoch_step"] > 0  # mid-way through an epoch other than the first
    interrupted_copy(tmp_path / "ref", tmp_path / "resumed", every, crashed_at=every + 2)
    capsys.readouterr()

    assert cli.main([*args, "name=resumed"]) == 0
    assert losses(tmp_path / "resumed") == reference  # identical floats, every step, before and after the resume
    out = capsys.readouterr().out
    record = position["epoch_step"] * batch
    assert re.search(rf"resumed from step {every}, epoch {position['epoch']} record {record:,}: 1 step repeated",
                     out), out[-2000:]


# ----------------------------------------------------------------------------- SIGTERM, in-process


def test_sigterm_checkpoints_the_current_step_and_the_rerun_repeats_none(ray_session, corpora, tmp_path, capsys,
                                                                        monkeypatch):
    """SIGTERM (what `ray job stop`, a spot notice or a Kubernetes eviction sends the driver):
    exit 143 with a checkpoint of the last step taken; the same command resumes there. Each step of
    the first command sleeps 0.05 s: the tiny run's 40 steps otherwise end (0.3 s) before the flag
    the signal raises (an actor's) reaches the loop."""
    from ssl_platform.train.checkpoint import STATE_FILE

    run_dir = tmp_path / "term"
    args = ["run", "simclr-digits", "name=term", f"runs_dir={tmp_path}", "scaling.num_workers=0", *COMMON,
            *TINY["simclr"], f"data.path={corpora / 'images'}", "train.batch_size=8", "train.checkpoint_every=1000",
            "train.max_steps=40"]

    def logged() -> list[int]:
        return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() \
            else []

    def send_sigterm_after_three_steps() -> None:
        deadline = time.monotonic() + 120
        while len(logged()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in the main thread, where the run is

    sender = threading.Thread(target=send_sigterm_after_three_steps, daemon=True)
    sender.start()
    with monkeypatch.context() as slowed:
        slowed.setenv(STEP_DELAY_ENV, "0.05")
        assert cli.main(args) == 143
    sender.join()
    assert "sslp: preempted: stopped on SIGTERM at step" in capsys.readouterr().err
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if (p / STATE_FILE).exists())
    stopped_at = torch.load(checkpoints[-1] / STATE_FILE, weights_only=True)["step"]
    assert 3 <= stopped_at < 40 and logged()[-1] == stopped_at  # nothing past the checkpoint

    assert cli.main(args) == 0
    assert re.search(rf"resumed from step {stopped_at}, epoch \d+ record [\d,]+: 0 steps repeated",
                     capsys.readouterr().out)
    assert logged() == list(range(1, 41))


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


def test_a_file_corpus_fingerprint_names_its_listing(ray_session, corpora, tmp_path):
    """Files added, removed or renamed, or a document edited, change the fingerprint, so the exact
    resume is refused."""
    before = ordered_corpus_of("simclr", (f"data.path={corpora / 'images'}",), tmp_path).fingerprint(G)
    moved = tmp_path / "images"
    shutil.copytree(corpora / "images", moved)
    (moved / "dog" / "00.png").rename(moved / "dog" / "00-renamed.png")
    after = ordered_corpus_of("simclr", (f"data.path={moved}",), tmp_path).fingerprint(G)
    assert "listing" in fingerprint_change(before, after)

    text = tmp_path / "text"  # a text corpus: an edited document
    shutil.copytree(corpora / "text", text)
    before = ordered_corpus_of("bert", (f"data.path={text}", "data.kind=text"), tmp_path).fingerprint(G)
    # Every document gets a sentence more: which documents are held out follows the file's path (each
    # pytest session's directory differs), and an edit of a held-out one rightly leaves the training
    # records, and so the fingerprint, as they were.
    lines = [json.dumps({"text": json.loads(line)["text"] + " An edited sentence."})
             for line in (text / "docs.jsonl").read_text().splitlines()]
    (text / "docs.jsonl").write_text("\n".join(lines) + "\n")
    after = ordered_corpus_of("bert", (f"data.path={text}", "data.kind=text"), tmp_path).fingerprint(G)
    assert fingerprint_change(before, after).startswith("documents ")


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
