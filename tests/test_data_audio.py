"""Audio corpora: decoding, skip accounting, crops / normalisation / span masks, spoken-digits."""

import collections
import math

import numpy as np
import pytest
import soundfile

from ssl_platform.data import spoken_digits
from ssl_platform.data.audio import (
    AudioCrops,
    BadAudio,
    audio_class_names,
    decode_audio,
    inspect_audio,
    list_audio_files,
    read_audio_corpus,
    span_mask,
)
from ssl_platform.data.inspect import InspectLedger
from ssl_platform.data.make_spoken_digits import espeak_command, to_pcm16, trim_silence
from ssl_platform.data.skips import SkipReporter

SR = 16_000


def tone(seconds: float, rate: int = SR, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return wave if channels == 1 else np.stack([wave, 0.5 * wave], axis=1)  # (T, 2): right = half of left


def encode(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    soundfile.write(buf, audio, rate, format=fmt.upper())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Decoding (no Ray)


def test_stereo_44k_becomes_mono_at_16k_with_the_resampled_length():
    stereo = tone(0.5, rate=44_100, channels=2)  # (22050, 2)
    audio = decode_audio(encode(stereo, 44_100, "wav"), SR)
    assert audio.dtype == np.float32 and audio.shape == (math.ceil(22_050 * 160 / 441),)  # 8000
    assert abs(np.abs(audio[1000:7000]).max() - 0.75 * 0.5) < 0.01  # mean of left (1.0x) and right (0.5x)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_each_format_decodes_at_its_own_rate(fmt):
    audio = decode_audio(encode(tone(0.25), SR, fmt), SR)
    assert audio.shape == (4000,)
    assert np.corrcoef(audio, tone(0.25))[0, 1] > 0.99  # ogg is lossy, but close


@pytest.mark.parametrize("blob, reason", [
    (b"", "empty audio"), (encode(np.zeros(0, np.float32), SR, "wav"), "empty audio"),
    (b"RIFF\x00\x00garbage" * 10, "corrupt audio"), (encode(tone(0.2), SR, "flac")[:60], "corrupt audio")])
def test_bad_blobs_raise_with_a_short_reason(blob, reason):
    with pytest.raises(BadAudio) as err:
        decode_audio(blob, SR)
    assert err.value.reason == reason


def test_missing_path_and_audio_less_folder_fail_up_front(tmp_path):
    with pytest.raises(ValueError, match="nowhere/at-all"):
        list_audio_files(tmp_path / "nowhere" / "at-all")
    with pytest.raises(ValueError, match=r"data.format=parquet"):
        list_audio_files(tmp_path, fmt="parquet")
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(ValueError, match="holds no wav/flac/ogg files"):
        read_audio_corpus(tmp_path, reporter=SkipReporter())  # before any Dataset or Ray call


# ---------------------------------------------------------------------------------------------
# AudioCrops and span masks (no Ray)


def clips_batch(lengths, seed=0):
    rng = np.random.default_rng(seed)
    clips = np.empty(len(lengths), dtype=object)
    for i, n in enumerate(lengths):
        clips[i] = (3.0 + 2.0 * rng.standard_normal(n)).astype(np.float32)  # mean 3, std 2
    paths = np.array([f"c{i}.wav" for i in range(len(lengths))])
    return {"audio": clips, "label": np.arange(len(lengths)), "path": paths}


def test_crops_shapes_padding_and_lengths():
    batch = clips_batch([32_000, 8_000, 16_000, 500])
    out = AudioCrops(crop_seconds=1.0, sample_rate=SR, seed=0, normalize=False)(batch)
    assert set(out) == {"audio", "lengths", "label"}  # no "mask" without masking
    assert out["audio"].shape == (4, 16_000) and out["audio"].dtype == np.float32
    assert out["lengths"].tolist() == [16_000, 8_000, 16_000, 500] and out["lengths"].dtype == np.int64
    assert out["label"].tolist() == [0, 1, 2, 3] and out["label"].dtype == np.int64
    assert np.array_equal(out["audio"][1, :8000], batch["audio"][1]) and not out["audio"][1, 8000:].any()
    long = batch["audio"][0]
    start = int(np.flatnonzero(long == out["audio"][0, 0])[0])
    assert np.array_equal(out["audio"][0], long[start:start + 16_000])  # one contiguous window


def test_normalisation_over_the_real_samples_only():
    out = AudioCrops(crop_seconds=1.0, seed=0)(clips_batch([20_000, 6_000]))
    for row, n in zip(out["audio"], out["lengths"], strict=True):
        assert abs(row[:n].mean()) < 1e-4 and abs(row[:n].std() - 1.0) < 1e-3
        assert not row[n:].any()  # padding stays zero


def test_same_seed_and_epoch_give_the_same_crops_however_batched():
    batch = clips_batch([40_000] * 6)
    whole = AudioCrops(0.5, seed=7, epoch=2, mask_prob=0.1)(batch)
    halves = [AudioCrops(0.5, seed=7, epoch=2, mask_prob=0.1)({k: v[s] for k, v in batch.items()})
              for s in (slice(0, 2), slice(2, 6))]
    for key in ("audio", "mask"):
        assert np.array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    assert not np.array_equal(whole["audio"], AudioCrops(0.5, seed=7, epoch=3, mask_prob=0.1)(batch)["audio"])
    assert not np.array_equal(whole["audio"], AudioCrops(0.5, seed=8, epoch=2, mask_prob=0.1)(batch)["audio"])
    assert not np.array_equal(AudioCrops(0.5)(batch)["audio"], AudioCrops(0.5)(batch)["audio"])  # fresh entropy


@pytest.mark.parametrize("mask_prob, span", [(0.065, 10), (0.02, 5)])
def test_span_mask_fraction_matches_wav2vec2(mask_prob, span):
    rng = np.random.default_rng(0)
    masks = np.stack([span_mask(400, 400, mask_prob, span, rng) for _ in range(500)])  # (500, 400)
    expected = 1 - (1 - mask_prob) ** span  # 0.49 for wav2vec 2.0's p = 0.065, M = 10
    assert abs(masks.mean() - expected) < 0.03


def test_mask_covers_frames_of_real_audio_only():
    out = AudioCrops(crop_seconds=1.0, seed=0, mask_prob=0.3, mask_span=4)(clips_batch([4_000] * 50))
    assert out["mask"].shape == (50, 100) and out["mask"].dtype == bool
    assert out["mask"][:, :25].any() and not out["mask"][:, 25:].any()  # 4000 samples = 25 frames of 160


def test_bad_crop_arguments_are_refused():
    with pytest.raises(ValueError, match="crop_seconds"):
        AudioCrops(crop_seconds=0.001)
    with pytest.raises(ValueError, match="mask_prob"):
        AudioCrops(mask_prob=1.5)


# ---------------------------------------------------------------------------------------------
# spoken-digits (offline, no Ray)


def test_spoken_digits_loads_offline_balanced_and_plausible():
    corpus = spoken_digits.load_spoken_digits()
    assert corpus.class_names == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert np.bincount(corpus.labels).tolist() == [48] * 10
    assert len(set(corpus.voices)) == 8
    seconds = np.array([len(a) for a in corpus.audio]) / SR
    assert seconds.min() >= 0.2 and seconds.max() <= 2.0
    assert all(a.dtype == np.float32 and np.abs(a).max() <= 1.0 for a in corpus.audio)


def test_spoken_digits_split_is_stratified_voice_balanced_and_seeded():
    splits = spoken_digits.load_spoken_digits_splits(val_fraction=0.2, seed=0)
    train, val = splits["train"], splits["val"]
    assert (len(train), len(val)) == (380, 100) and not set(train.paths) & set(val.paths)
    assert np.bincount(val.labels).tolist() == [10] * 10
    per_voice = collections.Counter(val.voices).values()
    assert max(per_voice) - min(per_voice) <= 1  # 100 clips over 8 voices: 12 or 13 each
    for c in range(10):  # within a class every voice gives one clip before any gives a third
        counts = collections.Counter(v for v, y in zip(val.voices, val.labels, strict=True) if y == c).values()
        assert len(counts) == 8 and max(counts) <= 2
    assert spoken_digits.load_spoken_digits_splits(seed=0)["val"].paths == val.paths
    assert spoken_digits.load_spoken_digits_splits(seed=1)["val"].paths != val.paths


def test_missing_spoken_digits_data_says_how_to_generate_it(tmp_path, monkeypatch):
    monkeypatch.setattr(spoken_digits, "DATA_DIR", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"python -m ssl_platform.data.make_spoken_digits"):
        spoken_digits.data_dir()


def test_generator_helpers():
    assert espeak_command("seven", "en-us+f3", 130, 70, "x.wav") == [
        "espeak-ng", "-v", "en-us+f3", "-s", "130", "-p", "70", "-w", "x.wav", "seven"]
    quiet, loud = np.zeros(1600, np.float32), tone(0.1)
    trimmed = trim_silence(np.concatenate([quiet, loud, quiet]), SR)
    assert len(loud) <= len(trimmed) <= len(loud) + 2 * 320 + 2 * 160  # 20 ms margins, 10 ms frames
    pcm = to_pcm16(tone(0.1))
    assert pcm.dtype == np.int16 and not (pcm % 16).any() and abs(np.abs(pcm).max() - 0.9 * 32768) < 20


# ---------------------------------------------------------------------------------------------
# Ray Datasets


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """yes/ and no/ class folders with wav, flac and ogg, a 44.1 kHz stereo clip, a clip at the
    root (unlabelled), one corrupt file, one empty file and a text file that is not audio."""
    root = tmp_path_factory.mktemp("audio")
    (root / "yes").mkdir()
    (root / "no").mkdir()
    for i, fmt in enumerate(["wav", "flac", "ogg"]):
        soundfile.write(root / "yes" / f"y{i}.{fmt}", tone(0.3 + 0.1 * i), SR)
        soundfile.write(root / "no" / f"n{i}.{fmt}", tone(0.4, freq=220.0), SR)
    soundfile.write(root / "no" / "stereo.wav", tone(0.5, rate=44_100, channels=2), 44_100)
    soundfile.write(root / "loose.flac", tone(0.2), SR)
    (root / "yes" / "corrupt.wav").write_bytes(b"RIFF" + b"\x13" * 300)
    (root / "no" / "empty.flac").write_bytes(b"")
    (root / "no" / "readme.txt").write_text("ignored")
    return root


def read_with_ledger(source, strict=False, **kw):
    """Rows of a corpus and the skip summary of its own ledger."""
    with InspectLedger(strict) as ledger:
        rows = read_audio_corpus(source, reporter=ledger.reporter, **kw).take_all()
    return rows, ledger.summary


def test_folder_corpus_counts_good_and_skipped_files(ray_session, corpus):
    rows, summary = read_with_ledger(corpus)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_name) == ["loose.flac", "n0.wav", "n1.flac", "n2.ogg", "stereo.wav", "y0.wav", "y1.flac", "y2.ogg"]
    assert audio_class_names(corpus) == ("no", "yes")
    assert [by_name[n]["label"] for n in ("y0.wav", "n2.ogg", "stereo.wav", "loose.flac")] == [1, 0, 0, -1]
    assert by_name["y2.ogg"]["audio"].shape == (8000,) and by_name["y2.ogg"]["audio"].dtype == np.float32
    assert by_name["stereo.wav"]["audio"].shape == (8000,)  # 0.5 s at 44.1 kHz stereo -> 16 kHz mono
    assert summary["by_reason"] == {"corrupt audio": 1, "empty audio": 1}
    assert summary["examples"]["corrupt audio"][0].endswith("yes/corrupt.wav")


def test_strict_fails_naming_the_file(ray_session, corpus):
    with pytest.raises(Exception, match=r"corrupt\.wav: corrupt audio") as err:
        read_with_ledger(corpus / "yes", strict=True)
    assert "BadRecordError" in str(err.value)  # Ray wraps the worker's error; its type and message survive


def test_format_filter_uri_and_long_recordings(ray_session, corpus, tmp_path):
    rows, _ = read_with_ledger(f"file://{corpus}", fmt="ogg")
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == ["n2.ogg", "y2.ogg"]
    soundfile.write(tmp_path / "long.wav", tone(2.5), SR)
    rows, _ = read_with_ledger(tmp_path, max_seconds=1.0)  # 2.5 s -> 3 pieces of <= 1 s
    assert sorted(len(r["audio"]) for r in rows) == [13_333, 13_333, 13_334]
    assert sorted(r["path"][-2:] for r in rows) == ["#0", "#1", "#2"] and {r["label"] for r in rows} == {-1}


def test_crops_stream_into_cpc(ray_session):
    import torch

    from ssl_models import build_method

    split = spoken_digits.load_spoken_digits_splits()["val"]
    ds = spoken_digits.audio_to_dataset(split).map_batches(AudioCrops(0.5, seed=0), batch_size=16, batch_format="numpy")
    batch = next(iter(ds.iter_torch_batches(batch_size=16)))
    assert batch["audio"].shape == (16, 8000) and batch["lengths"].dtype == torch.int64
    assert int(batch["lengths"].min()) >= 0.2 * SR and int(batch["lengths"].max()) <= 8000  # real, clipped to crop
    out = build_method("cpc", channels=32, context_dim=32, num_steps=4)({k: batch[k] for k in ("audio", "lengths")})
    assert torch.isfinite(out["loss"])


def test_inspect_counts_skips_and_draws(ray_session, corpus, tmp_path):
    report = inspect_audio(str(corpus), tmp_path, mask_prob=0.065, crop_seconds=0.5, num_examples=3)
    assert report["records"] == 8 and report["skipped"]["by_reason"] == {"corrupt audio": 1, "empty audio": 1}
    assert report["example"]["audio"] == "float32 (3, 8000)" and "masked" in report["example"]["mask"]
    assert {"yes", "no"} <= set(report["example"]["class"])  # one example per class first
    with open(report["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    digits = inspect_audio("spoken-digits", tmp_path / "sd", num_examples=2)
    assert digits["records"] == 480 and digits["skipped"]["total"] == 0
    example = digits["example"]
    for path, label in zip(example["path"], example["label"], strict=True):  # word order (zero = 0),
        assert spoken_digits.DIGIT_NAMES[label] == path.split("/")[-2]  # not the folders' sorted order


def test_a_corpus_without_one_good_file_reports_zero_records(ray_session, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"nope")
    (tmp_path / "empty.ogg").write_bytes(b"")
    report = inspect_audio(str(tmp_path), tmp_path / "out")
    assert report["records"] == 0 and report["figure"] is None and report["skipped"]["total"] == 2
