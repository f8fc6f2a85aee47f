"""CPC evaluation: the log-mel baseline's filterbank and statistics, whole-clip batches, and the
whole protocol on a tiny CPC checkpoint trained here on spoken-digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_platform import methods
from ssl_platform.config import load_config
from ssl_platform.data.audio import AudioCrops, normalize_real, ragged
from ssl_platform.data.spoken_digits import load_spoken_digits_splits
from ssl_platform.evaluate import evaluate_run  # what `sslp run` and `sslp eval` call
from ssl_platform.evaluate.audio import (
    N_MELS,
    full_clips,
    hz_to_mel,
    log_mel_stats,
    mel_filterbank,
    mel_to_hz,
)
from ssl_platform.train.checkpoint import TrainState, rng_state, save_state

RATE = 16_000


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def tone(freq: float, samples: int) -> torch.Tensor:
    return torch.sin(2 * math.pi * freq * torch.arange(samples) / RATE)


# ----------------------------------------------------------------------------- log-mel baseline


def test_mel_filters_are_triangles_that_tile_the_spectrum():
    fb = mel_filterbank(RATE, n_fft=400, n_mels=N_MELS)  # (201, 40)
    assert fb.shape == (201, N_MELS) and (fb >= 0).all() and fb.max() <= 1.0 + 1e-6
    freqs = torch.linspace(0, RATE / 2, 201)
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(RATE / 2)), N_MELS + 2))[1:-1].float()
    # Between the first and the last centre, two neighbouring triangles always sum to 1.
    inside = (freqs >= centres[0]) & (freqs <= centres[-1])
    torch.testing.assert_close(fb[inside].sum(dim=1), torch.ones(int(inside.sum())), atol=1e-5, rtol=0)
    # Each filter peaks at the FFT bin nearest its centre.
    nearest = (freqs[:, None] - centres).abs().argmin(dim=0)
    assert (fb.argmax(dim=0) - nearest).abs().max() <= 1
    assert float(hz_to_mel(1000.0)) == pytest.approx(1000.0, abs=0.5)  # the mel scale's anchor


def test_log_mel_stats_find_the_tone_and_ignore_padding():
    length = 4000
    audio = torch.zeros(2, 6000)
    audio[0, :length] = tone(1000.0, length)
    audio[1, :length] = tone(1000.0, length)
    audio[1, length:] = torch.randn(6000 - length)  # garbage beyond the real samples
    lengths = torch.tensor([length, length])
    stats = log_mel_stats(audio, lengths, RATE)  # (2, 80)
    assert stats.shape == (2, 2 * N_MELS)
    torch.testing.assert_close(stats[0], stats[1])
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(RATE / 2)), N_MELS + 2))[1:-1]
    band = int((centres - 1000.0).abs().argmin())
    assert int(stats[0, :N_MELS].argmax()) == band
    assert stats[0, N_MELS + band] < 0.05  # a steady tone's band does not change over time


def test_mel_filterbank_rejects_bad_range():
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(RATE, f_max=RATE)


def test_full_clips_are_uncropped_and_normalised_like_training():
    split = load_spoken_digits_splits(RATE, 0.2, 0)["val"]
    clips = list(split.audio[:5])
    longest = max(len(a) for a in split.audio)
    out = full_clips(longest, RATE, normalize=True)({"audio": ragged(clips), "label": split.labels[:5],
                                                     "path": np.array(split.paths[:5], dtype=object)})
    assert out["audio"].shape[1] == longest
    assert out["lengths"].tolist() == [len(c) for c in clips]
    for i, clip in enumerate(clips):
        padded = np.zeros((1, out["audio"].shape[1]), np.float32)
        padded[0, :len(clip)] = clip
        np.testing.assert_allclose(out["audio"][i], normalize_real(padded, np.array([len(clip)]))[0], atol=1e-6)


# ----------------------------------------------------------------------------- whole protocol


def train_tiny_cpc(cfg, steps: int):
    """CPC trained in-process with plain torch on training's random crops of the train split."""
    d = cfg.data
    split = load_spoken_digits_splits(d.sample_rate, d.val_fraction, cfg.train.seed)["train"]
    torch.manual_seed(cfg.train.seed)
    method = methods.build(cfg, sample_rate=d.sample_rate)
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)  # the rate this tiny run was measured with
    g = np.random.default_rng(0)
    for step in range(steps):
        idx = g.choice(len(split), 32, replace=False)
        crops = AudioCrops(d.crop_seconds, d.sample_rate, seed=0, epoch=step, normalize=d.normalize_audio)(
            {"audio": ragged([split.audio[i] for i in idx]), "label": split.labels[idx],
             "path": np.array([split.paths[i] for i in idx], dtype=object)})
        loss = method({k: torch.from_numpy(v) for k, v in crops.items() if k != "label"})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return method, optimizer


def save_checkpoint(directory, method, optimizer, cfg, steps):
    directory.mkdir(parents=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_state(directory, model_state=method.state_dict(), optimizer_state=optimizer.state_dict(),
               scheduler=scheduler, state=TrainState(step=steps), rng=[rng_state()], config=cfg.to_dict())
    return directory


TINY_CPC = ["model.channels=32", "model.context_dim=32", "method.num_steps=4", "method.gather_distributed=false",
            "eval.batch_size=128"]


def run_protocol(tmp_path, steps: int, overrides=()):
    cfg = load_config("cpc-spoken-digits", [*TINY_CPC, *overrides])
    method, optimizer = train_tiny_cpc(cfg, steps)
    checkpoint = save_checkpoint(tmp_path / "run" / f"checkpoint_{steps:06d}", method, optimizer, cfg, steps)
    return {r["encoder"]: r for r in evaluate_run(cfg, checkpoint, tmp_path / "run")}


def test_cpc_protocol_numbers_in_range(ray_session, tmp_path):
    rows = run_protocol(tmp_path, steps=30)
    assert set(rows) == {"CPC (this run)", "random init", f"log-mel ({N_MELS} bands, mean+std)"}
    for row in rows.values():
        assert 0.0 <= row["linear_probe_top1"] <= 1.0 and 0.0 <= row["knn_top1"] <= 1.0
    # Log-mel statistics tell ten words apart far above chance (10%), and even 30 steps of CPC
    # beat its random init (measured: 98% against 64% linear probe).
    assert rows[f"log-mel ({N_MELS} bands, mean+std)"]["linear_probe_top1"] > 0.4
    assert rows["CPC (this run)"]["linear_probe_top1"] > rows["random init"]["linear_probe_top1"]
    for name in ("results.json", "results.md", "report.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
