"""Audio encoders: a strided convolutional feature encoder on raw waveforms and causal context
networks (GRU or transformer) on top of its frames, as in CPC and wav2vec."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each frame of a (B, C, T) feature map.

    Normalising every frame on its own keeps frame ``t`` a function of its receptive field only:
    unlike BatchNorm it does not depend on the other utterances (so one rank and the whole batch
    agree), and unlike wav2vec's GroupNorm(1, C) it does not mix time steps (so the encoder stays
    causal and padded samples cannot leak into valid frames).

    Shape:
        - x: (B, C, T)
        - output: (B, C, T)
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)  # (B, C, T)


class ConvFeatureEncoder(nn.Module):
    """Strided 1-D convolutions from raw waveform to feature frames (Schneider et al. 2019,
    "wav2vec: Unsupervised Pre-training for Speech Recognition", section 2.1).

    Each layer is an unpadded Conv1d, a per-frame LayerNorm over channels and a GELU. The
    default kernels (10, 8, 4, 4, 4) and strides (5, 4, 2, 2, 2) are wav2vec's: a total stride
    of 160 samples (10 ms frames at 16 kHz) and a receptive field of 465 samples (about 30 ms).
    Frame ``t`` sees samples ``[t * total_stride, t * total_stride + receptive_field)`` and
    nothing else.

    Args:
        channels: channels of every convolution; the frame dimension ``feature_dim``.
        kernels: kernel size of each layer.
        strides: stride of each layer (same length as ``kernels``).
        sample_rate: sampling rate of the input in Hz; only used for ``frame_rate``.

    Shape:
        - waveform: (B, T) or (B, 1, T) float
        - output: (B, T', channels) with ``T' = output_length(T)``, about ``T / total_stride``.
    """

    def __init__(self, channels: int = 128, kernels: Sequence[int] = (10, 8, 4, 4, 4),
                 strides: Sequence[int] = (5, 4, 2, 2, 2), sample_rate: int = 16_000):
        super().__init__()
        self.kernels = tuple(int(k) for k in kernels)  # configs arrive as YAML lists
        self.strides = tuple(int(s) for s in strides)
        if not self.kernels or len(self.kernels) != len(self.strides):
            raise ValueError(f"kernels and strides must be non-empty and of equal length, "
                             f"got kernels={self.kernels}, strides={self.strides}")
        if min(self.kernels + self.strides) < 1 or channels < 1 or sample_rate < 1:
            raise ValueError(f"kernels, strides, channels and sample_rate must be positive, got kernels="
                             f"{self.kernels}, strides={self.strides}, channels={channels}, sample_rate={sample_rate}")
        self.feature_dim = channels
        self.sample_rate = sample_rate
        layers: list[nn.Module] = []
        in_channels = 1
        for kernel, stride in zip(self.kernels, self.strides, strict=True):
            # No bias: the LayerNorm right after it has its own shift.
            layers += [nn.Conv1d(in_channels, channels, kernel, stride, bias=False), ChannelLayerNorm(channels),
                       nn.GELU()]
            in_channels = channels
        self.layers = nn.Sequential(*layers)

    @property
    def total_stride(self) -> int:
        """Samples between consecutive frames (160 by default)."""
        return math.prod(self.strides)

    @property
    def receptive_field(self) -> int:
        """Samples that one frame sees (465 by default)."""
        field, jump = 1, 1
        for kernel, stride in zip(self.kernels, self.strides, strict=True):
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @property
    def frame_rate(self) -> float:
        """Frames per second (100.0 by default: 10 ms frames)."""
        return self.sample_rate / self.total_stride

    def output_length(self, num_samples: int | Tensor) -> int | Tensor:
        """Frames produced from ``num_samples`` samples (int, or a tensor of per-utterance lengths).

        Exactly the frames whose receptive field lies inside the first ``num_samples`` samples,
        so for a right-padded utterance it is its number of valid frames. Never negative.
        """
        length = num_samples
        for kernel, stride in zip(self.kernels, self.strides, strict=True):
            length = (length - kernel) // stride + 1
        return length.clamp(min=0) if isinstance(length, Tensor) else max(length, 0)

    def forward(self, waveform: Tensor) -> Tensor:
        if waveform.dim() == 3 and waveform.shape[1] == 1:
            waveform = waveform[:, 0]  # (B, T)
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be (B, T) or (B, 1, T) (mono), got shape {tuple(waveform.shape)}")
        if waveform.shape[1] < self.receptive_field:
            raise ValueError(f"waveform of {waveform.shape[1]} samples is shorter than one frame's receptive "
                             f"field ({self.receptive_field} samples); crop longer clips")
        x = self.layers(waveform[:, None])  # (B, C, T')
        return x.transpose(1, 2)  # (B, T', C)


class GRUContext(nn.Module):
    """A GRU over feature frames: the autoregressive context network of CPC (van den Oord et al.
    2018, "Representation Learning with Contrastive Predictive Coding", section 2.2).

    Causal by construction: ``c_t`` summarises ``z_1..z_t``.

    Shape:
        - z: (B, T, in_dim)
        - output: (B, T, dim)
    """

    def __init__(self, in_dim: int, dim: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.gru = nn.GRU(in_dim, dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, z: Tensor) -> Tensor:
        c, _ = self.gru(z)
        return c  # (B, T, dim)


class CausalTransformerContext(nn.Module):
    """A causal transformer over feature frames: each frame attends to itself and earlier frames.

    Built on ``nn.TransformerEncoderLayer`` (pre-norm, GELU), whose attention runs through
    ``scaled_dot_product_attention``. Positions come from a causal depthwise convolution added
    to the input, a left-only version of wav2vec 2.0's convolutional relative positions, so any
    sequence length works.

    Args:
        in_dim: frame dimension of the feature encoder.
        dim: model width; the output dimension.
        num_layers: transformer layers.
        num_heads: attention heads (``dim`` must be divisible by it).
        dropout: dropout inside the layers.
        pos_kernel: frames seen by the positional convolution.

    Shape:
        - z: (B, T, in_dim)
        - output: (B, T, dim); output ``t`` depends on ``z[:, :t + 1]`` only.
    """

    def __init__(self, in_dim: int, dim: int, num_layers: int = 2, num_heads: int = 4, dropout: float = 0.0,
                 pos_kernel: int = 16):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"context_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.proj = nn.Linear(in_dim, dim)
        # padding=k-1 pads both ends; keeping the first T outputs makes output t see inputs t-k+1..t.
        self.pos_conv = nn.Conv1d(dim, dim, pos_kernel, padding=pos_kernel - 1, groups=dim)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, z: Tensor) -> Tensor:
        x = self.proj(z)  # (B, T, dim)
        t = x.shape[1]
        x = x + F.gelu(self.pos_conv(x.transpose(1, 2))[..., :t].transpose(1, 2))  # (B, T, dim)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # (T, T), True = may not attend
        return self.layers(x, mask=future, is_causal=True)  # (B, T, dim)


# name -> constructor(in_dim, dim, num_layers, num_heads, dropout); the GRU has no heads.
CONTEXTS = {
    "gru": lambda in_dim, dim, num_layers, num_heads, dropout: GRUContext(in_dim, dim, num_layers, dropout),
    "transformer": CausalTransformerContext,
}


def build_context(kind: str, in_dim: int, dim: int, num_layers: int = 1, num_heads: int = 4,
                  dropout: float = 0.0) -> nn.Module:
    """The context network named ``kind`` ("gru" or "transformer"), (B, T, in_dim) -> (B, T, dim)."""
    if kind not in CONTEXTS:
        raise ValueError(f"unknown context {kind!r}; choose one of {', '.join(CONTEXTS)}")
    if num_layers < 1 or dim < 1:
        raise ValueError(f"context needs num_layers >= 1 and dim >= 1, got num_layers={num_layers}, dim={dim}")
    return CONTEXTS[kind](in_dim, dim, num_layers, num_heads, dropout)
