"""The CLIP protocol (evaluate.clip): zero-shot, retrieval recall, linear probe; a tiny CLIP trained in-process."""

import json

import numpy as np
import pytest
import torch

from ssl_platform.config import load_config
from ssl_platform.data.augment import finish_views
from ssl_platform.data.captions import CaptionTransform
from ssl_platform.data.digit_captions import load_digit_caption_splits
from ssl_platform.evaluate import evaluate_run
from ssl_platform.evaluate.clip import retrieval_recalls, zero_shot_accuracy
from ssl_platform.evaluate.inference import build_method
from ssl_platform.train.checkpoint import TrainState, rng_state, save_state

SIZE, CONTEXT = 16, 16
TINY = [f"data.image_size={SIZE}", "model.embed_dim=32", "model.vision_width=32", "model.vision_layers=1",
        "model.vision_heads=2", "model.text_width=32", "model.text_layers=1", "model.text_heads=2",
        f"model.context_length={CONTEXT}", "eval.batch_size=256", "eval.enabled=true"]
METRICS = ("zero_shot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "linear_probe_top1")


# --- the metrics, no Ray ------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_zero_shot_averages_the_normalised_prompts_of_a_class():
    g = np.random.default_rng(0)
    centres = unit(g.normal(size=(4, 16)))
    labels = g.integers(0, 4, 200)
    images = centres[labels] + 0.3 * g.normal(size=(200, 16))
    # Two unit prompts per class, c + o and c - o with o orthogonal to c and long: each alone
    # points far from its class, their mean points exactly at it.
    o = g.normal(size=(4, 16))
    o = 3 * unit(o - (o * centres).sum(1, keepdims=True) * centres)
    prompts = unit(np.concatenate([centres + o, centres - o]))  # (8, 16): classes 0..3, then 0..3
    prompt_class = np.tile(np.arange(4), 2)
    assert zero_shot_accuracy(images, labels, prompts, prompt_class, 4) > 0.95
    assert zero_shot_accuracy(images, (labels + 1) % 4, prompts, prompt_class, 4) < 0.05


def naive_recalls(images, texts, captions, k):
    """Loops over queries: distinct caption strings are the text candidates (and text queries)."""
    distinct = sorted(set(captions))
    first = {c: captions.index(c) for c in distinct}
    i2t = []
    for i, image in enumerate(images):
        own = image @ texts[first[captions[i]]]
        i2t.append(sum(image @ texts[first[c]] > own for c in distinct) < k)
    t2i = []
    for c in distinct:
        scores = images @ texts[first[c]]
        best = max(scores[j] for j in range(len(images)) if captions[j] == c)
        t2i.append(sum(scores[j] > best for j in range(len(images)) if captions[j] != c) < k)
    return np.mean(i2t), np.mean(t2i)


def test_retrieval_recalls_match_a_naive_loop_with_duplicate_captions():
    g = np.random.default_rng(1)
    captions = [f"caption {c}" for c in g.integers(0, 12, 60)]  # ~5 images per caption string
    images, texts = unit(g.normal(size=(60, 8))), unit(g.normal(size=(60, 8)))
    texts = texts[[captions.index(c) for c in captions]]  # identical strings, identical embeddings
    got = retrieval_recalls(images, texts, np.array(captions), ks=(1, 3))
    for k in (1, 3):
        i2t, t2i = naive_recalls(images, texts, captions, k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)


def test_retrieval_is_perfect_for_aligned_towers_and_a_duplicate_is_no_miss():
    g = np.random.default_rng(2)
    captions = np.array(["a seven", "a one", "a seven", "a two"])
    texts = unit(g.normal(size=(3, 8)))[[0, 1, 0, 2]]
    recalls = retrieval_recalls(texts + 0.01 * g.normal(size=(4, 8)), texts, captions)
    assert recalls == {"i2t_r1": 1.0, "t2i_r1": 1.0, "i2t_r5": 1.0, "t2i_r5": 1.0}


# --- the protocol on a tiny trained CLIP --------------------------------------------------


def pretrain_clip(cfg, steps: int, seed: int = 0):
    """Plain-torch CLIP steps on the training pipeline's batches (CaptionTransform)."""
    torch.manual_seed(seed)
    train = load_digit_caption_splits(SIZE, seed=cfg.train.seed)["train"]
    method = build_method(cfg, {"in_channels": 1, "image_size": SIZE}, None, seed).train()
    transform = CaptionTransform(SIZE, CONTEXT, seed=seed, crop_scale_min=0.8)
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3, weight_decay=0.1)
    g = np.random.default_rng(seed)
    for step in range(steps):
        idx = g.choice(len(train), 128, replace=False)
        batch = transform({"image": train.images[idx], "caption": train.captions[idx],
                           "path": np.array([f"{step}/{i}" for i in idx])})
        loss = method(finish_views({k: torch.from_numpy(v) for k, v in batch.items()}, ()))["loss"]  # as the loop
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return method.eval(), optimizer


def test_trained_clip_beats_random_init_zero_shot_and_retrieval(tmp_path, ray_session):
    cfg = load_config("clip-digit-captions", TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model; OpenMP threads only spin on a shared 2-core machine
    try:
        method, optimizer = pretrain_clip(cfg, steps=100)  # measured: zero-shot ~70% (random init ~15%)
    finally:
        torch.set_num_threads(threads)
    save_state(tmp_path, model_state=method.state_dict(), optimizer_state={},
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), state=TrainState(step=100),
               rng=[rng_state()], config=cfg.to_dict())

    rows = evaluate_run(cfg, tmp_path, tmp_path / "run")
    assert [r["encoder"] for r in rows] == ["random init", "CLIP (this run)"]
    for row in rows:
        assert set(row) == {"encoder", *METRICS}
        assert all(0.0 <= row[m] <= 1.0 for m in METRICS), row
        assert row["i2t_r5"] >= row["i2t_r1"] and row["t2i_r5"] >= row["t2i_r1"]
    random_init, trained = rows
    assert random_init["zero_shot_top1"] < 0.35  # 10 classes: near chance
    assert trained["zero_shot_top1"] > random_init["zero_shot_top1"] + 0.25, rows
    assert trained["i2t_r5"] > random_init["i2t_r5"] + 0.1 and trained["t2i_r5"] > random_init["t2i_r5"] + 0.1, rows

    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"] == rows and "identical caption strings" in saved["notes"]
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| encoder | linear probe top-1 | zero-shot top-1 | image->text R@1 |" in md
    assert (tmp_path / "run" / "report.png").read_bytes()[:4] == b"\x89PNG"
