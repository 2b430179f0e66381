"""Plain stacks of blocks (RepVGG and small nets): stages of blocks, then pool and classify.

Every size is a row of a table, not a function of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from repnet.models.blocks import BlockChoice, block_factory


@dataclass(frozen=True)
class PlainSpec:
    """Blocks per stage, channels per stage and the stride of each stage's first block."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    strides: tuple[int, ...]


def repvgg_spec(depths: tuple[int, ...], a: float, b: float) -> PlainSpec:
    """RepVGG: a one-block stem, four stages of widths ``64a, 128a, 256a, 512b``, all stride 2."""
    widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    return PlainSpec((1, *depths), widths, (2, 2, 2, 2, 2))


REPVGG_A, REPVGG_B = (2, 4, 14, 1), (4, 6, 16, 1)
SPECS: dict[str, PlainSpec] = {
    "repvgg_a0": repvgg_spec(REPVGG_A, 0.75, 2.5),
    "repvgg_a1": repvgg_spec(REPVGG_A, 1.0, 2.5),
    "repvgg_a2": repvgg_spec(REPVGG_A, 1.5, 2.75),
    "repvgg_b0": repvgg_spec(REPVGG_B, 1.0, 2.5),
    "repvgg_b1": repvgg_spec(REPVGG_B, 2.0, 4.0),
    "repvgg_b2": repvgg_spec(REPVGG_B, 2.5, 5.0),
    "repvgg_b3": repvgg_spec(REPVGG_B, 3.0, 5.0),
    # CIFAR-size (32x32): stride 1 until the last two stages.
    "cifar": PlainSpec((1, 2, 3, 2), (32, 64, 128, 256), (1, 1, 2, 2)),
    # Digits-size (8x8): three small stages.
    "tiny": PlainSpec((1, 2, 2), (16, 32, 64), (1, 1, 2)),
}


class PlainNet(nn.Module):
    """``stages of blocks → global average pool → linear``; the first stage is the stem."""

    def __init__(
        self,
        spec: PlainSpec,
        num_classes: int = 1000,
        in_channels: int = 3,
        block: BlockChoice = "repvgg",
        strides: Sequence[int] | None = None,
    ):
        super().__init__()
        make = block_factory(block)
        strides = tuple(strides) if strides is not None else spec.strides
        if len(strides) != len(spec.depths):
            raise ValueError(f"strides needs {len(spec.depths)} entries, got {list(strides)}")
        stages, channels = [], in_channels
        for depth, width, stride in zip(spec.depths, spec.widths, strides):
            blocks = []
            for index in range(depth):
                blocks.append(make(channels, width, stride=stride if index == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(x)).flatten(1))
