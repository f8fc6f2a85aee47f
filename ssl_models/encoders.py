"""Image encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock


class ResNetSmall(nn.Module):
    """A small ResNet for ~32x32 images, built from torchvision's ``BasicBlock`` (He et al.
    2016, "Deep Residual Learning for Image Recognition").

    CIFAR-style stem: one 3x3 convolution at stride 1 and no max-pool, because the ImageNet
    stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 8x8 before the first block.
    Each stage after the first halves the resolution; global average pooling gives one vector
    per image.

    Args:
        in_channels: image channels (1 for grayscale digits).
        widths: channels of each stage; the output dimension is ``widths[-1]``.
        blocks_per_stage: ``BasicBlock``s per stage.

    Shape:
        - x: (B, in_channels, H, W)
        - output: (B, widths[-1]), also available as ``feature_dim``.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 1):
        super().__init__()
        widths = tuple(int(w) for w in widths)  # configs arrive as YAML lists
        if not widths or blocks_per_stage < 1:
            raise ValueError(f"need at least one stage and one block per stage, got widths={widths}, "
                             f"blocks_per_stage={blocks_per_stage}")
        self.feature_dim = widths[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, in_width = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(self._stage(in_width, width, stride, blocks_per_stage))
            in_width = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._init_weights()

    @staticmethod
    def _stage(in_width: int, width: int, stride: int, blocks: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_width != width:
            # 1x1 projection so the residual matches the block's output shape.
            downsample = nn.Sequential(
                nn.Conv2d(in_width, width, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width),
            )
        layers = [BasicBlock(in_width, width, stride=stride, downsample=downsample)]
        layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # Same initialisation as torchvision's ResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, widths[0], H, W)
        x = self.stages(x)  # (B, widths[-1], H / 2^(S-1), W / 2^(S-1))
        return torch.flatten(self.pool(x), 1)  # (B, widths[-1])
