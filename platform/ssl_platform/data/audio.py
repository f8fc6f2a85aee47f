"""Audio corpora as Ray Datasets, and the batched crops, normalisation and span masking of
wav2vec-style methods.

A corpus is a folder tree of wav / flac / ogg files (local, or any URI pyarrow's filesystems
take: ``s3://``, ``gs://``, ``file://``); class sub-folders give labels as in an image folder,
files directly under the root get -1 (the rules of :mod:`~ssl_platform.data.sources`). The
built-in name ``spoken-digits`` is accepted too.

Why not ``ray.data.read_audio``: it decodes inside the read task with ``soundfile.read`` and
lets the first corrupt file fail the whole read, with no hook to skip and count it. So files
are read as bytes (``read_binary_files``) and decoded in ``map_batches`` by :class:`DecodeAudio`,
which skips bad files through the run's :class:`~ssl_platform.data.skips.SkipReporter`
("corrupt audio", "empty audio"), mixes to mono and resamples to the configured rate.

Rows: ``{"audio": float32 (T,), "label": int64, "path": str}``; T varies from row to row.
:class:`AudioCrops` turns a batch of them into the fixed-length batch CPC eats:
``{"audio": float32 (B, T), "lengths": int64 (B,), "label": int64 (B,)}`` (+ ``"mask"``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_platform.data.inspect import InspectLedger, report, save, scan
from ssl_platform.data.randomness import record_rng
from ssl_platform.data.skips import SkipReporter
from ssl_platform.data.sources import folder_classes, folder_labels, locate

# data.format -> file extensions read; "auto" and "folder" (a folder tree) take all three.
AUDIO_FORMATS = {"auto": ("wav", "flac", "ogg"), "folder": ("wav", "flac", "ogg"),
                 "wav": ("wav",), "flac": ("flac",), "ogg": ("ogg",)}


class BadAudio(ValueError):
    """A file that cannot become a waveform; ``reason`` is the short skip reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Finding the files (on the driver, before any Dataset exists)


@dataclass(frozen=True)
class AudioFiles:
    """The audio files of a corpus. ``paths`` are in ``filesystem``'s notation, sorted."""

    filesystem: object  # pyarrow.fs.FileSystem
    root: str
    paths: tuple[str, ...]
    class_names: tuple[str, ...]  # class sub-folders holding audio, sorted; empty when the corpus is unlabelled


def list_audio_files(source: str | Path, fmt: str = "auto") -> AudioFiles:
    """List a corpus; raises ValueError naming ``source`` if it does not exist or holds no audio."""
    if fmt not in AUDIO_FORMATS:
        raise ValueError(f"data.format={fmt} does not apply to audio corpora; use one of {', '.join(AUDIO_FORMATS)}")
    source, classes = str(source), None
    if source == "spoken-digits":  # labels in word order (zero = 0), not the folders' sorted order
        from ssl_platform.data.spoken_digits import DIGIT_NAMES, data_dir

        source, classes = str(data_dir()), DIGIT_NAMES
    loc = locate(source, what="audio corpus", hint="point data.path at a folder of wav/flac/ogg files")
    extensions = AUDIO_FORMATS[fmt]
    paths = loc.files(extensions)
    if not paths:
        raise ValueError(f"audio corpus {source!r} holds no {'/'.join(extensions)} files; "
                         f"point data.path at a folder of audio files or change data.format")
    return AudioFiles(loc.fs, loc.root, tuple(paths), classes or folder_classes(paths, loc.root))


# ---------------------------------------------------------------------------------------------
# Decoding


def resample(audio: np.ndarray, orig_rate: int, rate: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased). (T,) -> (ceil(T * rate / orig_rate),) float32."""
    if orig_rate == rate:
        return audio.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(orig_rate, rate)
    return resample_poly(audio, rate // g, orig_rate // g).astype(np.float32)


def decode_audio(blob: bytes, sample_rate: int) -> np.ndarray:
    """wav / flac / ogg bytes -> mono float32 (T,) at ``sample_rate``; raises :class:`BadAudio`."""
    import soundfile

    if blob is None or len(blob) == 0:
        raise BadAudio("empty audio")
    try:
        audio, rate = soundfile.read(io.BytesIO(bytes(blob)), dtype="float32", always_2d=True)  # (T, channels)
    except Exception as e:  # libsndfile's errors: unknown format, truncated stream, bad header
        raise BadAudio("corrupt audio") from e
    if audio.size == 0:
        raise BadAudio("empty audio")
    if not np.isfinite(audio).all():
        raise BadAudio("corrupt audio")
    return resample(audio.mean(axis=1), rate, sample_rate)  # stereo -> mono by averaging channels


def split_long(audio: np.ndarray, max_samples: int | None) -> list[np.ndarray]:
    """Cut a long recording into ceil(T / max_samples) near-equal pieces, each <= max_samples."""
    if max_samples is None or len(audio) <= max_samples:
        return [audio]
    return np.array_split(audio, math.ceil(len(audio) / max_samples))


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of variable-length arrays: Ray stores it as a variable-shaped tensor."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # element-wise: a list of equal-length arrays would broadcast
        out[i] = a
    return out


class DecodeAudio:
    """``map_batches`` callable: ``{"bytes", "path"}`` -> ``{"audio" (T,), "label", "path"}`` rows.

    Bad files are skipped through ``reporter`` (or fail the run when it is strict). Recordings
    longer than ``max_seconds`` become several rows ``path#0``, ``path#1``, ... so one hour-long
    file never becomes one 230 MB row.
    """

    def __init__(self, reporter: SkipReporter, sample_rate: int, root: str, class_names: tuple[str, ...],
                 max_seconds: float | None = None, slots: bool = False):
        self.reporter, self.slots = reporter, slots  # slots: rows carry their file's position in the batch
        self.sample_rate = sample_rate
        self.root = root
        self.class_names = class_names
        self.max_samples = None if max_seconds is None else max(1, int(max_seconds * sample_rate))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        audios, labels, paths, slots = [], [], [], []
        file_labels = folder_labels(batch["path"], self.root, self.class_names)
        for slot, (blob, path, label) in enumerate(zip(batch["bytes"], batch["path"], file_labels, strict=True)):
            path = str(path)
            try:
                audio = decode_audio(blob, self.sample_rate)
            except BadAudio as bad:
                self.reporter.skip(path, bad.reason)
                continue
            pieces = split_long(audio, self.max_samples)
            audios += pieces
            labels += [label] * len(pieces)
            paths += [path] if len(pieces) == 1 else [f"{path}#{k}" for k in range(len(pieces))]
            slots += [slot] * len(pieces)
        self.reporter.flush()
        out = {"audio": ragged(audios), "label": np.asarray(labels, dtype=np.int64), "path": ragged(paths)}
        if self.slots:
            out["slot"] = np.asarray(slots, dtype=np.int64)
        return out


def read_audio_corpus(source: str | Path, *, sample_rate: int = 16_000, reporter: SkipReporter,
                      max_seconds: float | None = None, fmt: str = "auto", decode_batch_size: int = 16):
    """A lazy Dataset of ``{"audio": float32 (T,), "label": int64, "path": str}`` rows.

    Args:
        source: folder, file or URI of wav / flac / ogg files, or ``"spoken-digits"``.
        sample_rate: every clip is resampled to this rate (Hz).
        reporter: skips (and counts) or rejects corrupt and empty files.
        max_seconds: recordings longer than this are split into several rows.
        fmt: "auto" or "folder" (wav, flac and ogg), or one of them alone.
        decode_batch_size: files decoded per ``map_batches`` call.

    Raises ValueError naming ``source`` if it does not exist or holds no audio file.
    """
    import ray.data

    files = list_audio_files(source, fmt)
    ds = ray.data.read_binary_files(list(files.paths), include_paths=True, filesystem=files.filesystem)
    decode = DecodeAudio(reporter, sample_rate, files.root, files.class_names, max_seconds)
    return ds.map_batches(decode, batch_size=decode_batch_size, batch_format="numpy")


def audio_class_names(source: str | Path, fmt: str = "auto") -> tuple[str, ...]:
    """Class names of a corpus in label order: its sorted class sub-folders (word order for spoken-digits)."""
    return list_audio_files(source, fmt).class_names


# ---------------------------------------------------------------------------------------------
# Batched transforms


def span_mask(num_frames: int, real_frames: int, mask_prob: float, span: int, rng: np.random.Generator) -> np.ndarray:
    """wav2vec 2.0 time masking (Baevski et al. 2020, sec. 3.1): a proportion ``mask_prob`` of the
    real frames, drawn without replacement, start a span of ``span`` masked frames; spans may
    overlap, so about ``1 - (1 - mask_prob) ** span`` of the frames end up masked (49% for the
    paper's p = 0.065, M = 10). Padding frames are never masked. -> bool (num_frames,)
    """
    mask = np.zeros(num_frames, dtype=bool)
    if real_frames <= 0 or mask_prob <= 0:
        return mask
    # Stochastic rounding keeps the expected number of starts exactly mask_prob * real_frames.
    starts = rng.choice(real_frames, min(real_frames, int(mask_prob * real_frames + rng.random())), replace=False)
    idx = (starts[:, None] + np.arange(span)).ravel()
    mask[idx[idx < real_frames]] = True
    return mask


def normalize_real(audio: np.ndarray, lengths: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Zero mean, unit variance over each row's real samples; padding stays 0. (B, T) -> (B, T)."""
    real = np.arange(audio.shape[1]) < lengths[:, None]  # (B, T)
    n = np.maximum(lengths, 1)[:, None].astype(np.float64)
    mean = (audio * real).sum(axis=1, keepdims=True) / n
    var = (((audio - mean) * real) ** 2).sum(axis=1, keepdims=True) / n
    return np.where(real, (audio - mean) / np.sqrt(var + eps), 0.0).astype(np.float32)


class AudioCrops:
    """``map_batches`` callable: variable-length clips -> fixed-length crops CPC and wav2vec eat.

    Each clip gets one random ``crop_seconds`` window; clips shorter than that are kept whole
    and right-padded with zeros, ``"lengths"`` recording the real samples. With ``normalize``
    every crop is scaled to zero mean and unit variance over its real samples (wav2vec 2.0's
    per-utterance normalisation). With ``mask_prob > 0`` a wav2vec 2.0 span mask over the
    ``frame_hop``-sample frames (10 ms at 16 kHz) is added as ``"mask"``; CPC does not consume
    it (it predicts the future instead of masked frames): it is for wav2vec2-style methods,
    which replace the masked encoder frames by a learned vector.

    Randomness comes from (seed, epoch, the row's "path"), or the clip's bytes when there is no
    path, so the same seed and epoch give the same crops and masks however rows are batched;
    ``seed=None`` draws fresh ones. Build a new instance with the next ``epoch`` for new views.

    Shape:
        - in: ``{"audio": B clips of float32 (T_i,), "label": (B,), "path": (B,)}``
        - out: ``{"audio": float32 (B, T), "lengths": int64 (B,), "label": int64 (B,)}`` and
          ``"mask": bool (B, T // frame_hop)`` when masking; T = round(crop_seconds * sample_rate).
    """

    def __init__(self, crop_seconds: float = 1.0, sample_rate: int = 16_000, seed: int | None = None, epoch: int = 0,
                 normalize: bool = True, mask_prob: float = 0.0, mask_span: int = 10, frame_hop: int = 160):
        if crop_seconds * sample_rate < frame_hop:
            raise ValueError(f"crop_seconds={crop_seconds} is shorter than one {frame_hop}-sample frame; raise it")
        if not 0.0 <= mask_prob <= 1.0 or mask_span < 1:
            raise ValueError(f"mask_prob must lie in [0, 1] and mask_span be >= 1, got {mask_prob} and {mask_span}")
        self.crop_samples = int(round(crop_seconds * sample_rate))
        self.seed, self.epoch, self.normalize = seed, epoch, normalize
        self.mask_prob, self.mask_span, self.frame_hop = mask_prob, mask_span, frame_hop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips, b, t = batch["audio"], len(batch["audio"]), self.crop_samples
        paths = batch.get("path")
        audio = np.zeros((b, t), np.float32)
        lengths = np.zeros(b, np.int64)
        mask = np.zeros((b, t // self.frame_hop), bool)
        for i, clip in enumerate(clips):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(f"AudioCrops needs non-empty mono clips (T,), got shape {clip.shape}")
            rng = record_rng(self.seed, self.epoch, str(paths[i]) if paths is not None else clip.tobytes())
            start = int(rng.integers(0, len(clip) - t + 1)) if len(clip) > t else 0
            crop = clip[start:start + t]
            audio[i, :len(crop)] = crop
            lengths[i] = len(crop)
            if self.mask_prob > 0:
                mask[i] = span_mask(mask.shape[1], len(crop) // self.frame_hop, self.mask_prob, self.mask_span, rng)
        if self.normalize:
            audio = normalize_real(audio, lengths)
        labels = np.asarray(batch["label"], np.int64) if "label" in batch else np.full(b, -1, np.int64)
        out = {"audio": audio, "lengths": lengths, "label": labels}
        if self.mask_prob > 0:
            out["mask"] = mask
        return out


# ---------------------------------------------------------------------------------------------
# `sslp data inspect SOURCE --kind audio`


def inspect_audio(source: str, out_dir: Path, *, strict: bool = False, sample_rate: int = 16_000,
                  crop_seconds: float = 1.0, mask_prob: float = 0.0, mask_span: int = 10, fmt: str = "auto",
                  max_seconds: float | None = 30.0, num_examples: int = 4, seed: int = 0) -> dict:
    """Count a corpus, report its skipped files and draw a few crops to ``out_dir/audio_crops.png``.

    Returns ``{"records", "skipped", "example", "figure"}``; ``records == 0`` (and no figure)
    when no file decodes, for the caller to refuse the corpus. Ray must be initialised.
    """
    with InspectLedger(strict) as ledger:
        ds = read_audio_corpus(source, sample_rate=sample_rate, reporter=ledger.reporter, max_seconds=max_seconds,
                               fmt=fmt)
        records, batch = scan(ds, keep=num_examples, varied_by="label")  # one example per class first
    if not records:
        return report(0, ledger.summary)
    crops = AudioCrops(crop_seconds, sample_rate, seed=seed, mask_prob=mask_prob, mask_span=mask_span)(batch)
    class_names = audio_class_names(source, fmt)
    names = [class_names[i] if i >= 0 else "unlabelled" for i in crops["label"]]
    example = {"audio": f"float32 {crops['audio'].shape}", "lengths": crops["lengths"].tolist(),
               "label": crops["label"].tolist(), "class": names, "path": [str(p) for p in batch["path"]]}
    if "mask" in crops:
        example["mask"] = f"bool {crops['mask'].shape}, {crops['mask'].mean():.0%} of frames masked"
    figure = save(audio_crops_figure(crops, names, sample_rate), out_dir, "audio_crops.png", dpi=90)
    return report(records, ledger.summary, example, figure)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a bool vector."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def audio_crops_figure(crops: dict[str, np.ndarray], names: list[str], sample_rate: int, frame_hop: int = 160):
    """A matplotlib Figure, one row per crop: waveform and log-power spectrogram, masked spans
    shaded orange and padding grey. Uses matplotlib's object-oriented API only (no pyplot state)."""
    import torch
    from matplotlib.figure import Figure

    audio, lengths = crops["audio"], crops["lengths"]
    mask = crops.get("mask")
    seconds = audio.shape[1] / sample_rate
    fig = Figure(figsize=(11, 2.2 * len(audio)), layout="constrained")
    axes = fig.subplots(len(audio), 2, squeeze=False)
    n_fft = min(400, audio.shape[1])  # 25 ms windows at 16 kHz, as in speech front ends
    spec = torch.stft(torch.from_numpy(audio), n_fft, hop_length=frame_hop, window=torch.hann_window(n_fft),
                      return_complex=True).abs().pow(2)  # (B, n_fft // 2 + 1, frames)
    log_spec = 10 * torch.log10(spec + 1e-10).numpy()
    for i, (wave_ax, spec_ax) in enumerate(axes):
        t = np.arange(audio.shape[1]) / sample_rate
        wave_ax.plot(t, audio[i], lw=0.5, color="tab:blue")
        wave_ax.set_xlim(0, seconds)
        wave_ax.set_title(f"{names[i]} (label {crops['label'][i]}), {lengths[i] / sample_rate:.2f} s real", fontsize=9)
        spec_ax.imshow(log_spec[i], origin="lower", aspect="auto", cmap="magma",
                       extent=(0, seconds, 0, sample_rate / 2000), vmin=log_spec[i].max() - 80)
        spec_ax.set_ylabel("kHz", fontsize=8)
        for ax in (wave_ax, spec_ax):
            if lengths[i] < audio.shape[1]:
                ax.axvspan(lengths[i] / sample_rate, seconds, color="grey", alpha=0.3, lw=0)
            if mask is not None:
                for a, b in _runs(mask[i]):
                    ax.axvspan(a * frame_hop / sample_rate, b * frame_hop / sample_rate, color="orange",
                               alpha=0.35 if ax is wave_ax else 0.5, lw=0)
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    fig.suptitle("audio crops: waveform | log-power spectrogram (orange: span mask, grey: padding)", fontsize=10)
    return fig
