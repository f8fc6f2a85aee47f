"""Generate the ``spoken-digits`` corpus with espeak-ng (run once; the result is committed).

    apt-get install -y espeak-ng          # Debian/Ubuntu; brew install espeak-ng on macOS
    python -m ssl_platform.data.make_spoken_digits platform/ssl_platform/data/spoken_digits_data

Each of the words zero..nine is spoken by every voice in :data:`VOICES` at every speed in
:data:`SPEEDS` and pitch in :data:`PITCHES`. espeak-ng writes 22,050 Hz mono WAV; each clip is
resampled to 16 kHz, trimmed of leading and trailing silence, peak-normalised, quantised to 12 bits
(72 dB of dynamic range, more than synthetic speech needs) and saved as 16-bit FLAC, whose
"wasted bits" coding then stores the 4 constant low bits for free: 480 clips in under 3 MB. Clips
go to a class sub-folder (``zero/``, ..., ``nine/``), named ``{voice}_s{speed}_p{pitch}.flac`` so the voice of
every clip can be read back from its name. The platform only reads the committed FLAC files, so
neither training nor ``make demo`` needs espeak-ng.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ssl_platform.data.builtin import DIGIT_NAMES as DIGIT_WORDS

# Accents (British, American, Received Pronunciation, Scottish, Caribbean) crossed with
# espeak-ng's voice variants (+f: female formants, +m: male) so a probe cannot key on one timbre.
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-us+f3", "en-gb+f4", "en-029+m3", "en-us-nyc+f2")
SPEEDS = (130, 165, 200)  # words per minute (espeak-ng's default is 175)
PITCHES = (30, 70)  # 0..99, espeak-ng's default is 50
SAMPLE_RATE = 16_000
SILENCE_DB = -40.0  # a 10 ms frame quieter than this (relative to the clip's peak) is silence
MARGIN_SECONDS = 0.02  # kept on both sides of the trimmed clip so onsets and releases stay whole
PEAK = 0.9  # every clip is scaled to this peak so loudness says nothing about the voice
BITS = 12  # effective bits per sample inside the 16-bit FLAC


def espeak_command(word: str, voice: str, speed: int, pitch: int, wav_path: str) -> list[str]:
    """The exact espeak-ng command line for one clip."""
    return ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", wav_path, word]


def trim_silence(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading and trailing 10 ms frames quieter than ``SILENCE_DB`` below the peak. (T,) -> (T',)."""
    hop = sample_rate // 100
    frames = len(audio) // hop
    if frames == 0:
        return audio
    rms = np.sqrt((audio[: frames * hop].reshape(frames, hop) ** 2).mean(axis=1))  # (frames,)
    loud = np.flatnonzero(rms > rms.max() * 10 ** (SILENCE_DB / 20))
    margin = int(MARGIN_SECONDS * sample_rate)
    start = max(0, loud[0] * hop - margin)
    stop = min(len(audio), (loud[-1] + 1) * hop + margin)
    return audio[start:stop]


def synthesize(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One trimmed float32 clip at ``SAMPLE_RATE``. (T,)"""
    import soundfile
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        wav = str(Path(tmp) / "clip.wav")
        subprocess.run(espeak_command(word, voice, speed, pitch, wav), check=True, capture_output=True)
        audio, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    g = math.gcd(SAMPLE_RATE, rate)
    audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return trim_silence(audio, SAMPLE_RATE)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Peak-normalise and quantise to ``BITS`` bits, stored as int16 with the low bits zero. (T,)"""
    audio = audio * (PEAK / max(float(np.abs(audio).max()), 1e-9))
    step = 2 ** (16 - BITS)
    return (np.round(audio * (2 ** 15 / step)) * step).astype(np.int16)


def clip_name(voice: str, speed: int, pitch: int) -> str:
    return f"{voice.replace('+', '_')}_s{speed}_p{pitch}.flac"


def generate(out_dir: Path) -> int:
    """Write every (word, voice, speed, pitch) clip under ``out_dir``; returns the number written."""
    import soundfile

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: run `apt-get install -y espeak-ng` (or `brew install espeak-ng`)")
    written = 0
    for word in DIGIT_WORDS:
        (out_dir / word).mkdir(parents=True, exist_ok=True)
        for voice in VOICES:
            for speed in SPEEDS:
                for pitch in PITCHES:
                    pcm = to_pcm16(synthesize(word, voice, speed, pitch))
                    soundfile.write(out_dir / word / clip_name(voice, speed, pitch), pcm, SAMPLE_RATE,
                                    format="FLAC", subtype="PCM_16", compression_level=1.0)
                    written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write zero/ ... nine/ into")
    args = parser.parse_args(argv)
    n = generate(args.out_dir)
    print(f"wrote {n} clips to {args.out_dir} "
          f"(e.g. {' '.join(espeak_command('seven', VOICES[0], SPEEDS[0], PITCHES[0], 'OUT.wav'))})")


if __name__ == "__main__":
    main()
