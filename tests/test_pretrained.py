"""``ssl_platform.load`` and ``Pretrained.embed_*``: raw inputs -> the embeddings evaluation computes.

Each run here is a checkpoint laid out as the trainer writes it (``RUN/checkpoint_*/state.pt``,
a text run's ``tokenizer/`` beside it), holding a method built under a seed other than the one
``load`` builds with, so a weight that was not loaded changes every embedding. The reference is
the evaluation path on the method itself (``evaluate.image.embed_images``, ``clip.embed_pairs``,
``text.TopicChunks`` + ``score_bert``, ``audio.full_clips`` + ``embed_clips``). No Ray.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_platform
from ssl_platform.config import load_config
from ssl_platform.data.audio import ragged
from ssl_platform.data.builtin import load_digits_splits
from ssl_platform.data.tokenizer import TokenizerConfig, train_tokenizer
from ssl_platform.evaluate.inference import build_method
from ssl_platform.train.checkpoint import TrainState, rng_state, save_state

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

SIZE = 16
TINY = {
    "simclr": ["data.image_size=16", "model.encoder_widths=[8,16]", "model.projector_width=32",
               "model.projector_dim=16"],
    "clip": ["data.image_size=16", "model.embed_dim=16", "model.vision_width=16", "model.vision_layers=1",
             "model.vision_heads=2", "model.text_width=16", "model.text_layers=1", "model.text_heads=2",
             "model.context_length=16"],
    "bert": ["data.vocab_size=200", "data.max_len=24", "model.dim=16", "model.depth=1", "model.heads=2"],
    "gpt": ["data.vocab_size=300", "data.max_len=24", "model.dim=16", "model.depth=1", "model.heads=2"],
    "cpc": ["model.channels=16", "model.context_dim=16", "method.num_steps=2"],
    # the methods added as ssl_models code only (issue 15): load and export know them from their spec
    "rotnet": ["data.image_size=16", "model.encoder_widths=[8,16]", "model.classifier_width=16"],
    "dino": ["data.image_size=16", "model.encoder_widths=[8,16]", "model.head_width=16", "model.bottleneck_dim=8",
             "model.out_dim=32"],
}
PRESETS = {"simclr": "simclr-digits", "clip": "clip-digit-captions", "bert": "bert-python-docs",
           "gpt": "gpt-python-docs", "cpc": "cpc-spoken-digits", "rotnet": "rotnet-digits", "dino": "dino-digits"}
TEXTS = ["the cat sat on the mat and looked at the dog", "a dog runs after the red ball in the park",
         "python lists hold items in order", "the mat is red"]


def make_run(root: Path, method_name: str) -> tuple[Path, torch.nn.Module]:
    """A run directory ``root/NAME`` with one checkpoint of a tiny ``method_name`` (seed 7 weights,
    BatchNorm statistics moved off their defaults). Returns (run dir, the method in eval mode)."""
    cfg = load_config(PRESETS[method_name], [f"name=tiny-{method_name}", *TINY[method_name]])
    derived, tokenizer = {}, None
    if method_name in ("bert", "gpt"):
        kind = "wordpiece" if method_name == "bert" else "bpe"
        tokenizer = train_tokenizer(TEXTS * 10, TokenizerConfig(kind, cfg.data.vocab_size, min_frequency=1))
        derived = {"vocab_size": tokenizer.vocab_size, "max_len": cfg.data.max_len}
    elif method_name == "cpc":
        derived = {"sample_rate": cfg.data.sample_rate}
    else:
        derived = {"in_channels": 1, **({"image_size": SIZE} if method_name == "clip" else {})}
    method = build_method(cfg, derived, None, seed=7)
    if method_name in ("simclr", "rotnet", "dino"):  # running statistics a real run would have moved
        method.train()
        with torch.no_grad():
            method.embed({"image": torch.randn(32, 1, SIZE, SIZE) * 2 + 0.5})
    method.eval()
    checkpoint = root / cfg.name / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    save_state(checkpoint, model_state=method.state_dict(), optimizer_state={},
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), state=TrainState(step=3),
               rng=[rng_state()], config=cfg.to_dict())
    if tokenizer is not None:
        tokenizer.save(checkpoint / "tokenizer")
    return checkpoint.parent, method


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(root, name) for name in TINY}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Eight built-in digit images at the runs' size, uint8 (8, 1, S, S)."""
    return load_digits_splits(image_size=SIZE)["val"].images[:8]


def png_files(directory: Path, images: np.ndarray) -> list[Path]:
    paths = []
    for i, image in enumerate(images):
        paths.append(directory / f"{i}.png")
        Image.fromarray(image[0]).save(paths[-1])
    return paths


def test_simclr_embeds_paths_arrays_and_pil_like_evaluation(runs, digits, tmp_path):
    from ssl_platform.evaluate.image import embed_images

    run_dir, method = runs["simclr"]
    with torch.no_grad():
        reference = embed_images(method, {"image": torch.from_numpy(digits)}).numpy()
    pretrained = ssl_platform.load(run_dir)
    assert (pretrained.kind, pretrained.modalities, pretrained.dim) == ("image", ("images",), 16)
    assert not pretrained.method.training and pretrained.cfg.method.name == "simclr"
    hwc = digits.transpose(0, 2, 3, 1)  # (N, S, S, 1)
    for given in (png_files(tmp_path, digits), hwc, [Image.fromarray(x[..., 0]) for x in hwc], list(hwc[..., 0])):
        out = pretrained.embed_images(given, batch_size=3)
        assert out.dtype == np.float32 and out.shape == (8, 16)
        np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)
    # a larger image is centre-cropped and resized to the trained size, as files are at training time
    big = np.kron(hwc[:2], np.ones((1, 2, 2, 1), np.uint8))  # (2, 2S, 2S, 1): each pixel doubled
    assert pretrained.embed_images(big).shape == (2, 16)


def test_clip_embeds_images_and_texts_like_evaluation(runs, digits):
    from ssl_models.methods.clip import tokenize
    from ssl_platform.evaluate.clip import embed_pairs

    run_dir, method = runs["clip"]
    captions = ["a handwritten 3", "the digit seven", "zero", "a 1", "two", "five", "nine", "four"]
    with torch.no_grad():
        reference = embed_pairs(method, {"image": torch.from_numpy(digits), "text": tokenize(captions, 16)})
    pretrained = ssl_platform.load(run_dir / "checkpoint_2026-01-01_00-00-00.000000")  # a checkpoint dir works too
    assert (pretrained.kind, pretrained.modalities, pretrained.embedding_dims) == (
        "caption", ("images", "texts"), {"images": 16, "texts": 16})
    np.testing.assert_allclose(pretrained.embed_images(digits.transpose(0, 2, 3, 1)), reference["image"].numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(pretrained.embed_texts(captions, batch_size=5), reference["text"].numpy(), atol=1e-5)


def test_bert_embeds_texts_like_the_text_evaluation(runs):
    from ssl_platform.evaluate.text import TopicChunks, score_bert

    run_dir, method = runs["bert"]
    pretrained = ssl_platform.load(run_dir)
    chunks = TopicChunks(pretrained.tokenizer, 24)({"text": np.array(TEXTS[:2], dtype=object)})
    assert len(chunks["input_ids"]) == 2  # one [CLS] text [SEP] chunk per text
    with torch.no_grad():
        reference = score_bert(method, {k: torch.from_numpy(v) for k, v in chunks.items()
                                        if k not in ("source", "chunk")})["features"].numpy()
    assert (pretrained.kind, pretrained.modalities) == ("text", ("texts",))
    np.testing.assert_allclose(pretrained.embed_texts(TEXTS[:2], batch_size=1), reference, atol=1e-5)


def test_gpt_embeds_the_mean_state_of_each_texts_own_tokens(runs):
    run_dir, method = runs["gpt"]
    pretrained = ssl_platform.load(run_dir)
    out = pretrained.embed_texts(TEXTS)
    for text, row in zip(TEXTS, out, strict=True):  # one text alone, unpadded: padding must not change it
        ids = torch.tensor([pretrained.tokenizer.encode_batch([text])[0]])
        with torch.no_grad():
            np.testing.assert_allclose(row, method.embed({"input_ids": ids})[0].numpy(), atol=1e-5)


def test_cpc_embeds_waveforms_like_the_audio_evaluation_and_resamples(runs):
    from ssl_platform.evaluate.audio import embed_clips, full_clips

    run_dir, method = runs["cpc"]
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (3000, 4800, 1600, 4000)]
    batch = full_clips(4800, 16_000, True)({"audio": ragged(clips)})  # the evaluation pads to the longest
    with torch.no_grad():
        reference = embed_clips(method, {"audio": torch.from_numpy(batch["audio"]),
                                         "lengths": torch.from_numpy(batch["lengths"])}).numpy()
    pretrained = ssl_platform.load(run_dir)
    assert (pretrained.kind, pretrained.modalities, pretrained.dim) == ("audio", ("audio",), 16)
    np.testing.assert_allclose(pretrained.embed_audio(clips, 16_000, batch_size=3), reference, atol=1e-5)
    # 8 kHz input is resampled to the run's 16 kHz: a clip of twice the samples' duration
    low = pretrained.embed_audio([clips[1][::2].copy()], 8_000)
    assert low.shape == (1, 16) and np.isfinite(low).all()


@pytest.mark.parametrize("method_name, call, match", [
    ("simclr", lambda p: p.embed_texts(["a cat"]), "this is an image model .* use embed_images"),
    ("simclr", lambda p: p.embed_audio([np.zeros(4000, np.float32)], 16_000), "use embed_images"),
    ("bert", lambda p: p.embed_images(np.zeros((1, 16, 16, 1), np.uint8)), "this is a text model .* use embed_texts"),
    ("cpc", lambda p: p.embed_texts(["x"]), "use embed_audio"),
    ("simclr", lambda p: p.embed_images(np.zeros((2, 16, 16, 3), np.uint8)), r"1-channel .* grayscale"),
    ("simclr", lambda p: p.embed_images(np.zeros((16, 16, 1), np.uint8)), r"batch \(N, H, W, C\)"),
    ("simclr", lambda p: p.embed_images(np.zeros((1, 16, 16, 1), np.float32)), "uint8"),
    ("simclr", lambda p: p.embed_images(["/no/such.png"]), "does not exist"),
    ("bert", lambda p: p.embed_texts("one string"), r"use \[text\]"),
    ("cpc", lambda p: p.embed_audio([np.zeros(100, np.float32)], 16_000), "fewer than the encoder's"),
    ("cpc", lambda p: p.embed_audio([np.zeros((4000, 2), np.float32)], 16_000), "mono"),
    ("cpc", lambda p: p.embed_audio([np.zeros(4000, np.float32)], 0), "sample_rate"),
])
def test_bad_inputs_are_rejected_with_what_to_change(runs, method_name, call, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        call(ssl_platform.load(runs[method_name][0]))


def test_load_refuses_a_missing_run_or_a_directory_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ssl_platform.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ssl_platform.load(tmp_path)


def test_import_ssl_platform_stays_light():
    code = ("import sys, ssl_platform; "
            "print('torch' in sys.modules, callable(ssl_platform.load), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]


def test_load_rebuilds_the_method_from_the_derived_arguments_its_checkpoint_carries(tmp_path, digits):
    """A checkpoint carries the data-derived constructor arguments it was built with: ``load``
    uses them, not the config's prediction (the digits are grayscale, so the config predicts
    in_channels=1; this checkpoint's method took 3). One written before they were saved (every
    run of ``make_run``) still loads, from the prediction."""
    cfg = load_config(PRESETS["simclr"], ["name=rgb", *TINY["simclr"]])
    method = build_method(cfg, {"in_channels": 3}, None, seed=7)
    checkpoint = tmp_path / cfg.name / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    save_state(checkpoint, model_state=method.state_dict(), optimizer_state={},
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), state=TrainState(step=3),
               rng=[rng_state()], config=cfg.to_dict(), derived={"in_channels": 3})
    assert torch.load(checkpoint / "state.pt", weights_only=True)["derived"] == {"in_channels": 3}

    pretrained = ssl_platform.load(checkpoint.parent)
    assert pretrained.derived == {"in_channels": 3} and pretrained.method.in_channels == 3
    torch.testing.assert_close(pretrained.method.state_dict(), method.state_dict())
    rgb = np.repeat(digits, 3, axis=1).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    assert pretrained.embed_images(rgb).shape == (len(digits), method.feature_dim)
