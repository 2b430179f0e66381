"""Block factories: how a backbone asks for a 'kxk conv' without knowing the branch set."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

from torch import nn

from repnet.block import RepBlock
from repnet.dynamic import DynamicConv2d

BlockFactory = Callable[..., nn.Module]
BlockChoice = str | Sequence[str] | Mapping | BlockFactory
KINDS: dict[str, type[nn.Module]] = {"rep": RepBlock, "dynamic": DynamicConv2d}


def block_factory(block: BlockChoice) -> BlockFactory:
    """A callable ``(in, out, kernel_size=3, stride=1, groups=1, act=nn.ReLU) -> module``.

    ``block`` is a preset name (``"dbb"``), a list of branch names, a mapping of block
    options (``{"branches": "acb", "online": True}``, ``{"kind": "dynamic", ...}``) or a
    factory already. Across a network a list, like a preset, keeps its ``identity`` only
    in the blocks whose shape allows one.
    """
    if callable(block):
        return block
    options = dict(block) if isinstance(block, Mapping) else {"branches": block}
    kind = options.pop("kind", "rep")
    if kind not in KINDS:
        raise ValueError(f"block kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(options.get("branches", ""), str):
        options["branches"] = list(options["branches"])
    return partial(KINDS[kind], strict=False, **options)


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """A 1x1 conv and its BN, for shortcuts; ``reparameterize`` folds the BN into the conv."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )
