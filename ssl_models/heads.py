"""Heads that map encoder features to the space where the objective is computed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RELU = partial(nn.ReLU, inplace=True)


class ProjectionHead(nn.Module):
    """SimCLR's non-linear projector (Chen et al. 2020): (Linear-BN-ReLU) x (num_layers - 1),
    then a Linear.

    The contrastive loss is computed on the projector's output so that the encoder features
    below it keep information the loss would otherwise discard (SimCLR, section 4.2).

    The same MLP is BYOL's projector and predictor (Grill et al. 2020: 2 layers, hidden 4096,
    output 256), and Barlow Twins' projector and VICReg's expander (3 layers of 8192, last
    Linear without bias: their losses standardise or centre each output dimension over the
    batch, which cancels a bias anyway).

    DINO's head starts with the same MLP, with GELU and BatchNorm optional.

    Args:
        in_dim: encoder feature dimension.
        hidden_dim: width of the hidden layers.
        out_dim: dimension of the projected embedding.
        num_layers: number of Linear layers (1 is a linear projector).
        last_bias: give the last Linear a bias.
        batchnorm: BatchNorm1d after each hidden Linear (which then has no bias: the BatchNorm
            has its own shift); without it the hidden Linears have a bias.
        activation: makes the non-linearity (ReLU; DINO's: ``nn.GELU``).

    Shape:
        - x: (B, in_dim)
        - output: (B, out_dim)
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bias: bool = True,
                 batchnorm: bool = True, activation: Callable[[], nn.Module] = _RELU):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim, bias=not batchnorm),
                       *([nn.BatchNorm1d(hidden_dim)] if batchnorm else []), activation()]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim, bias=last_bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # (B, out_dim)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, section 3.1 and appendix): an MLP of
    ``num_layers`` Linear layers (a ``ProjectionHead`` with GELU, BatchNorm only with ``batchnorm``)
    down to a ``bottleneck_dim`` embedding, L2-normalised, then a weight-normalised Linear without
    bias onto ``out_dim`` prototypes whose norms are fixed at 1 (``norm_last_layer``: the paper's
    code freezes ``weight_g``), so each output is a cosine to a prototype.

    Args:
        in_dim: encoder feature dimension.
        hidden_dim: width of the hidden layers (paper: 2048).
        bottleneck_dim: dimension of the normalised embedding (paper: 256).
        out_dim: K, the number of prototypes (paper: 65536).
        num_layers: Linear layers of the MLP (paper: 3).
        batchnorm: BatchNorm1d after each hidden Linear (the official code's ``use_bn_in_head``,
            off for ViTs): it standardises the features over the batch, so images whose encoder
            features share one direction (a small ResNet's early on) still differ at the head.

    Shape:
        - x: (B, in_dim)
        - output: (B, out_dim), each row a cosine to each prototype (in [-1, 1]).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 65536,
                 num_layers: int = 3, batchnorm: bool = False):
        super().__init__()
        self.mlp = ProjectionHead(in_dim, hidden_dim, bottleneck_dim, num_layers, batchnorm=batchnorm,
                                  activation=nn.GELU)
        for m in self.mlp.modules():  # the paper's code: truncated normal, std 0.02, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norms = self.last_layer.parametrizations.weight.original0  # weight_g, (out_dim, 1)
        with torch.no_grad():
            norms.fill_(1.0)
        norms.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck_dim), unit rows
        return self.last_layer(z)  # (B, out_dim)
