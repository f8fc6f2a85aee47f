"""Image encoders and their registry: ``build_image_encoder(name, in_channels, **kwargs)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

# torchvision is imported where its ResNets are built: importing it costs ~1.5 s of CPU (it pulls
# in torch._dynamo), paid by every Ray Train worker, controller and CLI process that imports this
# module, whatever encoder the run uses.


class BasicBlock(nn.Module):
    """The ResNet basic block (He et al. 2016): two 3x3 convolutions with BatchNorm and a residual
    connection. The same layers, parameter names and forward as torchvision's
    ``torchvision.models.resnet.BasicBlock``, so state dicts are interchangeable.

    Shape:
        - x: (B, in_width, H, W)
        - output: (B, width, H / stride, W / stride)
    """

    expansion = 1

    def __init__(self, in_width: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetSmall(nn.Module):
    """A small ResNet for ~32x32 images, built from ResNet ``BasicBlock``s (He et al. 2016,
    "Deep Residual Learning for Image Recognition").

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

    def stage_features(self, x: Tensor) -> dict[str, Tensor]:
        """Globally average-pooled output of the stem and of each stage, in depth order (the
        RotNet table's per-layer features); the last one is ``forward``'s output.
        x (B, in_channels, H, W) -> {"stem": (B, widths[0]), "stage1": (B, widths[0]), ...}."""
        x = self.stem(x)
        out = {"stem": torch.flatten(self.pool(x), 1)}
        for i, stage in enumerate(self.stages, start=1):
            x = stage(x)
            out[f"stage{i}"] = torch.flatten(self.pool(x), 1)
        return out


_TORCHVISION_RESNETS = ("resnet18", "resnet50")


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet (He et al. 2016) as a feature extractor: randomly initialised
    (``weights=None``; self-supervised pretraining starts from scratch), ``fc`` replaced by
    ``Identity`` so the output is the globally pooled feature vector.

    ``small_stem`` swaps the ImageNet stem (7x7 stride-2 convolution + 3x3 stride-2 max-pool,
    a 4x reduction meant for 224-px images) for a 3x3 stride-1 convolution without max-pool,
    as SimCLR does on CIFAR-10: a 32x32 image then reaches the last stage at 4x4, not 1x1.

    Args:
        arch: ``"resnet18"`` or ``"resnet50"``.
        in_channels: image channels; anything but 3 replaces the first convolution.
        small_stem: use the 3x3 stride-1 stem without max-pool, for ~32-px images.

    Shape:
        - x: (B, in_channels, H, W)
        - output: (B, feature_dim), 512 for ResNet-18 and 2048 for ResNet-50.
    """

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, small_stem: bool = False):
        super().__init__()
        if arch not in _TORCHVISION_RESNETS:
            raise ValueError(f"unknown torchvision ResNet {arch!r}; known: {', '.join(_TORCHVISION_RESNETS)}")
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        width = net.conv1.out_channels  # 64
        stem = None
        if small_stem:
            stem = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            stem = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        if stem is not None:
            # torchvision's initialisation, like every other convolution of the network.
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
            net.conv1 = stem
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.resnet = net

    def forward(self, x: Tensor) -> Tensor:
        return self.resnet(x)  # (B, feature_dim)

    def stage_features(self, x: Tensor) -> dict[str, Tensor]:
        """Globally average-pooled output of the stem (conv1 ... maxpool) and of layer1..layer4, in
        depth order; the last one is ``forward``'s output. x (B, C, H, W) -> {"stem": (B, 64), ...}."""
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        out = {"stem": torch.flatten(r.avgpool(x), 1)}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(r, name)(x)
            out[name] = torch.flatten(r.avgpool(x), 1)
        return out


def resnet18(in_channels: int = 3, small_stem: bool = False) -> TorchvisionResNet:
    """torchvision ResNet-18 feature extractor, ``feature_dim`` 512 (see ``TorchvisionResNet``)."""
    return TorchvisionResNet("resnet18", in_channels, small_stem)


def resnet50(in_channels: int = 3, small_stem: bool = False) -> TorchvisionResNet:
    """torchvision ResNet-50 feature extractor, ``feature_dim`` 2048 (see ``TorchvisionResNet``)."""
    return TorchvisionResNet("resnet50", in_channels, small_stem)


IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "resnet_small": ResNetSmall,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def build_image_encoder(name: str, in_channels: int, *, strict: bool = True, **kwargs) -> nn.Module:
    """Build the image encoder registered as ``name``; it exposes ``feature_dim``,
    ``stage_features(x)`` (pooled features of each stage, for per-stage probes) and
    ``build_args``: ``{"name", "in_channels", **options}``, the arguments that rebuild it (an
    export writes them, so it needs no knowledge of which method or encoder it holds).

    Args:
        name: a key of ``IMAGE_ENCODERS``.
        in_channels: image channels.
        strict: reject keyword arguments that encoder does not take. With ``strict=False`` they
            are dropped instead: the two-view methods expose every encoder's options as flat
            keyword arguments (``widths`` for ``resnet_small``, ``small_stem`` for the
            torchvision ResNets) and pass them all.
        **kwargs: the encoder's own options.
    """
    if name not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image encoder {name!r}; known image encoders: {', '.join(IMAGE_ENCODERS)}")
    factory = IMAGE_ENCODERS[name]
    accepted = set(inspect.signature(factory).parameters) - {"in_channels"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown and strict:
        raise ValueError(f"image encoder {name!r} takes {sorted(accepted)}, not {unknown}")
    options = {k: v for k, v in kwargs.items() if k in accepted}
    encoder = factory(in_channels=in_channels, **options)
    encoder.build_args = {"name": name, "in_channels": in_channels, **options}
    return encoder


def stack_two_views(batch: dict[str, Tensor], in_channels: int) -> Tensor:
    """Check a two-view batch and stack its views into one tensor.

    The two-view methods run their encoder once on both views, so BatchNorm normalises them
    with the same statistics; the first ``B`` rows of every output are view 1.

    Shape:
        - batch["view1"], batch["view2"]: (B, in_channels, H, W)
        - output: (2B, in_channels, H, W)
    """
    view1, view2 = image_input(batch, "view1", in_channels), image_input(batch, "view2", in_channels)
    if view1.shape != view2.shape:
        raise ValueError(f"batch['view1'] and batch['view2'] must have the same shape, got "
                         f"{tuple(view1.shape)} and {tuple(view2.shape)}; crop both views to one size")
    return torch.cat([view1, view2])  # (2B, C, H, W)


def image_input(batch: dict[str, Tensor], key: str, in_channels: int) -> Tensor:
    """``batch[key]`` after checking that it is a (B, in_channels, H, W) image tensor."""
    if key not in batch:
        raise ValueError(f"batch has no {key!r} images (keys: {sorted(batch)}); use the matching data pipeline")
    x = batch[key]
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"batch[{key!r}] must be (B, {in_channels}, H, W), got {tuple(x.shape)}; "
                         f"set the method's in_channels to the images' channel count")
    return x
