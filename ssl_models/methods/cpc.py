"""CPC, wav2vec style: a conv feature encoder on raw audio, a causal context network, one linear
predictor per future step and InfoNCE over the future frames."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_models.audio import ConvFeatureEncoder, build_context
from ssl_models.losses.cpc import CPCLoss
from ssl_models.spec import MethodSpec
from ssl_models.transformer import masked_mean


class CPC(nn.Module):
    """Contrastive Predictive Coding on raw waveforms (van den Oord et al. 2018, "Representation
    Learning with Contrastive Predictive Coding"), with wav2vec's encoder (Schneider et al. 2019,
    "wav2vec: Unsupervised Pre-training for Speech Recognition").

    ``z = encoder(audio)`` gives 10 ms frames, ``c = context(z)`` summarises the past causally,
    and for each step ``k = 1..K`` a linear map ``W_k`` predicts ``z_{t+k}`` from ``c_t``;
    ``CPCLoss`` scores the prediction against the frames of the batch (and of all ranks with
    ``gather_distributed``). The K predictors live here, stacked in one ``nn.Linear`` whose
    output block ``k`` is ``W_k c_t + b_k``, so the loss has no parameters.

    Downstream, the frozen representation is the context ``c``: ``encode_audio`` gives it per
    frame, ``embed`` mean-pools it over the real frames into one vector per clip (the input of
    a linear probe for clip-level labels).

    Args:
        sample_rate: sampling rate of the audio in Hz.
        channels: channels of the conv feature encoder, the dimension of z.
        kernels: kernel size of each conv layer.
        strides: stride of each conv layer; their product is the frame hop (160 = 10 ms at 16 kHz).
        context: "gru" (CPC) or "transformer" (causal).
        context_dim: width of the context network, the dimension of c (``feature_dim``).
        context_layers: GRU or transformer layers.
        num_heads: attention heads of the transformer context.
        dropout: dropout inside the context network.
        num_steps: K, future frames predicted (12 in CPC and wav2vec).
        num_negatives: "all" (exact, deterministic) or a number of sampled negatives per anchor;
            see ``CPCLoss`` for the memory cost of "all".
        temperature: None for CPC's dot-product scores, or a cosine-similarity temperature.
        gather_distributed: score anchors against the frames of all ranks.

    Shape:
        - batch["audio"]: (B, T) or (B, 1, T) float waveform, fixed length within a batch (and
          across ranks). Needs at least ``min_samples`` samples.
        - batch["lengths"] (optional): (B,) int, real samples of each right-padded clip; frames
          reaching into the padding are neither anchors nor candidates nor pooled by ``embed``.
        - ``encode_audio`` output: (B, T', context_dim), T' = ``encoder.output_length(T)``.
        - ``embed`` output: (B, context_dim).
    """

    spec = MethodSpec(
        display_name="CPC", data_kind="audio", batch_keys=("audio", "lengths"), embeds=("audio",),
        # The kNN accuracy of the spoken word (the downstream target), not the validation loss.
        online_metric="val_knn_top1", online_mode="max",
        objective_keys=frozenset({"num_steps", "num_negatives", "temperature", "gather_distributed"}),
        derived=("sample_rate",), accumulation="gradcache",
        accumulation_note="sampled negatives (num_negatives=N) are random draws, not those of one big batch")

    def __init__(self, sample_rate: int = 16_000, channels: int = 128, kernels: Sequence[int] = (10, 8, 4, 4, 4),
                 strides: Sequence[int] = (5, 4, 2, 2, 2), context: str = "gru", context_dim: int = 128,
                 context_layers: int = 1, num_heads: int = 4, dropout: float = 0.0, num_steps: int = 12,
                 num_negatives: int | str = "all", temperature: float | None = None, gather_distributed: bool = False):
        super().__init__()
        self.encoder = ConvFeatureEncoder(channels, kernels, strides, sample_rate)
        self.context = build_context(context, channels, context_dim, context_layers, num_heads, dropout)
        self.predictor = nn.Linear(context_dim, num_steps * channels)  # K predictors W_k, stacked
        self.criterion = CPCLoss(num_steps, num_negatives, temperature, gather_distributed)
        self.num_steps = num_steps
        self.feature_dim = context_dim
        # The last step needs a frame K steps after the first: K + 1 frames at least.
        self.min_samples = self.encoder.receptive_field + num_steps * self.encoder.total_stride

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(self.features(batch))

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the loss needs: "predictions" (B, T', K, C) of the future frames, the frames "z"
        (B, T', C) and, with ``batch["lengths"]``, the (B, T') "mask" of real frames."""
        audio, mask = self._audio_and_mask(batch)  # (B, T), (B, T') or None
        if audio.shape[1] < self.min_samples:
            raise ValueError(f"audio of {audio.shape[1]} samples gives {self.encoder.output_length(audio.shape[1])} "
                             f"frames, but num_steps={self.num_steps} needs at least {self.num_steps + 1}: crop clips "
                             f"to at least {self.min_samples} samples or lower num_steps")
        z = self.encoder(audio)  # (B, T', C)
        c = self.context(z)  # (B, T', H)
        b, t, channels = z.shape
        predictions = self.predictor(c).view(b, t, self.num_steps, channels)  # (B, T', K, C)
        return {"predictions": predictions, "z": z, **({} if mask is None else {"mask": mask})}

    def objective(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """InfoNCE over the frames of ``features`` (one micro-batch's or many's): every frame of
        every clip is a candidate."""
        loss, accuracy = self.criterion(features["predictions"], features["z"], features.get("mask"))
        return {"loss": loss, "cpc_acc": accuracy.mean(), "cpc_acc_per_step": accuracy}

    def encode_audio(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-frame context features c for evaluation. (B, T) audio -> (B, T', context_dim)."""
        audio, _ = self._audio_and_mask(batch)
        return self.context(self.encoder(audio))

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Context features mean-pooled over each clip's real frames. (B, T) audio -> (B, context_dim)."""
        audio, mask = self._audio_and_mask(batch)
        return masked_mean(self.context(self.encoder(audio)), mask)  # (B, T', H) -> (B, H)

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """CPC has no state outside the optimizer."""

    def _audio_and_mask(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The (B, T) waveform and, if batch["lengths"] is given, the (B, T') mask of real frames."""
        if "audio" not in batch:
            raise ValueError(f"CPC needs a batch['audio'] waveform of shape (B, T); got keys {sorted(batch)}")
        audio = batch["audio"]
        if audio.dim() == 3 and audio.shape[1] == 1:
            audio = audio[:, 0]  # (B, T)
        if audio.dim() != 2 or not audio.is_floating_point():
            raise ValueError(f"batch['audio'] must be a float (B, T) or (B, 1, T) mono waveform, "
                             f"got shape {tuple(audio.shape)} and dtype {audio.dtype}")
        lengths = batch.get("lengths")
        if lengths is None:
            return audio, None
        if lengths.shape != (audio.shape[0],) or lengths.is_floating_point():
            raise ValueError(f"batch['lengths'] must be (B,) = ({audio.shape[0]},) integer sample counts, "
                             f"got shape {tuple(lengths.shape)} and dtype {lengths.dtype}")
        if bool((lengths < 1).any()) or bool((lengths > audio.shape[1]).any()):
            raise ValueError(f"batch['lengths'] must lie in [1, {audio.shape[1]}] (the padded length), "
                             f"got {lengths.tolist()}")
        frames = self.encoder.output_length(audio.shape[1])
        real = self.encoder.output_length(lengths.to(audio.device))  # (B,) frames fully inside each clip
        return audio, torch.arange(frames, device=audio.device) < real[:, None]  # (B, T')
