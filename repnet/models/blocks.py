"""Block factories: how a backbone asks for a 'kxk conv' without knowing the branch set."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from torch import nn

from repnet.block import RepBlock, make_geometry
from repnet.dynamic import DynamicConv2d

BlockFactory = Callable[..., nn.Module]
BlockChoice = str | Sequence[str] | Mapping | BlockFactory
KINDS: dict[str, type[nn.Module]] = {"rep": RepBlock, "dynamic": DynamicConv2d}


def block_factory(block: BlockChoice, deploy: bool = False) -> BlockFactory:
    """A callable ``(in, out, kernel_size=3, stride=1, groups=1, act=nn.ReLU) -> module``.

    ``block`` is a preset name (``"dbb"``), a list of branch names, a mapping of
    ``RepBlock`` options (``{"branches": "acb", ...}``) or a factory already.
    ``deploy=True`` builds the fused form directly. Across a network a list, like a
    preset, keeps its ``identity`` only in the blocks whose shape allows one.
    """
    if callable(block):
        return block
    options = dict(block) if isinstance(block, Mapping) else {"branches": block}
    options["deploy"] = deploy
    kind = options.pop("kind", "rep")
    if kind not in KINDS:
        raise ValueError(f"block kind must be one of {', '.join(KINDS)}, got {kind!r}")
    branches = options.get("branches")
    if isinstance(branches, Sequence) and not isinstance(branches, str):
        options["branches"] = list(branches)
        if "identity" in branches:
            return partial(identity_where_possible, KINDS[kind], **options)
    return partial(KINDS[kind], **options)


def identity_where_possible(block: type[nn.Module], *args, **options) -> nn.Module:
    """``block(*args, **options)`` without the listed ``identity`` branch where it cannot
    exist (in ≠ out channels, stride ≠ 1, an even kernel)."""
    bound = inspect.signature(block).bind(*args, **options)
    bound.apply_defaults()
    arguments = bound.arguments
    geometry = make_geometry(
        *(arguments[name] for name in ("in_channels", "out_channels", "kernel_size")),
        *(arguments[name] for name in ("stride", "padding", "dilation", "groups")),
    )
    others = [name for name in arguments["branches"] if name != "identity"]
    if geometry.identity_problem() is not None and others:  # identity alone: the block says why
        arguments["branches"] = others
    return block(*bound.args, **bound.kwargs)


def conv_bn(in_channels: int, out_channels: int, stride: int = 1, deploy: bool = False):
    """A 1x1 conv and its BN, for shortcuts; ``reparameterize`` folds the BN, and
    ``deploy=True`` builds that folded form (conv with bias, BN an identity)."""
    conv = nn.Conv2d(in_channels, out_channels, 1, stride, bias=deploy)
    return nn.Sequential(conv, nn.Identity() if deploy else nn.BatchNorm2d(out_channels))
