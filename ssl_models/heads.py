"""Heads that map encoder features to the space where the objective is computed."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """SimCLR's non-linear projector (Chen et al. 2020): (Linear-BN-ReLU) x (num_layers - 1),
    then a Linear.

    The contrastive loss is computed on the projector's output so that the encoder features
    below it keep information the loss would otherwise discard (SimCLR, section 4.2).

    The same MLP is BYOL's projector and predictor (Grill et al. 2020: 2 layers, hidden 4096,
    output 256), and Barlow Twins' projector and VICReg's expander (3 layers of 8192, last
    Linear without bias: their losses standardise or centre each output dimension over the
    batch, which cancels a bias anyway).

    Args:
        in_dim: encoder feature dimension.
        hidden_dim: width of the hidden layers.
        out_dim: dimension of the projected embedding.
        num_layers: number of Linear layers (1 is a linear projector).
        last_bias: give the last Linear a bias.

    Shape:
        - x: (B, in_dim)
        - output: (B, out_dim)
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bias: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            # No bias: the BatchNorm right after it has its own shift.
            layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim, bias=last_bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # (B, out_dim)
