"""Frozen-feature evaluation: probes, feature extraction, the supervised baseline, the report. No Ray."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from ssl_platform.evaluate.features import extract_features, random_shift, train_supervised
from ssl_platform.evaluate.probe import knn_accuracy, linear_probe
from ssl_platform.evaluate.report import markdown_table, moving_average, read_loss_curve, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def blobs(n: int, num_classes: int = 5, dim: int = 32, spread: float = 0.5, seed: int = 0):
    """Gaussian blobs around random unit-scale centres: (n, dim) float32, (n,) int64."""
    g = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(num_classes, dim))  # shared by train and test
    y = g.integers(0, num_classes, n)
    return (centres[y] + spread * g.normal(size=(n, dim))).astype(np.float32), y.astype(np.int64)


def quadrant_images(n: int, seed: int, amplitude: float = 1.5):
    """(n, 1, 16, 16) noise with a bright 4x4 patch somewhere in one quadrant; the class is the quadrant."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 4, n)
    x = g.normal(size=(n, 1, 16, 16)).astype(np.float32)
    for i, c in enumerate(y):
        top, left = 8 * (c // 2) + g.integers(0, 5), 8 * (c % 2) + g.integers(0, 5)
        x[i, 0, top:top + 4, left:left + 4] += amplitude
    return x, y


def tiny_encoder(width: int = 4) -> nn.Module:
    """(B, 1, H, W) -> (B, 4 * width): two convs, then a 2x2 pool so location survives."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
    )


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine (Ray tests
    beside us) spinning OpenMP threads made the supervised test 17x slower (8.8 s against 0.5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- probes -------------------------------------------------------------------------------


def test_probes_separate_easy_blobs():
    train_x, train_y = blobs(500, seed=0)
    test_x, test_y = blobs(200, seed=1)
    assert linear_probe(train_x, train_y, test_x, test_y) > 0.9
    assert knn_accuracy(train_x, train_y, test_x, test_y) > 0.9


def test_probes_are_near_chance_on_random_labels():
    g = np.random.default_rng(0)
    train_x, test_x = g.normal(size=(500, 32)), g.normal(size=(300, 32))
    train_y, test_y = g.integers(0, 5, 500), g.integers(0, 5, 300)
    assert linear_probe(train_x, train_y, test_x, test_y) < 0.4
    assert knn_accuracy(train_x, train_y, test_x, test_y) < 0.4


def test_knn_with_one_neighbour_recalls_the_train_set():
    x, y = blobs(300, spread=3.0)  # overlapping classes: only the point itself gets it right
    assert knn_accuracy(x, y, x, y, k=1) == 1.0


def test_knn_clips_k_and_handles_non_contiguous_labels_and_small_temperatures():
    train_x, train_y = blobs(40, num_classes=2, seed=0)
    test_x, test_y = blobs(40, num_classes=2, seed=1)
    train_y, test_y = train_y * 7 + 3, test_y * 7 + 3  # class ids 3 and 10
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=1000) >= 0.5  # k -> 40, no error
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=5, temperature=1e-4) > 0.9  # no overflow


def test_knn_matches_a_naive_loop():
    train_x, train_y = blobs(60, num_classes=3, spread=2.0, seed=0)
    test_x, _ = blobs(25, num_classes=3, spread=2.0, seed=1)
    k, t = 7, 0.1
    bank = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    predicted = []
    for q in test_x / np.linalg.norm(test_x, axis=1, keepdims=True):
        sim = bank @ q
        votes = np.zeros(3)
        for j in np.argsort(-sim)[:k]:
            votes[train_y[j]] += np.exp(sim[j] / t)
        predicted.append(votes.argmax())
    predicted = np.array(predicted)
    # Accuracy against the naive predictions as labels must be exactly 1.
    assert knn_accuracy(train_x, train_y, test_x, predicted, k=k, temperature=t, chunk_size=10) == 1.0


@pytest.mark.parametrize("probe", [linear_probe, knn_accuracy])
def test_probes_reject_bad_shapes(probe):
    x, y = blobs(20)
    with pytest.raises(ValueError, match="train_x must be a"):
        probe(x[:, :, None], y, x, y)
    with pytest.raises(ValueError, match="test_y must be"):
        probe(x, y, x, y[:, None])
    with pytest.raises(ValueError, match="rows but"):
        probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="dims"):
        probe(x, y, x[:, :5], y)
    with pytest.raises(ValueError, match="integer class ids"):
        probe(x, y.astype(np.float32), x, y)
    with pytest.raises(ValueError, match="NaN"):
        probe(np.full_like(x, np.nan), y, x, y)


# --- features -----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_extract_features_shape_and_restores_train_flag(training):
    encoder = tiny_encoder().train(training)
    encoder[1].eval()  # a mixed-mode module must come back mixed, not all one flag
    images = np.random.default_rng(0).normal(size=(37, 1, 16, 16)).astype(np.float32)
    features = extract_features(encoder, images, batch_size=8)
    assert features.shape == (37, 16) and features.dtype == np.float32
    assert encoder.training == training and not encoder[1].training and encoder[4].training == training
    # Eval mode: a feature does not depend on its batch.
    np.testing.assert_allclose(extract_features(encoder, torch.from_numpy(images[:5])), features[:5], atol=1e-5)


def test_extract_features_rejects_non_image_input():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        extract_features(tiny_encoder(), np.zeros((4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="to_float"):
        extract_features(tiny_encoder(), np.zeros((4, 1, 16, 16), np.uint8))


def test_random_shift_moves_whole_images_by_at_most_the_limit():
    x = torch.zeros(64, 2, 12, 12)
    x[:, :, 6, 6] = 1.0  # one bright pixel in the middle
    shifted = random_shift(x, 3, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    rows, cols = (shifted[:, 0] == 1).nonzero()[:, 1:].T  # one hit per image
    assert len(rows) == 64 and (rows - 6).abs().max() <= 3 and (cols - 6).abs().max() <= 3
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5  # offsets actually vary
    assert torch.equal(shifted[:, 0], shifted[:, 1])  # channels move together


def test_train_supervised_beats_the_untrained_encoder(one_torch_thread):
    train_x, train_y = quadrant_images(512, seed=0)
    test_x, test_y = quadrant_images(256, seed=1)
    torch.manual_seed(0)
    encoder = tiny_encoder()

    def probe() -> float:
        return linear_probe(extract_features(encoder, train_x), train_y, extract_features(encoder, test_x), test_y)

    untrained = probe()
    returned = train_supervised(encoder, 16, train_x, train_y, num_classes=4, epochs=10, batch_size=64, lr=3e-3)
    assert returned is encoder and encoder.training  # trained in place, mode as it came in
    trained = probe()
    assert trained > 0.9 and trained > untrained + 0.15, (untrained, trained)


def test_train_supervised_names_the_wrong_argument():
    x, y = quadrant_images(16, seed=0)
    with pytest.raises(ValueError, match="labels must lie in"):
        train_supervised(tiny_encoder(), 16, x, y, num_classes=2, epochs=1)
    with pytest.raises(ValueError, match="feature_dim=8"):
        train_supervised(tiny_encoder(), 8, x, y, num_classes=4, epochs=1)


# --- report -------------------------------------------------------------------------------

ROWS = [
    {"encoder": "raw pixels", "linear_probe_top1": 0.9583, "knn_top1": 0.9722},
    {"encoder": "random init", "linear_probe_top1": 0.853, "knn_top1": 0.801},
    {"encoder": "simclr (this run)", "linear_probe_top1": np.float64(0.9611), "knn_top1": 0.9444},
    {"encoder": "supervised (labels)", "linear_probe_top1": 0.9972, "knn_top1": 1.0},
]


def test_markdown_table_format():
    table = markdown_table(ROWS[1:2])
    assert table == "| encoder | linear probe top-1 | kNN top-1 |\n|---|---|---|\n| random init | 85.3 | 80.1 |"
    with pytest.raises(ValueError, match="lacks 'encoder'"):
        markdown_table([{"knn_top1": 0.5}])
    with pytest.raises(ValueError, match=r"fractions in 0..1"):
        markdown_table([{"encoder": "x", "linear_probe_top1": 85.3, "knn_top1": 0.5}])
    with pytest.raises(ValueError, match="finite"):
        markdown_table([{"encoder": "x", "perplexity": float("nan")}])


def test_markdown_table_shows_only_present_columns_and_dashes_for_missing_metrics():
    rows = [{"encoder": "CLIP (this run)", "zero_shot_top1": 0.912, "i2t_r1": 0.5, "linear_probe_top1": 0.95},
            {"encoder": "raw pixels", "linear_probe_top1": 0.9, "zero_shot_top1": None}]
    lines = markdown_table(rows).splitlines()
    # Registry order, not the rows' key order; knn_top1 is in no row, so no column.
    assert lines[0] == "| encoder | linear probe top-1 | zero-shot top-1 | image->text R@1 |"
    assert lines[2] == "| CLIP (this run) | 95.0 | 91.2 | 50.0 |"
    assert lines[3] == "| raw pixels | 90.0 | - | - |"
    text = markdown_table([{"encoder": "GPT (this run)", "perplexity": 12.3456, "bits_per_token": 3.6259,
                            "loss": 2.5133}])
    assert text.splitlines()[-1] == "| GPT (this run) | 12.35 | 3.63 | 2.51 |"  # numbers as they are, not percent


def test_write_results_mixed_kinds_and_notes(tmp_path):
    rows = [{"encoder": "GPT (this run)", "perplexity": 40.2, "bits_per_token": 5.33, "loss": 3.69,
             "extra": np.arange(2)},
            {"encoder": "random init", "perplexity": 3900.0, "bits_per_token": 11.93, "loss": 8.27},
            {"encoder": "unigram", "perplexity": 310.0}]
    notes = "## Samples\n\n```\ndef foo():\n```"
    paths = write_results(tmp_path, rows, title="gpt", notes=notes)
    md = paths["markdown"].read_text()
    assert md.index("| unigram | 310.00 | - | - |") < md.index("## Samples") and md.rstrip().endswith("```")
    saved = json.loads(paths["json"].read_text())
    assert saved["notes"] == notes and saved["rows"][0]["extra"] == [0, 1]
    assert paths["figure"].read_bytes()[:8] == PNG_MAGIC


def write_metrics(path, steps: int = 200) -> None:
    g = np.random.default_rng(0)
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 5 * np.exp(-step / 60) + 1 + 0.2 * g.normal(),
                                "lr": 1e-3}) + "\n")
        f.write('{"step": 201, "lo')  # a torn last line from a killed run


@pytest.mark.parametrize("with_metrics", [True, False])
def test_write_results_writes_json_markdown_and_png(tmp_path, with_metrics):
    metrics = tmp_path / "metrics.jsonl"
    if with_metrics:
        write_metrics(metrics)
    paths = write_results(tmp_path / "run", ROWS, metrics_path=metrics, title="simclr-digits: frozen encoder")

    assert set(paths) == {"json", "markdown", "figure"} and all(p.parent == tmp_path / "run" for p in paths.values())
    saved = json.loads(paths["json"].read_text())
    assert saved["rows"] == [{**r, "linear_probe_top1": float(r["linear_probe_top1"])} for r in ROWS]
    assert saved["title"] == "simclr-digits: frozen encoder" and saved["created_at"]

    md = paths["markdown"].read_text()
    assert md.startswith("# simclr-digits: frozen encoder\n")
    assert "| encoder | linear probe top-1 | kNN top-1 |" in md
    assert "| simclr (this run) | 96.1 | 94.4 |" in md and "| supervised (labels) | 99.7 | 100.0 |" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(ROWS)

    png = paths["figure"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


def test_write_results_without_metrics_path_or_rows(tmp_path):
    paths = write_results(tmp_path, [], metrics_path=None)
    assert paths["figure"].read_bytes()[:8] == PNG_MAGIC
    assert paths["markdown"].read_text().splitlines() == ["| encoder |", "|---|"]


def test_read_loss_curve_skips_torn_lines_and_keeps_the_latest_of_repeated_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": float("nan")},
             {"step": 2, "loss": 1.5}, {"step": 4, "acc": 0.1}]  # a resumed run re-logs step 2
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{not json\n")
    steps, losses = read_loss_curve(path)
    assert steps.tolist() == [1, 2] and losses.tolist() == [3.0, 1.5]
    assert read_loss_curve(tmp_path / "missing.jsonl")[0].size == 0


def test_moving_average():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
