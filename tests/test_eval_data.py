"""Evaluation on the user's own labels (``eval.data``): the same tables and online metric as a
built-in corpus, from an image folder, a CSV of captions with classes or an audio folder; bad
labelled data refused in one line before training, a corrupt record skipped and counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from simclr_digits import SIZE, save_checkpoint, tiny_cfg
from test_eval_clip import TINY as CLIP_TINY

from ssl_platform import cli, methods
from ssl_platform.config import ConfigError, load_config, with_overrides
from ssl_platform.data.builtin import DIGIT_NAMES, load_digits_splits
from ssl_platform.data.labelled import audio_splits, caption_splits, check_eval_data, image_splits
from ssl_platform.data.online import online_split
from ssl_platform.data.spoken_digits import data_dir
from ssl_platform.evaluate import evaluate_run
from ssl_platform.evaluate.inference import build_method

pytestmark = pytest.mark.usefixtures("ray_session")  # see conftest

PER_CLASS = 30  # images of each digit in the labelled folder


def png(path: Path, image: np.ndarray) -> None:
    """A (1, S, S) uint8 image as a grey PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[0]).save(path)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """The first 30 digits of each class as PNG files in a folder per class name, plus a corrupt
    file in a class folder and an image outside every class folder: the user's labelled corpus."""
    root = tmp_path_factory.mktemp("labelled") / "digits"
    train = load_digits_splits(image_size=SIZE)["train"]
    for c, name in enumerate(DIGIT_NAMES):
        for k, i in enumerate(np.flatnonzero(train.labels == c)[:PER_CLASS]):
            png(root / name / f"{k:03d}.png", train.images[i])
    (root / "three" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    png(root / "unsorted.png", train.images[0])
    return root


def test_an_image_run_is_evaluated_on_the_users_folder(trained_simclr, digit_folder, tmp_path):
    cfg, checkpoint = trained_simclr
    cfg = with_overrides(cfg.to_dict(), [f"eval.data={digit_folder}", "eval.knn_k=10"])
    rows = {r["encoder"]: r for r in evaluate_run(cfg, checkpoint, tmp_path)}

    assert set(rows) == {"raw pixels", "random init", "SimCLR (this run)"}
    # The trained encoder's lead over random init holds on the user's labels too (measured here:
    # kNN 0.93 against 0.43 for random init, probe 0.93 against 0.68).
    assert rows["SimCLR (this run)"]["knn_top1"] > rows["random init"]["knn_top1"] + 0.05, rows
    saved = json.loads((tmp_path / "results.json").read_text())
    # 10 classes of 30 good images, 6 of each held out (data.val_fraction=0.2).
    assert f"on {digit_folder} (240 train / 60 held-out, 10 classes)" in saved["title"]
    assert "corrupt image 1" in saved["notes"] and "no label 1" in saved["notes"], saved["notes"]


def test_the_split_is_stratified_ordered_by_path_and_fixed_by_the_seed(digit_folder):
    cfg = tiny_cfg(f"eval.data={digit_folder}")
    splits, note = image_splits(cfg)
    train, val = splits["train"], splits["val"]
    assert train.class_names == tuple(sorted(DIGIT_NAMES))  # folder names, sorted: eight, five, ...
    assert np.bincount(val.labels).tolist() == [6] * 10 and np.bincount(train.labels).tolist() == [24] * 10
    assert train.images.shape[1:] == (1, SIZE, SIZE)  # decoded with the channels the encoder was trained on
    assert "skipped 2 records" in note
    again, _ = image_splits(with_overrides(cfg.to_dict(), ["train.seed=1"]))
    assert not np.array_equal(again["val"].images, val.images)  # another seed holds out other images

    # The online metric takes its queries and bank from the same labelled data.
    online = online_split(cfg, methods.architecture(cfg), {})
    assert set(np.unique(online["label"])) == set(range(10))
    assert online["image"].shape[1:] == (1, SIZE, SIZE)


@pytest.mark.parametrize("layout, message", [
    ({"a.png": None, "b.png": None}, "has no labels: put each class's images in a sub-folder of its own"),
    ({"cat/a.png": None, "cat/b.png": None}, r"has one class \(cat\); a probe needs at least 2"),
    ({"cat/a.png": None, "cat/b.png": None, "dog/a.png": None}, "class 'dog' has 1 example"),
    ({"cat/a.png": b"junk", "dog/b.png": b""}, r"none of its 2 records can be used \(skipped 2 records: "),
])
def test_unusable_labelled_data_is_refused_naming_what_is_wrong(tmp_path, layout, message):
    image = load_digits_splits(image_size=SIZE)["val"].images[0]
    for name, content in layout.items():
        if content is None:
            png(tmp_path / name, image)
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        check_eval_data(tiny_cfg(f"eval.data={tmp_path}", "name=refused"))


def test_a_run_with_unusable_eval_data_stops_before_training(tmp_path, capsys):
    flat = tmp_path / "flat"
    png(flat / "a.png", load_digits_splits(image_size=SIZE)["val"].images[0])
    assert cli.main(["run", "simclr-digits", "name=bad-eval", f"runs_dir={tmp_path}", "scaling.num_workers=0",
                     "data.image_size=16", "model.encoder_widths=[8,16]", f"eval.data={flat}"]) == cli.EXIT_USAGE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sslp: ") and f"eval.data={flat} has no labels" in last, last
    assert not list((tmp_path / "bad-eval").glob("checkpoint_*"))  # nothing was trained


def test_a_run_on_the_users_corpus_gets_the_table_and_the_online_metric(digit_folder, tmp_path, capsys):
    """``data.path`` without labels of its own (here the same folder, read as a training corpus),
    ``eval.data`` labelled: the end-of-run table and the online kNN, as on a built-in corpus."""
    assert cli.main(["run", "simclr-digits", "name=own", f"runs_dir={tmp_path}", "scaling.num_workers=0",
                     f"data.path={digit_folder}", "data.channels=1", f"eval.data={digit_folder}",
                     "data.image_size=16", "model.encoder_widths=[8,16]", "train.batch_size=64", "train.max_steps=4",
                     "train.checkpoint_every=4", "eval.online_every=2", "eval.supervised_epochs=0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "own" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_knn_top1" in r] == [2, 4]
    saved = json.loads((tmp_path / "own" / "results.json").read_text())
    assert [r["encoder"] for r in saved["rows"]] == ["raw pixels", "random init", "SimCLR (this run)"]
    assert f"on {digit_folder} (240 train / 60 held-out, 10 classes)" in saved["title"]


def test_the_config_points_a_data_path_run_at_eval_data(tmp_path):
    # methods.validate: what every entry point (sslp run/sweep/submit) checks before Ray starts
    with pytest.raises(ConfigError, match=r"set eval\.data=PATH to a labelled image corpus"):
        methods.validate(load_config("simclr-digits", [f"data.path={tmp_path}"]))
    methods.validate(load_config("simclr-digits", [f"data.path={tmp_path}", f"eval.data={tmp_path}"]))  # accepted
    with pytest.raises(ConfigError, match="gpt is evaluated on the held-out split of the corpus it trains on"):
        methods.validate(load_config("gpt-python-docs", [f"eval.data={tmp_path}"]))


def test_clip_is_evaluated_on_a_csv_of_captions_with_classes(tmp_path):
    """Zero-shot over the user's class names (generic prompts), retrieval and the probe, from a CSV."""
    val = load_digits_splits(image_size=SIZE)["val"]
    names = {0: "circle", 1: "stick", 7: "hook"}
    lines = ["image,caption,label"]
    for c, name in names.items():
        for k, i in enumerate(np.flatnonzero(val.labels == c)[:10]):
            png(tmp_path / "imgs" / f"{c}-{k}.png", val.images[i])
            lines.append(f"imgs/{c}-{k}.png,a {name} drawn by hand,{name}")
    lines.append("imgs/0-0.png,a shape nobody named,")  # no class: skipped and counted
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")

    cfg = load_config("clip-digit-captions", [*CLIP_TINY, f"eval.data={tmp_path / 'pairs.csv'}", "name=clip-own"])
    splits, note = caption_splits(cfg)
    assert splits["train"].class_names == ("circle", "hook", "stick")
    assert len(splits["train"]) + len(splits["val"]) == 30 and "no label 1" in note
    assert splits["val"].captions[0].startswith("a ") and splits["val"].images.shape[1] == 1

    derived = {**methods.expected_derived(cfg), "in_channels": 1}
    (tmp_path / "checkpoint_000000").mkdir()
    save_checkpoint(tmp_path / "checkpoint_000000", cfg, build_method(cfg, derived, None, seed=0))
    rows = evaluate_run(cfg, tmp_path / "checkpoint_000000", tmp_path / "run")
    assert [r["encoder"] for r in rows] == ["random init", "CLIP (this run)"]
    assert all(0 <= r["zero_shot_top1"] <= 1 and 0 <= r["i2t_r1"] <= 1 for r in rows)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "pairs.csv (24 train / 6 held-out pairs, 3 classes)" in saved["title"]


def test_cpc_is_evaluated_on_an_audio_folder_per_class(tmp_path):
    """Two words of spoken-digits copied into a folder per class, one file corrupt."""
    for word in ("yes", "no"):
        source = data_dir() / ("one" if word == "yes" else "two")
        for f in sorted(source.glob("*.flac"))[:8]:
            (tmp_path / "clips" / word).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp_path / "clips" / word / f.name)
    (tmp_path / "clips" / "no" / "broken.flac").write_bytes(b"fLaC but not really")
    cfg = load_config("cpc-spoken-digits", [f"eval.data={tmp_path / 'clips'}", "model.channels=32",
                                            "model.context_dim=32", "eval.batch_size=16"])
    splits, note = audio_splits(cfg)
    assert splits["train"].class_names == ("no", "yes")
    assert np.bincount(splits["val"].labels).tolist() == [2, 2] and len(splits["train"]) == 12
    assert "skipped 1 records" in note

    torch.manual_seed(0)
    (tmp_path / "checkpoint_000000").mkdir()
    save_checkpoint(tmp_path / "checkpoint_000000", cfg, methods.build(cfg, sample_rate=cfg.data.sample_rate))
    rows = evaluate_run(cfg, tmp_path / "checkpoint_000000", tmp_path / "run")
    assert [r["encoder"] for r in rows][:2] == ["CPC (this run)", "random init"]
    assert all(0 <= r["linear_probe_top1"] <= 1 for r in rows)
