"""The frozen-encoder table for a CPC run: which word was spoken (``spoken-digits``), or which
class a clip of the user's labelled ``eval.data`` is (see :mod:`~ssl_platform.data.labelled`).

CPC's downstream representation is its context ``c`` (van den Oord et al. 2018, sec. 3.1: a
linear classifier on the context features). Each clip is fed whole (zero-padded to the longest
clip, normalised exactly like the training crops by :class:`~ssl_platform.data.audio.AudioCrops`,
no random crop), ``CPC.embed`` mean-pools ``c`` over the clip's real frames, and a linear probe
and a weighted kNN predict the word on the held-out split. Features come from Ray Data batch
inference (:func:`ssl_platform.evaluate.inference.extract`), not a loop on the driver.

Rows of the table:

- this run's encoder;
- the same architecture at random init (a GRU over random conv features is already a usable
  summary of a short clip, so the run must beat it clearly to have learnt anything);
- a log-mel spectrogram baseline, the classic speech front end: 40 mel bands of 25 ms windows
  every 10 ms, each band's mean and standard deviation over the clip's real frames (80 numbers
  per clip), then the same probes. torchaudio is not a dependency: the filterbank is built here
  (HTK mel scale, triangular filters, as ``torchaudio.functional.melscale_fbanks``) and the
  spectrogram is ``torch.stft``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray.data
import torch
from torch import Tensor

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.audio import AudioCrops, ragged
from ssl_platform.data.labelled import audio_splits, eval_source
from ssl_platform.data.spoken_digits import AudioSplit
from ssl_platform.evaluate.report import markdown_table, write_results
from ssl_platform.probes import knn_accuracy, linear_probe

N_FFT = 400  # 25 ms windows at 16 kHz, as in speech front ends
HOP = 160  # 10 ms, CPC's frame rate
N_MELS = 40
LOG_EPS = 1e-6  # floor of the mel power before the log (silence and padding)


# ---------------------------------------------------------------------------------------------
# Clips -> batches the encoder eats


def full_clips(longest: int, sample_rate: int, normalize: bool) -> AudioCrops:
    """The ``map_batches`` callable that turns whole clips into ``{"audio" (B, longest), "lengths",
    "label"}``: :class:`AudioCrops` with a window of ``longest`` samples (the longest clip of the
    corpus), so no clip is cropped and every batch has the same width, and with training's
    per-clip normalisation; seed 0 because nothing is random."""
    return AudioCrops(crop_seconds=longest / sample_rate, sample_rate=sample_rate, seed=0, normalize=normalize)


SPLITS = ("train", "val")  # the ``split`` column: 0 = probe training clips, 1 = held-out clips


def clip_dataset(splits: dict[str, AudioSplit], sample_rate: int, normalize: bool):
    """Both splits as one Dataset of padded, normalised whole clips (``audio`` (T,) float32,
    ``lengths``, ``label``, ``split`` rows), so each model runs over the corpus in one inference pass.

    The built-in corpus already sits in the driver's memory (480 clips, about 24 MB padded), so
    :class:`AudioCrops` pads and normalises it there: 0.4 s, where a Ray Data stage measured 20 s
    on a loaded 2-core machine (a worker process starting and importing torch for 480 rows).
    """
    longest = max(len(a) for split in splits.values() for a in split.audio)
    clips = full_clips(longest, sample_rate, normalize)
    rows = []
    for i, name in enumerate(SPLITS):
        split = splits[name]
        batch = clips({"audio": ragged(list(split.audio)), "label": split.labels,
                       "path": np.asarray(split.paths, dtype=object)})
        rows += [{"audio": batch["audio"][j], "lengths": int(batch["lengths"][j]), "label": int(batch["label"][j]),
                  "split": i} for j in range(len(split))]
    return ray.data.from_items(rows, override_num_blocks=8)


def by_split(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{"features", "label", "split"}`` arrays -> ``{"train": {...}, "val": {...}}``."""
    return {name: {k: v[arrays["split"] == i] for k, v in arrays.items()} for i, name in enumerate(SPLITS)}


def embed_clips(method: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``inference.extract``'s encode function: the mean-pooled context features of each clip.

    (B, T) audio and (B,) lengths -> (B, context_dim); padded frames are not pooled.
    """
    return method.embed({"audio": batch["audio"].float(), "lengths": batch["lengths"].long()})


# ---------------------------------------------------------------------------------------------
# The log-mel baseline


def hz_to_mel(f: Tensor | float) -> Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int = N_FFT, n_mels: int = N_MELS, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """Triangular filters evenly spaced on the mel scale, as ``torchaudio.functional.melscale_fbanks``
    (HTK scale, no area normalisation): filter ``m`` rises from mel point ``m`` to ``m + 1`` and
    falls to ``m + 2``.

    Shape: (n_fft // 2 + 1, n_mels), so ``power (.., F, frames)`` -> ``fb.T @ power``.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2 or n_mels < 1:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2 and n_mels >= 1, got f_min={f_min}, "
                         f"f_max={f_max}, sample_rate={sample_rate}, n_mels={n_mels}")
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    points = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                      dtype=torch.float64))  # (n_mels + 2,)
    lower, centre, upper = points[:-2], points[1:-1], points[2:]  # (n_mels,) each
    rising = (freqs[:, None] - lower) / (centre - lower)  # (F, n_mels)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel_stats(audio: Tensor, lengths: Tensor, sample_rate: int, n_fft: int = N_FFT, hop: int = HOP,
                  n_mels: int = N_MELS) -> Tensor:
    """Mean and standard deviation of each log-mel band over each clip's real frames.

    A frame is real when its whole window lies inside the clip (``center=False``), so padding
    never enters the statistics.

    Shape: audio (B, T), lengths (B,) -> (B, 2 * n_mels): the means, then the standard deviations.
    """
    if audio.shape[1] < n_fft:
        raise ValueError(f"clips of {audio.shape[1]} samples are shorter than one {n_fft}-sample window")
    spec = torch.stft(audio.float(), n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=False,
                      return_complex=True).abs().pow(2)  # (B, F, frames)
    mel = torch.log(mel_filterbank(sample_rate, n_fft, n_mels).T @ spec + LOG_EPS)  # (B, n_mels, frames)
    real_frames = ((lengths - n_fft) // hop + 1).clamp(min=1)  # (B,)
    real = (torch.arange(mel.shape[2]) < real_frames[:, None]).to(mel.dtype)[:, None]  # (B, 1, frames)
    count = real.sum(dim=2)  # (B, 1)
    mean = (mel * real).sum(dim=2) / count  # (B, n_mels)
    var = (((mel - mean[..., None]) * real) ** 2).sum(dim=2) / count
    return torch.cat([mean, var.sqrt()], dim=1)  # (B, 2 * n_mels)


class LogMelStats:
    """``map_batches`` callable: padded clips -> ``{"features": (B, 2 * n_mels), "label", "split"}``
    (see :func:`log_mel_stats`)."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray hands read-only arrays over; torch.tensor copies (from_numpy would warn).
        audio, lengths = torch.tensor(np.asarray(batch["audio"])), torch.tensor(np.asarray(batch["lengths"]))
        return {"features": log_mel_stats(audio, lengths, self.sample_rate).numpy(), "label": batch["label"],
                "split": batch["split"]}


def collect(ds, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The ``keys`` columns of a (small) Dataset as numpy arrays, rows aligned."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in keys:
            parts[k].append(np.asarray(batch[k]))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# The table


def probe_row(name: str, train: dict[str, np.ndarray], val: dict[str, np.ndarray], cfg: ExperimentConfig) -> dict:
    """Linear-probe and kNN top-1 (0..1) on the held-out clips from ``{"features", "label"}`` arrays."""
    return {
        "encoder": name,
        "linear_probe_top1": linear_probe(train["features"], train["label"], val["features"], val["label"],
                                          seed=cfg.train.seed),
        "knn_top1": knn_accuracy(train["features"], train["label"], val["features"], val["label"],
                                 k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature),
    }


def evaluate(cfg: ExperimentConfig, checkpoint_dir: Path | None, run_dir: Path) -> list[dict]:
    """Probe this run's frozen CPC context features, random init and log-mel on spoken-digits.

    Writes results.json, results.md and report.png into ``run_dir``, prints the table and returns
    its rows. Ray must be initialised (features are extracted by an actor pool).
    """
    from ssl_platform.evaluate.inference import extract_each
    from ssl_platform.methods import method_spec
    from ssl_platform.train.checkpoint import load_payload, saved_derived

    d = cfg.data
    spec = method_spec(cfg.method.name)
    if spec.data_kind != "audio":
        raise ValueError(f"the audio protocol evaluates audio methods, got method.name={cfg.method.name} "
                         f"({spec.data_kind}); use ssl_platform.evaluate.evaluate_run, which picks the protocol of "
                         f"the method")
    if d.path and not cfg.eval.data:
        raise ValueError(f"evaluating {spec.display_name} needs labelled clips, and data.path={d.path} has none; set "
                         f"eval.data=PATH to a folder of clips with a sub-folder per class")
    if checkpoint_dir is None:
        raise ValueError("no checkpoint to evaluate: pass the run's checkpoint directory (checkpoint_*/)")
    payload = load_payload(checkpoint_dir)
    state = payload["model"]
    splits, skipped = audio_splits(cfg)
    clips = clip_dataset(splits, d.sample_rate, d.normalize_audio).materialize()
    derived = saved_derived(payload) or {"sample_rate": d.sample_rate}  # older checkpoints: from the config
    keep = ("label", "split")
    features = extract_each(clips, cfg, derived, {"trained": state, "random": None}, embed_clips, keep=keep,
                            seed=cfg.train.seed)
    trained, random_init = by_split(features["trained"]), by_split(features["random"])
    log_mel = by_split(collect(clips.map_batches(LogMelStats(d.sample_rate), batch_size=cfg.eval.batch_size,
                                                 batch_format="numpy"), ("features", *keep)))
    rows = [
        probe_row(f"{spec.display_name} (this run)", trained["train"], trained["val"], cfg),
        probe_row("random init", random_init["train"], random_init["val"], cfg),
        probe_row(f"log-mel ({N_MELS} bands, mean+std)", log_mel["train"], log_mel["val"], cfg),
    ]
    train, val = splits["train"], splits["val"]
    title = (f"{cfg.name}: frozen {spec.display_name} context features on {eval_source(cfg)}, class of "
             f"{len(train.class_names)} "
             f"({len(train)} train / {len(val)} held-out clips)")
    notes = ("Each clip is fed whole (zero-padded, normalised as in training); the context features are "
             "mean-pooled over its real frames. Chance is "
             f"{100 / len(train.class_names):.0f}%. "
             + ("The held-out clips are balanced over the voices." if not cfg.eval.data else skipped))
    write_results(run_dir, rows, metrics_path=Path(run_dir) / "metrics.jsonl", title=title, notes=notes)
    print(markdown_table(rows), flush=True)
    return rows
