"""Ray Data batch inference (evaluate.inference.extract) and the image protocol (evaluate.image)."""

import json
import time

import numpy as np
import pytest
import torch
from simclr_digits import DERIVED, SIZE, tiny_cfg

from ssl_platform.config import with_overrides
from ssl_platform.data.builtin import load_digits_splits
from ssl_platform.data.images import split_dataset
from ssl_platform.data.transforms import to_float
from ssl_platform.evaluate import evaluate_run
from ssl_platform.evaluate.image import embed_images
from ssl_platform.evaluate.inference import build_method, extract, extract_each

pytestmark = pytest.mark.usefixtures("ray_session")  # see conftest


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits(image_size=SIZE)


def driver_features(method, images: np.ndarray) -> np.ndarray:
    """The reference: the same encode on the driver, one batch, no Ray."""
    with torch.no_grad():
        return embed_images(method.eval(), {"image": torch.from_numpy(images)}).numpy()


# --- extract ------------------------------------------------------------------------------


def test_extract_rows_dims_and_kept_columns_align(digits):
    val = digits["val"]
    cfg = tiny_cfg("eval.batch_size=50")  # 360 rows: batches of 50, the last one short
    ds = split_dataset(val.images, "digits", label=val.labels, idx=np.arange(len(val)))
    out = extract(ds, cfg, DERIVED, None, embed_images, keep=("label", "idx"), seed=3)

    assert set(out) == {"features", "label", "idx"}
    assert out["features"].shape == (len(val), 16) and out["features"].dtype == np.float32
    assert sorted(out["idx"].tolist()) == list(range(len(val)))  # every row once
    np.testing.assert_array_equal(out["label"], val.labels[out["idx"]])  # kept columns travel with their row

    # state=None is exactly a manual random init under the same seed; another seed differs.
    reference = driver_features(build_method(cfg, DERIVED, None, seed=3), val.images)
    np.testing.assert_allclose(out["features"], reference[out["idx"]], atol=1e-5)
    other = driver_features(build_method(cfg, DERIVED, None, seed=4), val.images)
    assert np.abs(other[out["idx"]] - out["features"]).max() > 1e-2


def test_extract_each_encodes_every_row_with_each_encoder_in_one_pass_and_two_actors_match_one(digits):
    """The table's encoders (here trained weights and random init) in one pass: each one's features
    are what it computes on the driver, row-aligned with the others' and in the dataset's order even
    when the first batch finishes last (the probes' sums follow the row order); the state is loaded."""
    def embed_first_batch_last(method, batch):
        """embed_images, the batch holding row 0 held back 0.4 s. (Local, so it is pickled by
        value: the actors cannot import this test module.)"""
        if bool((batch["idx"] == 0).any()):
            time.sleep(0.4)  # the other actor's six batches of this tiny encoder take ~0.05 s
        return embed_images(method, batch)

    images = digits["val"].images[:200]
    method = build_method(tiny_cfg(), DERIVED, None, seed=0)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.1 * torch.randn_like(p))  # weights no seeded init produces
    ds = split_dataset(images, "digits", idx=np.arange(len(images)))
    features = {}
    for actors in (1, 2):
        cfg = tiny_cfg(f"eval.actors={actors}", "eval.batch_size=32")
        out = extract_each(ds, cfg, DERIVED, {"moved": method.state_dict(), "random": None}, embed_first_batch_last,
                           keep=("idx",), seed=3)
        assert list(out) == ["moved", "random"] and all(set(o) == {"features", "idx"} for o in out.values())
        for o in out.values():  # every row once, in the dataset's order, for each encoder
            np.testing.assert_array_equal(o["idx"], np.arange(len(images)))
        features[actors] = {name: o["features"] for name, o in out.items()}
    np.testing.assert_allclose(features[1]["moved"], driver_features(method, images), atol=1e-5)
    random_init = driver_features(build_method(tiny_cfg(), DERIVED, None, seed=3), images)
    np.testing.assert_allclose(features[1]["random"], random_init, atol=1e-5)
    for name in ("moved", "random"):
        np.testing.assert_allclose(features[2][name], features[1][name], atol=1e-6)


def test_extract_dict_result_and_bad_input(digits):
    def encode_both(method, batch):
        """A dict result: its keys come back as they are. (Local, so it is pickled by value: the
        actors cannot import this test module.)"""
        x = to_float(batch["image"])
        return {"embedding": method.embed({"image": x}), "mean_pixel": x.mean(dim=(1, 2, 3))}

    images = digits["val"].images[:40]
    cfg = tiny_cfg()
    ds = split_dataset(images, "digits")
    out = extract(ds, cfg, DERIVED, None, encode_both, keep=("path",))
    assert set(out) == {"embedding", "mean_pixel", "path"} and out["embedding"].shape == (40, 16)
    order = np.array([int(p.split("/")[1]) for p in out["path"]])  # paths are digits/000042
    np.testing.assert_allclose(out["mean_pixel"], to_float(images[order]).mean(dim=(1, 2, 3)).numpy(), atol=1e-6)

    with pytest.raises(ValueError, match="does not fit method simclr"):
        extract(ds, tiny_cfg("model.encoder_widths=[8,32]"), DERIVED, build_method(cfg, DERIVED, None).state_dict(),
                embed_images, keep=("path",))
    with pytest.raises(ValueError, match="sequence of column names"):
        extract(ds, cfg, DERIVED, None, embed_images, keep="label")
    with pytest.raises(ValueError, match=r"names columns \['label'\] that the dataset lacks"):
        extract(ds, cfg, DERIVED, None, embed_images)  # keep=("label",) by default; these rows have none


# --- the image protocol -------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(trained_simclr, tmp_path_factory):
    """The image protocol on the session's trained SimCLR (conftest.trained_simclr), with a
    supervised baseline of 10 epochs and the per-stage probes: (rows by encoder, the output folder)."""
    cfg, checkpoint = trained_simclr
    cfg = with_overrides(cfg.to_dict(), ["eval.supervised_epochs=10", "eval.knn_k=10", "eval.probe_stages=all"])
    out = tmp_path_factory.mktemp("eval") / "run"
    return evaluate_run(cfg, checkpoint, out), out


def test_image_protocol_rows_in_range_and_report(evaluated):
    rows, out = evaluated
    assert [r["encoder"] for r in rows] == ["raw pixels", "random init", "SimCLR (this run)", "supervised (labels)"]
    for row in rows:
        assert set(row) == {"encoder", "linear_probe_top1", "knn_top1"}
        assert 0.3 < row["linear_probe_top1"] <= 1.0 and 0.3 < row["knn_top1"] <= 1.0, row  # chance is 0.1
    assert rows[0]["linear_probe_top1"] > 0.9  # digits are easy from pixels
    scores = [(r["linear_probe_top1"], r["knn_top1"]) for r in rows]
    assert scores[2] != scores[1]  # the checkpoint's weights were evaluated, not a second random init

    saved = json.loads((out / "results.json").read_text())
    assert [r["encoder"] for r in saved["rows"]] == [r["encoder"] for r in rows]
    assert [r["knn_top1"] for r in saved["rows"]] == pytest.approx([r["knn_top1"] for r in rows])
    assert "| SimCLR (this run) |" in (out / "results.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_pretrained_simclr_and_supervised_beat_random_init(evaluated):
    """150 SimCLR steps against random init and a supervised encoder of the same architecture,
    under both protocols (the claim the README's table makes at full size)."""
    rows = {r["encoder"]: r for r in evaluated[0]}
    random_init, trained, supervised = rows["random init"], rows["SimCLR (this run)"], rows["supervised (labels)"]
    assert trained["knn_top1"] > random_init["knn_top1"] + 0.05, rows
    assert trained["linear_probe_top1"] > random_init["linear_probe_top1"], rows
    # Measured: probe/kNN 73.6/58.9 random init, 97.2/94.2 SimCLR, 90.8/85.0 supervised (10 epochs of a
    # 2-stage encoder of widths 8 and 16).
    assert supervised["linear_probe_top1"] > random_init["linear_probe_top1"] + 0.1, rows


def test_per_stage_probes_make_the_rotnet_table(evaluated):
    """eval.probe_stages=all: a probe on the stem and on each stage of every encoder, from the same
    features as the main table (its deepest stage is the encoder's output)."""
    rows, out = evaluated
    saved = json.loads((out / "results.json").read_text())
    stages = {r["encoder"]: r for r in saved["probe_stages"]}
    assert list(stages) == ["random init", "SimCLR (this run)", "supervised (labels)"]
    for row in rows[1:]:
        per_stage = stages[row["encoder"]]
        assert list(per_stage) == ["encoder", "stem", "stage1", "stage2"]  # model.encoder_widths=[8,16]
        assert per_stage["stage2"] == pytest.approx(row["linear_probe_top1"])
        assert all(0.1 <= per_stage[k] <= 1.0 for k in ("stem", "stage1", "stage2")), per_stage
    # Pretraining helps most where the features are deepest (measured, stem / stage1 / stage2: 70.0 /
    # 70.8 / 73.6 for random init, 80.0 / 75.0 / 96.4 for SimCLR).
    assert stages["SimCLR (this run)"]["stage2"] > stages["random init"]["stage2"] + 0.1, stages
    assert "| linear probe top-1 per stage | stem | stage1 | stage2 |" in (out / "results.md").read_text()


def test_image_protocol_rejects_a_corpus_without_labels(tmp_path):
    # The config check is the first line of defence; with evaluation off it lets the path through.
    cfg = tiny_cfg(f"data.path={tmp_path}", "eval.enabled=false", "eval.online_every=0")
    with pytest.raises(ValueError, match=r"set eval\.data=PATH to a labelled corpus"):
        evaluate_run(cfg, tmp_path, tmp_path / "run")
