"""ResNet-18 whose 3x3 convs are blocks (the setting of the ACNet and DBB papers)."""

from __future__ import annotations

from torch import Tensor, nn

from repnet.models.blocks import BlockChoice, BlockFactory, block_factory, conv_bn


class BasicBlock(nn.Module):
    """``relu(block₂(block₁(x)) + shortcut(x))``, the second block without activation."""

    def __init__(self, make: BlockFactory, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.first = make(in_channels, out_channels, stride=stride)
        self.second = make(out_channels, out_channels, act=None)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv_bn(in_channels, out_channels, stride) if needs_projection else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        residual = self.shortcut(x) if self.shortcut is not None else x
        return self.relu(self.second(self.first(x)) + residual)


class ResNet18(nn.Module):
    """ResNet-18; ``stem="imagenet"`` is 7x7/2 + max-pool, ``stem="small"`` a 3x3/1 block."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        block: BlockChoice = "dbb",
        stem: str = "imagenet",
    ):
        super().__init__()
        make = block_factory(block)
        if stem == "imagenet":
            self.stem = nn.Sequential(
                make(in_channels, 64, kernel_size=7, stride=2), nn.MaxPool2d(3, 2, 1)
            )
        elif stem == "small":
            self.stem = make(in_channels, 64)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        layers, channels = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [
                BasicBlock(make, channels, width, stride),
                BasicBlock(make, width, width, 1),
            ]
            channels = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.layers(self.stem(x))).flatten(1))
