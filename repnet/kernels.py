"""Kernel algebra: every re-parameterizable piece is one convolution.

A :class:`Conv` is a value — ``weight [O, C/g, kh, kw]``, ``bias [O]`` and its
geometry — and every function here maps such values to new ones. Nothing holds
state and everything is differentiable, so the same functions build the deploy
kernel and (in online mode) the training kernel on every forward.

Conventions: ``F.conv2d`` is a cross-correlation,
``y[o, i, j] = b[o] + Σ_{c,u,v} W[o, c, u, v] · x[c, i·s - p + u·d, j·s - p + v·d]``
with ``x`` zero outside the image. A negative padding crops the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pair = tuple[int, int]


def pair(value: int | tuple[int, int] | list[int]) -> Pair:
    """``3 -> (3, 3)``; a pair stays a pair."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def apply_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> Tensor:
    """``F.conv2d`` that also takes a negative padding (it crops the input)."""
    if min(padding) < 0:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        padding = (0, 0)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


@dataclass(frozen=True)
class Conv:
    """A convolution as a value: ``x ↦ conv2d(x, weight, bias, stride, padding, …)``."""

    weight: Tensor
    bias: Tensor
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def reach(self) -> Pair:
        """``2p - d(k-1)`` per axis: convs with equal stride and reach give equal output sizes."""
        return tuple(  # type: ignore[return-value]
            2 * p - d * (k - 1) for p, d, k in zip(self.padding, self.dilation, self.kernel_size)
        )

    def __call__(self, x: Tensor) -> Tensor:
        return apply_conv(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def conv2d(x: Tensor, kernel: Tensor, padding: Pair = (0, 0), groups: int = 1) -> Tensor:
    """True convolution ``(x ∗ k)[t] = Σ_u x[t - u]·k[u]``: ``F.conv2d`` with ``k`` flipped."""
    return F.conv2d(x, kernel.flip(-2, -1), padding=padding, groups=groups)


def affine(conv: Conv, scale: Tensor, shift: Tensor) -> Conv:
    """Per-output-channel affine map after a conv: ``W' = s·W``, ``b' = s·b + t``."""
    return replace(
        conv, weight=conv.weight * scale.reshape(-1, 1, 1, 1), bias=conv.bias * scale + shift
    )


def bn_affine(
    mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = s·x + t``: ``s = γ/σ``, ``t = β - μ·γ/σ``, ``σ = √(var + ε)``
    (``γ = 1``, ``β = 0`` without affine parameters)."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = gamma * scale
    shift = -mean * scale
    return scale, shift if beta is None else beta + shift


def fuse_bn(
    conv: Conv, mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> Conv:
    """BN(conv(x)) as one conv: ``W' = W·γ/σ``, ``b' = β + (b - μ)·γ/σ``, ``σ = √(var + ε)``."""
    return affine(conv, *bn_affine(mean, var, gamma, beta, eps))


def _channel_diagonal(
    channels: int, groups: int, kernel_size: Pair, value: float, like: Tensor | None
) -> Tensor:
    """``[C, C/g, kh, kw]`` weight mapping each channel to itself, every tap equal to ``value``."""
    options = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, *kernel_size, **options)
    weight[torch.arange(channels), torch.arange(channels) % per_group] = value
    return weight


def identity(
    channels: int,
    groups: int = 1,
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    like: Tensor | None = None,
) -> Conv:
    """The identity as a 1x1 conv: ``W[o, o mod C/g] = 1``, ``b = 0``.

    ``dilation`` does nothing to a 1x1, but ``pad_to`` spaces the taps it adds by it.
    """
    weight = _channel_diagonal(channels, groups, (1, 1), 1.0, like)
    return Conv(weight, weight.new_zeros(channels), (1, 1), padding, dilation, groups)


def avgpool(
    channels: int,
    kernel_size: Pair,
    groups: int = 1,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    like: Tensor | None = None,
) -> Conv:
    """Average pooling (zeros counted) as a conv: ``W[o, o mod C/g, u, v] = 1/(kh·kw)``."""
    weight = _channel_diagonal(channels, groups, kernel_size, 1.0 / math.prod(kernel_size), like)
    return Conv(weight, weight.new_zeros(channels), stride, padding, dilation, groups)


def pad_to(conv: Conv, kernel_size: Pair) -> Conv:
    """Centre a kernel in a larger one; padding grows by ``d·(K - k)/2``, the function stays."""
    grow = [big - small for big, small in zip(kernel_size, conv.kernel_size)]
    if any(g < 0 or g % 2 for g in grow):
        raise ValueError(
            f"cannot centre a {conv.kernel_size} kernel in a {kernel_size} one: "
            "sizes must differ by an even, non-negative amount per axis"
        )
    (gh, gw) = (grow[0] // 2, grow[1] // 2)
    if (gh, gw) == (0, 0):
        return conv
    weight = F.pad(conv.weight, (gw, gw, gh, gh))
    padding = (conv.padding[0] + conv.dilation[0] * gh, conv.padding[1] + conv.dilation[1] * gw)
    return replace(conv, weight=weight, padding=padding)


def _aligned(convs: tuple[Conv, ...]) -> list[Conv]:
    """Pad parallel convs to one kernel size; refuse those whose outputs would not line up.

    A size-1 axis has no taps to space, so its dilation is taken from the others.
    """
    spacing = tuple(
        next((c.dilation[axis] for c in convs if c.kernel_size[axis] > 1), convs[0].dilation[axis])
        for axis in (0, 1)
    )
    convs = tuple(
        replace(
            c,
            dilation=tuple(
                d if k > 1 else s for d, s, k in zip(c.dilation, spacing, c.kernel_size)
            ),
        )
        for c in convs
    )
    first = convs[0]
    for conv in convs[1:]:
        for field in ("stride", "dilation", "in_channels", "reach"):
            mine, theirs = getattr(first, field), getattr(conv, field)
            if mine != theirs:
                raise ValueError(
                    f"parallel convs differ in {field} ({mine} vs {theirs}): "
                    "their outputs do not line up, so they cannot be merged"
                )
    size = tuple(max(c.kernel_size[axis] for c in convs) for axis in (0, 1))
    return [pad_to(c, size) for c in convs]  # type: ignore[arg-type]


def add(*convs: Conv) -> Conv:
    """Parallel branches summed: ``Σ_i conv_i(x)`` is one conv with ``W = Σ W_i``, ``b = Σ b_i``."""
    channels = [c.out_channels for c in convs]
    if len(set(channels)) > 1:
        raise ValueError(f"parallel convs to add need equal out_channels, got {channels}")
    aligned = _aligned(convs)
    groups = {c.groups for c in aligned}
    if len(groups) > 1:
        aligned = [dense(c) for c in aligned]
    return replace(
        aligned[0],
        weight=reduce(torch.add, (c.weight for c in aligned)),
        bias=reduce(torch.add, (c.bias for c in aligned)),
    )


def concat(*convs: Conv) -> Conv:
    """Convs of one input stacked along output channels: ``W = [W₁; W₂; …]``, ``b = [b₁; b₂; …]``.

    Grouped convs are made dense first: stacking would otherwise interleave the groups.
    """
    aligned = _aligned(convs)
    if any(c.groups > 1 for c in aligned):
        aligned = [dense(c) for c in aligned]
    return replace(
        aligned[0],
        weight=torch.cat([c.weight for c in aligned]),
        bias=torch.cat([c.bias for c in aligned]),
    )


def dense(conv: Conv) -> Conv:
    """A grouped conv as an ungrouped one with a block-diagonal weight ``[O, C, kh, kw]``."""
    if conv.groups == 1:
        return conv
    g, out_per_group = conv.groups, conv.out_channels // conv.groups
    blocks = conv.weight.reshape(g, out_per_group, *conv.weight.shape[1:])
    rows = [
        torch.cat([blocks[i] if j == i else torch.zeros_like(blocks[i]) for j in range(g)], dim=1)
        for i in range(g)
    ]
    return replace(conv, weight=torch.cat(rows), groups=1)


def dilate(weight: Tensor, factor: Pair) -> Tensor:
    """Insert ``factor - 1`` zeros between taps: a dilation-``f`` kernel as a dilation-1 one."""
    if factor == (1, 1):
        return weight
    kh, kw = weight.shape[-2:]
    out = weight.new_zeros(*weight.shape[:-2], (kh - 1) * factor[0] + 1, (kw - 1) * factor[1] + 1)
    out[..., :: factor[0], :: factor[1]] = weight
    return out


def _tap_spacing(first: Conv, second: Conv) -> tuple[Pair, Pair, Pair]:
    """Composed tap spacing ``c = gcd(d₁, d₂·s₁)`` per axis, and each kernel's step in ``c``s.

    In ``second ∘ first`` the input offsets are ``u·d₁ + v·d₂·s₁``; a size-1 axis has no step.
    """
    spacing, first_step, second_step = [], [], []
    for k1, d1, k2, d2, s1 in zip(
        first.kernel_size, first.dilation, second.kernel_size, second.dilation, first.stride
    ):
        steps = [step for k, step in ((k1, d1), (k2, d2 * s1)) if k > 1]
        c = math.gcd(*steps) if steps else 1
        spacing.append(c)
        first_step.append(d1 // c if k1 > 1 else 1)
        second_step.append(d2 * s1 // c if k2 > 1 else 1)
    return tuple(spacing), tuple(first_step), tuple(second_step)  # type: ignore[return-value]


def compose(first: Conv, second: Conv) -> Conv:
    """``second ∘ first`` as one conv: ``W = W₂ ∗ W₁`` (true convolution), ``b = b₂ + Σ W₂·b₁``.

    Stride ``s₁s₂``, padding ``p₁ + s₁p₂``. Exact when ``second`` reads the *true*
    output of ``first`` on its padding — what ``first`` computes there, not zeros.
    Running ``first`` with padding ``p₁ + s₁p₂`` and ``second`` with padding 0 is
    that, exactly, everywhere. The naive sequence (``second`` zero-padding the
    intermediate map) equals it when ``p₂ = 0``, or when ``first`` pads fully
    (``p₁ ≥ d₁(k₁-1)``, so its output beyond the map is ``b₁``) and ``b₁ = 0``.
    """
    if first.out_channels != second.in_channels:
        raise ValueError(
            f"cannot compose: first gives {first.out_channels} channels, "
            f"second takes {second.in_channels}"
        )
    if first.groups != second.groups:
        first, second = dense(first), dense(second)
    spacing, first_step, second_step = _tap_spacing(first, second)
    w1, w2 = dilate(first.weight, first_step), dilate(second.weight, second_step)
    g = first.groups
    out_channels, mid, in_per_group = second.out_channels, first.out_channels, w1.shape[1]
    # Per group: K[o, c] = Σ_m W₂[o, m] ∗ W₁[m, c], one grouped true convolution with W₂ as input.
    signal = w2.reshape(g, out_channels // g, mid // g, *w2.shape[2:]).transpose(0, 1)
    kernel = w1.reshape(g, mid // g, in_per_group, *w1.shape[2:]).transpose(1, 2)
    taps = w1.shape[2:]
    weight = conv2d(
        signal.reshape(out_channels // g, mid, *w2.shape[2:]),
        kernel.reshape(g * in_per_group, mid // g, *taps),
        padding=(taps[0] - 1, taps[1] - 1),
        groups=g,
    )
    weight = (
        weight.reshape(out_channels // g, g, in_per_group, *weight.shape[2:])
        .transpose(0, 1)
        .reshape(out_channels, in_per_group, *weight.shape[2:])
    )
    carried = torch.einsum(
        "gom,gm->go",
        second.weight.sum((2, 3)).reshape(g, out_channels // g, mid // g),
        first.bias.reshape(g, mid // g),
    ).reshape(out_channels)
    return Conv(
        weight=weight,
        bias=second.bias + carried,
        stride=(first.stride[0] * second.stride[0], first.stride[1] * second.stride[1]),
        padding=(
            first.padding[0] + first.stride[0] * second.padding[0],
            first.padding[1] + first.stride[1] * second.padding[1],
        ),
        dilation=spacing,
        groups=g,
    )


def to_conv2d(conv: Conv) -> nn.Conv2d:
    """An ``nn.Conv2d`` holding ``conv``: built on the meta device (no wasted random
    initialisation), then given ``conv``'s tensors as its parameters."""
    if min(conv.padding) < 0:
        raise ValueError(f"nn.Conv2d cannot hold a negative padding {conv.padding}")
    with torch.device("meta"):
        module = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
        )
    module.weight = nn.Parameter(conv.weight.detach())
    module.bias = nn.Parameter(conv.bias.detach())
    return module


def of_conv2d(module: nn.Conv2d) -> Conv:
    """The :class:`Conv` value of an ``nn.Conv2d`` (zeros padding mode only)."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError("only numeric zero padding can be re-parameterized")
    bias = module.bias if module.bias is not None else module.weight.new_zeros(module.out_channels)
    return Conv(
        module.weight,
        bias,
        pair(module.stride),
        pair(module.padding),
        pair(module.dilation),
        module.groups,
    )
