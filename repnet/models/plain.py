"""Plain stacks of blocks (RepVGG and small nets): stages of blocks, then pool and classify.

Every size is a row of a table, not a function of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from repnet.models.blocks import BlockChoice, block_factory


@dataclass(frozen=True)
class PlainSpec:
    """Blocks per stage, channels per stage and the stride of each stage's first block.

    ``groups`` > 1 makes every other block grouped: those at odd positions in their stage
    (RepVGG's ``g2``/``g4`` sizes; the official code counts layers net-wide from the stem,
    grouping 2, 4, 6, …, which is the same blocks at its even stage depths). ``se`` puts a
    squeeze-excite between each block's sum and its activation (RepVGG-D2se).
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    groups: int = 1
    se: bool = False

    def groups_of(self, position: int) -> int:
        """Groups of the block at ``position`` in its stage."""
        return self.groups if position % 2 == 1 else 1


def repvgg_spec(
    depths: tuple[int, ...], a: float, b: float, groups: int = 1, se: bool = False
) -> PlainSpec:
    """RepVGG: a one-block stem, four stages of widths ``64a, 128a, 256a, 512b``, all stride 2."""
    widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    return PlainSpec((1, *depths), widths, (2, 2, 2, 2, 2), groups, se)


REPVGG_A, REPVGG_B, REPVGG_D = (2, 4, 14, 1), (4, 6, 16, 1), (8, 14, 24, 1)
SPECS: dict[str, PlainSpec] = {
    "repvgg_a0": repvgg_spec(REPVGG_A, 0.75, 2.5),
    "repvgg_a1": repvgg_spec(REPVGG_A, 1.0, 2.5),
    "repvgg_a2": repvgg_spec(REPVGG_A, 1.5, 2.75),
    "repvgg_b0": repvgg_spec(REPVGG_B, 1.0, 2.5),
    "repvgg_b1": repvgg_spec(REPVGG_B, 2.0, 4.0),
    "repvgg_b1g2": repvgg_spec(REPVGG_B, 2.0, 4.0, groups=2),
    "repvgg_b1g4": repvgg_spec(REPVGG_B, 2.0, 4.0, groups=4),
    "repvgg_b2": repvgg_spec(REPVGG_B, 2.5, 5.0),
    "repvgg_b2g2": repvgg_spec(REPVGG_B, 2.5, 5.0, groups=2),
    "repvgg_b2g4": repvgg_spec(REPVGG_B, 2.5, 5.0, groups=4),
    "repvgg_b3": repvgg_spec(REPVGG_B, 3.0, 5.0),
    "repvgg_b3g2": repvgg_spec(REPVGG_B, 3.0, 5.0, groups=2),
    "repvgg_b3g4": repvgg_spec(REPVGG_B, 3.0, 5.0, groups=4),
    "repvgg_d2se": repvgg_spec(REPVGG_D, 2.5, 5.0, se=True),
    # CIFAR-size (32x32): stride 1 until the last two stages.
    "cifar": PlainSpec((1, 2, 3, 2), (32, 64, 128, 256), (1, 1, 2, 2)),
    # Digits-size (8x8): three small stages.
    "tiny": PlainSpec((1, 2, 2), (16, 32, 64), (1, 1, 2)),
}


class SqueezeExcite(nn.Module):
    """Channel gates from the global mean: ``y = x·σ(up(relu(down(mean_hw(x)))))``."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.up(self.down(x.mean((2, 3), keepdim=True)).relu()).sigmoid()
        return x * gate


def se_then_relu(channels: int) -> nn.Sequential:
    """RepVGG-D2se's activation: a squeeze-excite of ``channels/16`` hidden units, then ReLU."""
    return nn.Sequential(SqueezeExcite(channels, channels // 16), nn.ReLU())


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
            for position in range(depth):
                options = {"stride": stride if position == 0 else 1}
                if spec.groups_of(position) > 1:
                    options["groups"] = spec.groups_of(position)
                if spec.se:
                    options["act"] = partial(se_then_relu, width)
                blocks.append(make(channels, width, **options))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(x)).flatten(1))
