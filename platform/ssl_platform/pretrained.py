"""``ssl_platform.load``: a finished run's encoder, ready to embed raw images, texts or audio.

People pretrain in order to use the representation. :func:`load` takes a run directory (or one
of its ``checkpoint_*`` directories, found as ``sslp eval`` finds it), rebuilds the method from
the config saved inside the checkpoint, loads its weights in eval mode and keeps what the run
needs to take raw inputs: the image size, channels and normalisation, the tokenizer it trained,
the audio sample rate. The ``embed_*`` methods then give exactly the features evaluation uses
as the representation (the encoder, not the projector), through the same functions::

    pretrained = ssl_platform.load("runs/simclr-digits")
    features = pretrained.embed_images(["a.png", "b.jpg"])  # (2, D) float32

Raw inputs go through the evaluation path: images are decoded and converted to the run's
channels, centre-square-cropped and resized to ``data.image_size`` (``data.decode``), then
normalised by ``data.transforms.to_float``; texts are tokenised with the run's tokenizer as the
text evaluation builds sequences; waveforms are resampled to ``data.sample_rate`` and
normalised like the training crops (``evaluate.audio.full_clips``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssl_models.spec import MethodSpec
from ssl_platform.config import ExperimentConfig

# Corpus kind (a spec's data_kind) -> the kind this API names; a modality a method embeds (its
# spec's embeds) -> this API's name for it, and the embed_* that takes it.
KINDS = {"image": "image", "image-caption": "caption", "text": "text", "audio": "audio"}
MODALITIES = {"image": "images", "text": "texts", "audio": "audio"}
USE = {"images": "embed_images", "texts": "embed_texts", "audio": "embed_audio"}


def _read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist; pass existing image files, arrays or PIL images")
    return path.read_bytes()


def _as_chw(image: Any, channels: int, index: int) -> Tensor:
    """One raw image -> uint8 (channels, H, W): a path (decoded and converted to ``channels`` as
    training reads files), a PIL image (converted likewise) or a uint8 HWC / HW array (whose
    channels must already be the run's)."""
    from ssl_platform.data.decode import decode_one

    if isinstance(image, (str, Path)):
        decoded = decode_one(_read_bytes(image), channels)
        if decoded is None:
            raise ValueError(f"image {index} ({image}) is not a readable image file")
        return decoded
    if type(image).__module__.startswith("PIL."):
        image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    array = np.asarray(image)
    if array.ndim == 2 and channels == 1:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] != channels:
        raise ValueError(f"image {index} has shape {array.shape}, but this run's encoder takes {channels}-channel "
                         f"images as (H, W, {channels}) arrays (batches (N, H, W, {channels})); convert the images "
                         f"to {'grayscale' if channels == 1 else 'RGB'} or pass file paths")
    if array.dtype != np.uint8:
        raise ValueError(f"image {index} has dtype {array.dtype}; pass uint8 pixels in 0..255 (as decoded from a file)")
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)  # (C, H, W)


def image_batch(images: Any, size: int, channels: int) -> np.ndarray:
    """Raw images -> uint8 (N, channels, size, size), the evaluation input before normalisation.

    ``images``: a uint8 array (N, H, W, C), or a sequence of paths, PIL images or (H, W, C) arrays.
    Each is centre-square-cropped and resized to ``size`` (``data.decode.center_square_resize``).
    """
    from ssl_platform.data.decode import center_square_resize

    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"an image array must be a batch (N, H, W, C), got shape {images.shape}; "
                         f"wrap one image as images[None]")
    if isinstance(images, (str, Path)) or type(images).__module__.startswith("PIL."):
        images = [images]  # one image given bare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decode -> TorchCodec notice
        chw = [_as_chw(image, channels, i) for i, image in enumerate(images)]
    out = np.empty((len(chw), channels, size, size), np.uint8)
    for i, image in enumerate(chw):
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"image {i} is empty (shape {tuple(image.shape)})")
        out[i] = center_square_resize(image, size).numpy()
    return out


@dataclass
class Pretrained:
    """A trained method in eval mode with what it needs to embed raw inputs (see the module docstring).

    Attributes:
        method: the ``ssl_models`` method, eval mode, on ``device``.
        cfg: the run's ExperimentConfig (from the checkpoint).
        kind: ``"image"``, ``"caption"`` (CLIP), ``"text"`` or ``"audio"``.
        modalities: which ``embed_*`` apply: ``("images",)``, ``("images", "texts")``, ...
        checkpoint: the checkpoint directory the weights came from.
        derived: the data-derived constructor arguments the method was built with.
        tokenizer: the run's ``TextTokenizer`` (BERT, GPT); None otherwise (CLIP uses open_clip's).
    """

    method: nn.Module
    cfg: ExperimentConfig
    kind: str
    checkpoint: Path
    derived: dict[str, Any]
    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def spec(self) -> MethodSpec:
        """What the method declares about itself (``ssl_models``' ``spec``)."""
        from ssl_platform.methods import method_spec

        return method_spec(self.cfg.method.name)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(MODALITIES[m] for m in self.spec.embeds)

    def to(self, device: str | torch.device) -> Pretrained:
        """Move the method to ``device`` (e.g. ``"cuda"``); returns self."""
        self.device = torch.device(device)
        self.method.to(self.device)
        return self

    @property
    def embedding_dims(self) -> dict[str, int]:
        """Width of each modality's embedding: ``{"images": D}``, ``{"images": E, "texts": E}``, ..."""
        width = int(getattr(self.method, "embed_dim", None) or self.method.feature_dim)
        return dict.fromkeys(self.modalities, width)

    @property
    def dim(self) -> int:
        """The embedding width (every modality of a method shares it)."""
        return next(iter(self.embedding_dims.values()))

    # ------------------------------------------------------------------------------ images

    def image_inputs(self, images: Any) -> np.ndarray:
        """Raw images -> uint8 (N, C, S, S) at the run's size and channels (before normalisation)."""
        self._require("images")
        return image_batch(images, self.cfg.data.image_size, self.derived["in_channels"])

    def embed_images(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Embeddings of raw images, float32 (N, D): the encoder's features (CLIP: the image
        tower's L2-normalised embedding), as the image and CLIP evaluations compute them.

        ``images``: uint8 (N, H, W, C), or a sequence of paths, PIL images or (H, W, C) uint8 arrays.
        """
        from ssl_platform.evaluate.image import embed_images

        pixels = self.image_inputs(images)
        return self._batched(len(pixels), batch_size, lambda s: embed_images(
            self.method, {"image": torch.from_numpy(pixels[s]).to(self.device)}))

    # ------------------------------------------------------------------------------- texts

    def text_inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Texts -> the token batch the method's text encoder takes (int64 arrays, one row per text).

        CLIP: open_clip's tokenizer at the run's ``context_length`` (``"text"``). BERT: ``[CLS]
        tokens [SEP]`` cut to ``data.max_len`` and padded, as the text evaluation's chunks. GPT:
        the tokens cut to ``data.max_len`` and padded; ``attention_mask`` marks the real ones.
        """
        self._require("texts")
        if isinstance(texts, str):
            raise ValueError(f"texts must be a sequence of strings, got the string {texts[:30]!r}; use [text]")
        texts = [str(t) for t in texts]
        if self.kind == "caption":
            return {"text": self.method.tokenize(texts).numpy()}
        tok, max_len = self.tokenizer, self.cfg.data.max_len
        ids = tok.encode_batch(texts)
        if tok.cls_id is not None:  # wordpiece (BERT): [CLS] ... [SEP]
            ids = [[tok.cls_id, *row[:max_len - 2], tok.sep_id] for row in ids]
        else:
            ids = [row[:max_len] or [tok.eot_id] for row in ids]  # an empty text still has one token
        input_ids = np.full((len(ids), max_len), tok.pad_id, np.int64)
        lengths = np.array([len(row) for row in ids], np.int64)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = row
        batch = {"input_ids": input_ids, "attention_mask": (np.arange(max_len) < lengths[:, None]).astype(np.int64)}
        if "token_type_ids" in self.spec.batch_keys:  # sentence-pair models: one segment
            batch["token_type_ids"] = np.zeros_like(input_ids)
        return batch

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embeddings of texts, float32 (N, D): CLIP's text tower (L2-normalised), BERT's [CLS]
        state, GPT's mean state over the real tokens, as the evaluations compute them."""
        batch = self.text_inputs(texts)

        def encode(s: slice) -> Tensor:
            part = {k: torch.from_numpy(v[s]).to(self.device) for k, v in batch.items()}
            return self.method.encode_text(part["text"]) if self.kind == "caption" else self.method.embed(part)

        return self._batched(len(next(iter(batch.values()))), batch_size, encode)

    # ------------------------------------------------------------------------------- audio

    def audio_inputs(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> dict[str, np.ndarray]:
        """Mono waveforms at ``sample_rate`` -> ``{"audio" (N, T) float32, "lengths" (N,)}`` at the
        run's ``data.sample_rate``, zero-padded and normalised as the audio evaluation feeds CPC."""
        from ssl_platform.data.audio import ragged, resample
        from ssl_platform.evaluate.audio import full_clips

        self._require("audio")
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            raise ValueError("waveforms must be a sequence of mono clips; wrap one clip as [clip]")
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be the clips' rate in Hz (a positive int), got {sample_rate!r}")
        rate = self.cfg.data.sample_rate
        shortest = self.method.encoder.receptive_field  # one frame
        clips = []
        for i, clip in enumerate(waveforms):
            clip = np.asarray(clip)
            if clip.ndim != 1 or not np.issubdtype(clip.dtype, np.floating):
                raise ValueError(f"clip {i} has shape {clip.shape} and dtype {clip.dtype}; pass mono float "
                                 f"waveforms (T,) (average the channels of a stereo clip)")
            if not np.isfinite(clip).all():
                raise ValueError(f"clip {i} holds NaN or infinite samples")
            clip = resample(clip.astype(np.float32), int(sample_rate), rate)
            if len(clip) < shortest:
                raise ValueError(f"clip {i} has {len(clip)} samples at {rate} Hz, fewer than the encoder's "
                                 f"{shortest}-sample frame ({shortest / rate * 1000:.0f} ms); pass longer clips")
            clips.append(clip)
        if not clips:
            raise ValueError("no waveforms given")
        out = full_clips(max(len(c) for c in clips), rate, self.cfg.data.normalize_audio)({"audio": ragged(clips)})
        return {"audio": out["audio"], "lengths": out["lengths"]}

    def embed_audio(self, waveforms: Sequence[np.ndarray], sample_rate: int, batch_size: int = 64) -> np.ndarray:
        """Embeddings of mono waveforms, float32 (N, D): CPC's context features mean-pooled over
        each clip's real frames, as the audio evaluation computes them. Clips are resampled from
        ``sample_rate`` to the run's rate; each is padded only to its batch's longest clip, which
        does not change its embedding (padded frames are not pooled)."""
        from ssl_platform.evaluate.audio import embed_clips

        self._require("audio")
        waveforms = list(waveforms) if not isinstance(waveforms, np.ndarray) or waveforms.ndim != 1 else waveforms
        parts = []
        for start in range(0, len(waveforms), batch_size):
            batch = self.audio_inputs(waveforms[start:start + batch_size], sample_rate)
            with torch.no_grad():
                parts.append(_numpy(embed_clips(self.method, {k: torch.from_numpy(v).to(self.device)
                                                              for k, v in batch.items()})))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    # ----------------------------------------------------------------------------- helpers

    def _require(self, modality: str) -> None:
        if modality not in self.modalities:
            use = " or ".join(USE[m] for m in self.modalities)
            raise ValueError(f"this is {'an' if self.kind[0] in 'aeiou' else 'a'} {self.kind} model "
                             f"({self.cfg.method.name}) without a {modality} encoder; use {use}")

    def _batched(self, n: int, batch_size: int, encode: Callable[[slice], Tensor]) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        with torch.no_grad():
            parts = [_numpy(encode(slice(s, s + batch_size))) for s in range(0, n, batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def load(run_dir_or_checkpoint: str | Path, device: str | torch.device | None = None) -> Pretrained:
    """The trained method of a run (its newest or finished checkpoint) or of one checkpoint directory.

    Args:
        run_dir_or_checkpoint: ``RUNS_DIR/NAME`` or one of its ``checkpoint_*`` directories.
        device: where the method runs (default CPU).

    Raises:
        FileNotFoundError: no such directory, or no checkpoint in it.
        ValueError: the checkpoint does not fit its own config (e.g. edited by hand).
    """
    from ssl_platform.command import resolve_checkpoint
    from ssl_platform.config import with_overrides
    from ssl_platform.evaluate.inference import build_method, check_state
    from ssl_platform.methods import expected_derived, method_spec
    from ssl_platform.train.checkpoint import load_payload, saved_derived

    checkpoint, raw = resolve_checkpoint(Path(run_dir_or_checkpoint))
    cfg = with_overrides(raw)
    kind = KINDS[method_spec(cfg.method.name).data_kind]
    payload = load_payload(checkpoint)
    state = payload["model"]
    # The arguments the method was built with travel in the checkpoint; an older checkpoint's are
    # predicted from its config (and the trained vocabulary) as they were before.
    derived = saved_derived(payload) or expected_derived(cfg)
    tokenizer = None
    if kind == "text":
        from ssl_platform.evaluate.text import run_tokenizer

        tokenizer = run_tokenizer(checkpoint, checkpoint.parent)
        if saved_derived(payload) is None:
            derived["vocab_size"] = tokenizer.vocab_size  # the trained vocabulary, as training built the model
    check_state(cfg, derived, state)
    device = torch.device(device or "cpu")
    method = build_method(cfg, derived, state).to(device)
    return Pretrained(method=method, cfg=cfg, kind=kind, checkpoint=checkpoint, derived=derived,
                      tokenizer=tokenizer, device=device)
