"""Kernel algebra: every re-parameterizable piece is one convolution.

A :class:`Conv` is a value — ``weight [O, C/g, kh, kw]``, ``bias [O]`` and its
geometry — and every function here maps such values to new ones. Nothing holds
state and everything is differentiable, so the same functions build the deploy
kernel and (in online mode) the training kernel on every forward.

Per-channel ops (the identity, an average pool) are depthwise convs (``groups = C``,
weight ``[C, 1, kh, kw]``) and stay so: ``add`` puts them on the diagonal of the other
parts, ``compose`` convolves them per channel; only ``regroup`` or ``dense`` spell them out.

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


def _per_channel(channels: int, kernel_size: Pair, value: float, like: Tensor | None) -> Tensor:
    """A depthwise weight ``[C, 1, kh, kw]`` with every tap equal to ``value``."""
    options = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    return torch.full((channels, 1, *kernel_size), value, **options)


def identity(
    channels: int, padding: Pair = (0, 0), dilation: Pair = (1, 1), like: Tensor | None = None
) -> Conv:
    """The identity as a depthwise 1x1 conv: ``W[c, 0] = 1``, ``b = 0``, ``groups = C``.

    ``dilation`` does nothing to a 1x1, but ``pad_to`` spaces the taps it adds by it.
    """
    weight = _per_channel(channels, (1, 1), 1.0, like)
    return Conv(weight, weight.new_zeros(channels), (1, 1), padding, dilation, channels)


def avgpool(
    channels: int,
    kernel_size: Pair,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    like: Tensor | None = None,
) -> Conv:
    """Average pooling (zeros counted) as a depthwise conv: ``W[c, 0, u, v] = 1/(kh·kw)``."""
    weight = _per_channel(channels, kernel_size, 1.0 / math.prod(kernel_size), like)
    return Conv(weight, weight.new_zeros(channels), stride, padding, dilation, channels)


def _margin(small: Pair, big: Pair) -> Pair:
    """Taps on each side when a ``small`` kernel is centred in a ``big`` one: ``(K - k)/2``."""
    grow = [b - s for s, b in zip(small, big)]
    if any(g < 0 or g % 2 for g in grow):
        raise ValueError(
            f"cannot centre a {small} kernel in a {big} one: "
            "sizes must differ by an even, non-negative amount per axis"
        )
    return (grow[0] // 2, grow[1] // 2)


def _centred(conv: Conv, kernel_size: Pair) -> Pair:
    """The padding of ``conv`` centred in a ``kernel_size`` kernel: ``p + d·(K - k)/2``."""
    margin = _margin(conv.kernel_size, kernel_size)
    return tuple(p + d * m for p, d, m in zip(conv.padding, conv.dilation, margin))  # type: ignore[return-value]


def pad_to(conv: Conv, kernel_size: Pair) -> Conv:
    """Centre a kernel in a larger one; padding grows by ``d·(K - k)/2``, the function stays."""
    gh, gw = _margin(conv.kernel_size, kernel_size)
    if (gh, gw) == (0, 0):
        return conv
    weight = F.pad(conv.weight, (gw, gw, gh, gh))
    return replace(conv, weight=weight, padding=_centred(conv, kernel_size))


Window = tuple[slice, slice]


def _taps_inside(size: int, padding: int, dilation: int, taps: int) -> tuple[slice, slice]:
    """The taps ``u`` of one axis that read inside an input of ``size`` at output 0
    (``0 ≤ u·d − p < size``), and the input positions they read."""
    first, last = max(0, -(-padding // dilation)), min(taps - 1, (size - 1 + padding) // dilation)
    if first > last:
        return slice(0, 0), slice(0, 0)
    start = first * dilation - padding
    return slice(first, last + 1), slice(start, last * dilation - padding + 1, dilation)


def one_pixel(conv: Conv, size: Pair) -> tuple[Conv, Window]:
    """``conv`` on an ``H×W`` input where it gives a single pixel, as the input window that
    pixel reads, ``x[..., rows, cols]`` (rows ``u·d_h − p_h`` of the taps ``u`` inside the
    input, likewise columns), and the conv of the taps inside, no padding, stride or
    dilation, whose kernel is the window's size: ``y = K·vec(x[..., rows, cols]) + b``, one
    matrix product (an empty window when every tap reads padding: ``y = b``)."""
    pixels = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    ]
    if pixels != [1, 1]:
        raise ValueError(
            f"a {conv.kernel_size} conv gives {pixels[0]}x{pixels[1]} pixels on a "
            f"{size[0]}x{size[1]} input, not one"
        )
    (rows, at_rows), (cols, at_cols) = (
        _taps_inside(*axis) for axis in zip(size, conv.padding, conv.dilation, conv.kernel_size)
    )
    pixel = Conv(conv.weight[:, :, rows, cols], conv.bias, groups=conv.groups)
    return pixel, (at_rows, at_cols)


def _aligned(convs: tuple[Conv, ...]) -> tuple[list[Conv], Pair]:
    """Parallel convs with one tap spacing, and the kernel size that holds them all; refuses
    those whose outputs would not line up. A size-1 axis has no taps to space, so its
    dilation is taken from the others."""
    spacing = tuple(
        next((c.dilation[axis] for c in convs if c.kernel_size[axis] > 1), convs[0].dilation[axis])
        for axis in (0, 1)
    )
    convs = [
        replace(
            c,
            dilation=tuple(
                d if k > 1 else s for d, s, k in zip(c.dilation, spacing, c.kernel_size)
            ),
        )
        for c in convs
    ]
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
    return convs, size  # type: ignore[return-value]


def _diagonal_window(total: Tensor, groups: int, merged: int, kernel_size: Pair) -> Tensor:
    """The view of ``total`` (``groups`` groups) that a centred ``kernel_size`` part of
    ``r·groups`` groups lands on, ``[g, O/(rg), C/(rg), kh, kw, r]``: group ``j`` of the part
    on the diagonal block ``total[o, (j mod r)·C/(rg) + c]``."""
    out_channels, in_per_group, th, tw = total.shape
    (kh, kw), (mh, mw) = kernel_size, _margin(kernel_size, (th, tw))
    out_per_part = out_channels // (groups * merged)
    blocks = total.view(groups, merged, out_per_part, merged, in_per_group // merged, th, tw)
    return blocks.diagonal(dim1=1, dim2=3)[..., mh : mh + kh, mw : mw + kw, :]


def _by_part(tensor: Tensor, groups: int, merged: int) -> Tensor:
    """A part's weight ``[O, …]`` (or scale ``[O]``) in :func:`_diagonal_window`'s layout:
    ``[g, O/(rg), …, r]``."""
    out_per_part = tensor.shape[0] // (groups * merged)
    return tensor.reshape(groups, merged, out_per_part, *tensor.shape[1:]).movedim(1, -1)


def _from_part(tensor: Tensor) -> Tensor:
    """Inverse of :func:`_by_part`: ``[g, O/(rg), …, r] -> [O, …]``."""
    return tensor.movedim(-1, 1).flatten(0, 2)


def _accumulate(total: Tensor, conv: Conv, groups: int) -> None:
    """``total += conv.weight`` in place, for ``total`` of ``groups`` groups dividing
    ``conv.groups = r·groups`` and a kernel at least as large: each of ``conv``'s groups
    lands on its diagonal block, ``total[o, (j mod r)·C/g + c] += W[o, c]`` (``j`` the
    group of ``o``), its taps centred. Nothing else of ``total`` is read or written."""
    merged = conv.groups // groups
    window = _diagonal_window(total, groups, merged, conv.kernel_size)
    window += _by_part(conv.weight, groups, merged)


def _merged(convs: list[Conv], kernel_size: Pair, groups: int) -> Tensor:
    """``Σ`` of the weights of lined-up convs as one ``[O, C/groups, *kernel_size]`` weight.

    Parts already in ``groups`` are centred and summed; finer-grouped ones (depthwise: an
    identity, a pool) are then added onto their diagonal blocks in place, never made dense.
    """
    coarse = [pad_to(c, kernel_size).weight for c in convs if c.groups == groups]
    fine = [c for c in convs if c.groups != groups]
    if not fine:
        return reduce(torch.add, coarse)
    first = convs[0]
    zeros = first.weight.new_zeros(first.out_channels, first.in_channels // groups, *kernel_size)
    total = sum(coarse, zeros)  # a tensor of our own, to add into
    for conv in fine:
        _accumulate(total, conv, groups)
    return total


def add(*convs: Conv) -> Conv:
    """Parallel branches summed: ``Σ_i conv_i(x)`` is one conv with ``W = Σ W_i``, ``b = Σ b_i``.

    The sum has the coarsest grouping of the parts, ``g = gcd(g_i)``; a depthwise part (an
    identity, a pool) only adds onto the diagonal: ``W[o, o mod C/g] += d[o]``.
    """
    channels = [c.out_channels for c in convs]
    if len(set(channels)) > 1:
        raise ValueError(f"parallel convs to add need equal out_channels, got {channels}")
    aligned, size = _aligned(convs)
    groups = math.gcd(*(c.groups for c in aligned))
    return replace(
        aligned[0],
        weight=_merged(aligned, size, groups),
        bias=reduce(torch.add, (c.bias for c in aligned)),
        padding=_centred(aligned[0], size),
        groups=groups,
    )


def concat(*convs: Conv) -> Conv:
    """Convs of one input stacked along output channels: ``W = [W₁; W₂; …]``, ``b = [b₁; b₂; …]``.

    Grouped convs are made dense first: stacking would otherwise interleave the groups.
    """
    aligned, size = _aligned(convs)
    if any(c.groups > 1 for c in aligned):
        aligned = [dense(c) for c in aligned]
    return replace(
        aligned[0],
        weight=torch.cat([pad_to(c, size).weight for c in aligned]),
        bias=torch.cat([c.bias for c in aligned]),
        padding=_centred(aligned[0], size),
    )


def regroup(conv: Conv, groups: int) -> Conv:
    """The same conv with fewer groups (``groups`` dividing ``conv.groups``): each new group's
    weight is block-diagonal over the old groups it merges (``W[o, o mod C/g]`` for a
    depthwise conv)."""
    if conv.groups == groups:
        return conv
    if groups < 1 or conv.groups % groups:
        raise ValueError(f"cannot regroup a conv of {conv.groups} groups into {groups}")
    return replace(conv, weight=_merged([conv], conv.kernel_size, groups), groups=groups)


def dense(conv: Conv) -> Conv:
    """A grouped conv as an ungrouped one with a block-diagonal weight ``[O, C, kh, kw]``."""
    return regroup(conv, 1)


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


def _convolve_pairs(a: Tensor, b: Tensor) -> Tensor:
    """Full true convolution of the last two axes, the leading axes broadcast:
    ``out[i] = a[i] ∗ b[i]``. With a single tap on either side, a product."""
    if a.shape[-2:] == (1, 1) or b.shape[-2:] == (1, 1):
        return a * b
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])
    (ah, aw), (bh, bw) = a.shape[-2:], b.shape[-2:]
    out = conv2d(
        a.reshape(1, -1, ah, aw),
        b.reshape(-1, 1, bh, bw),
        padding=(bh - 1, bw - 1),
        groups=math.prod(batch),
    )
    return out.view(*batch, *out.shape[-2:])


def _grouped_product(w1: Tensor, w2: Tensor, groups: int) -> Tensor:
    """``K[o, c] = Σ_m W₂[o, m] ∗ W₁[m, c]`` within each of ``groups`` groups.

    A matrix product when either kernel is a single tap; otherwise one grouped true
    convolution with ``W₂`` as the input and ``W₁`` as the kernel.
    """
    g, out_channels, mid, in_per_group = groups, w2.shape[0], w1.shape[0], w1.shape[1]
    by_group2 = w2.reshape(g, out_channels // g, mid // g, *w2.shape[2:])
    by_group1 = w1.reshape(g, mid // g, in_per_group, *w1.shape[2:])
    if w1.shape[2:] == (1, 1):
        weight = _composed_part(by_group2, by_group1.flatten(2))
    elif w2.shape[2:] == (1, 1):
        weight = torch.einsum("gom,gmchw->gochw", by_group2.flatten(2), by_group1)
    else:
        taps = w1.shape[2:]
        weight = conv2d(
            by_group2.transpose(0, 1).reshape(out_channels // g, mid, *w2.shape[2:]),
            by_group1.transpose(1, 2).reshape(g * in_per_group, mid // g, *taps),
            padding=(taps[0] - 1, taps[1] - 1),
            groups=g,
        )
        return (
            weight.reshape(out_channels // g, g, in_per_group, *weight.shape[2:])
            .transpose(0, 1)
            .reshape(out_channels, in_per_group, *weight.shape[2:])
        )
    return weight.reshape(out_channels, in_per_group, *weight.shape[3:])


def _composed_weight(first: Conv, second: Conv, w1: Tensor, w2: Tensor) -> tuple[Tensor, int]:
    """The weight of ``second ∘ first`` from their tap-spaced weights, and its groups.

    A depthwise ``second`` (``W₂ [O, 1, …]``, ``m = O/M`` outputs per channel) convolves
    each row of ``W₁`` with its own kernels, ``K[o, c] = W₂[o] ∗ W₁[o // m, c]``, in
    ``first``'s groups; a depthwise ``first`` of one output per channel is the mirror case,
    ``K[o, c] = W₂[o, c] ∗ W₁[c']`` (``c'`` the channel ``c`` is within ``o``'s group), in
    ``second``'s groups. Otherwise both take their coarsest common grouping.
    """
    out_channels, mid = second.out_channels, first.out_channels
    if second.weight.shape[1] == 1:
        w2 = w2.reshape(mid, out_channels // mid, 1, *w2.shape[2:])
        return _convolve_pairs(w1.unsqueeze(1), w2).flatten(0, 1), first.groups
    if first.weight.shape[1] == 1 and first.in_channels == mid:
        g = second.groups
        w1 = w1.reshape(g, 1, mid // g, *w1.shape[2:])
        w2 = w2.reshape(g, out_channels // g, mid // g, *w2.shape[2:])
        return _convolve_pairs(w2, w1).flatten(0, 1), g
    g = math.gcd(first.groups, second.groups)
    w1 = regroup(replace(first, weight=w1), g).weight
    w2 = regroup(replace(second, weight=w2), g).weight
    return _grouped_product(w1, w2, g), g


def compose(first: Conv, second: Conv) -> Conv:
    """``second ∘ first`` as one conv: ``W = W₂ ∗ W₁`` (true convolution), ``b = b₂ + Σ W₂·b₁``.

    Stride ``s₁s₂``, padding ``p₁ + s₁p₂``. Exact when ``second`` reads the *true*
    output of ``first`` on its padding — what ``first`` computes there, not zeros.
    Running ``first`` with padding ``p₁ + s₁p₂`` and ``second`` with padding 0 is
    that, exactly, everywhere. The naive sequence (``second`` zero-padding the
    intermediate map) equals it when ``p₂ = 0``, or when ``first`` pads fully
    (``p₁ ≥ d₁(k₁-1)``, so its output beyond the map is ``b₁``) and ``b₁ = 0``.
    A depthwise side (identity, pool) is composed per channel, never made dense.
    """
    if first.out_channels != second.in_channels:
        raise ValueError(
            f"cannot compose: first gives {first.out_channels} channels, "
            f"second takes {second.in_channels}"
        )
    spacing, first_step, second_step = _tap_spacing(first, second)
    w1, w2 = dilate(first.weight, first_step), dilate(second.weight, second_step)
    weight, groups = _composed_weight(first, second, w1, w2)
    g2, out_channels = second.groups, second.out_channels
    carried = torch.einsum(
        "gom,gm->go",
        second.weight.sum((2, 3)).reshape(g2, out_channels // g2, -1),
        first.bias.reshape(g2, -1),
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
        groups=groups,
    )


@dataclass(frozen=True)
class Term:
    """One part ``γ ⊙ P`` of a scaled sum ``W = Σ_b γ_b ⊙ P_b`` (``γ [O]`` per output channel).

    ``P = weight``, or, with ``first`` (a pointwise ``A``, stride 1), the composition
    ``P = weight ∘ A``, never stored: ``P[o, c] = Σ_m W₂[o, m]·A[m, c]`` in ``conv.groups``
    groups (``A [M, C/g]``), or ``P[o, c] = W₂[o]·A[o, c]`` for a depthwise ``W₂ [O, 1, …]``
    (``A [O, C/g]``, ``depthwise``). ``conv`` is the part's geometry (for a composition,
    the composed one) with a weight of ``P``'s shape, which may live on the meta device.
    """

    conv: Conv
    scale: Tensor
    weight: Tensor
    first: Tensor | None = None
    depthwise: bool = False


def _grouped(weight: Tensor, first: Tensor, groups: int, depthwise: bool) -> tuple[Tensor, Tensor]:
    """``W₂`` and ``A`` of a composed term split into their groups: ``[g, O/g, M/g, kh, kw]``
    and ``[g, M/g, C/g]``, or for a depthwise ``W₂``, ``[g, O/g, kh, kw]`` and ``[g, O/g, C/g]``."""
    w2 = weight.reshape(groups, -1, *weight.shape[2 if depthwise else 1 :])
    return w2, first.reshape(groups, -1, first.shape[1])


def _mid_major(w2: Tensor) -> Tensor:
    """``[g, O/g, M/g, kh, kw] -> [g, M/g, O/g·kh·kw]``: a view when ``W₂`` is stored
    mid-channel-major (see ``branches.mid_major``), else a copy."""
    return w2.transpose(1, 2).flatten(2)


def _composed_part(w2: Tensor, a: Tensor) -> Tensor:
    """``P = W₂ ∘ A`` per group, ``[g, O/g, C/g, kh, kw]``: one matrix product per group,
    ``Aᵀ·W₂`` over the mid channels."""
    groups, out_per_group, _, kh, kw = w2.shape
    product = a.transpose(1, 2) @ _mid_major(w2)
    return product.view(groups, -1, out_per_group, kh, kw).transpose(1, 2)


class _ScaledSum(torch.autograd.Function):
    """``W = Σ_b γ_b ⊙ P_b``, each part added into its (centred, diagonal) window of ``W`` in
    place. Backward, with ``D_b`` the window of ``dW``: ``dP_b = γ_b ⊙ D_b``,
    ``dγ_b[o] = Σ D_b[o]·P_b[o]``; for a composition ``P = W₂ ∘ A`` with
    ``G = D ∘ Aᵀ``: ``dW₂ = γ ⊙ G``, ``dγ[o] = Σ G[o]·W₂[o]``, ``dA = W₂ᵀ ∘ (γ ⊙ D)``.
    Only the inputs are saved (parameters, mostly): no full-size part, no padded copy."""

    @staticmethod
    def forward(ctx, shape, groups, parts, *tensors):  # type: ignore[override]
        """``parts``: per term ``(r, kernel_size, depthwise)`` (``r·groups`` its groups;
        ``depthwise`` for a composition with a depthwise ``W₂``); ``tensors``: per term
        ``scale, weight, first`` (``first`` ``None`` but for a composition)."""
        ctx.shape, ctx.groups, ctx.parts = shape, groups, parts
        ctx.save_for_backward(*tensors)
        total = tensors[1].new_zeros(shape)
        for (merged, size, depthwise), (scale, weight, first) in zip(parts, _triples(tensors)):
            window = _diagonal_window(total, groups, merged, size)
            gamma = _by_part(scale, groups, merged)[:, :, None, None, None]
            if first is None:
                window.addcmul_(_by_part(weight, groups, merged), gamma)
                continue
            w2, a = _grouped(weight, first, groups, depthwise)
            if depthwise:  # γ[o]·W₂[o]·A[o, c], broadcast: no full-size product
                window.addcmul_(
                    (w2 * gamma[..., 0, 0])[:, :, None, ..., None], a[..., None, None, None]
                )
            else:
                window.addcmul_(_composed_part(w2, a).unsqueeze(-1), gamma)
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        tensors, needs = ctx.saved_tensors, ctx.needs_input_grad[3:]
        grads: list[Tensor | None] = []
        for index, ((merged, size, depthwise), (scale, weight, first)) in enumerate(
            zip(ctx.parts, _triples(tensors))
        ):
            window = _diagonal_window(grad, ctx.groups, merged, size)
            gamma = _by_part(scale, ctx.groups, merged)[:, :, None, None, None]
            need = needs[3 * index : 3 * index + 3]
            if first is None:
                grads += _plain_grads(window, gamma, _by_part(weight, ctx.groups, merged), need)
                continue
            w2, a = _grouped(weight, first, ctx.groups, depthwise)
            grad_of = _depthwise_grads if depthwise else _dense_grads
            d_scale, d_w2, d_a = grad_of(window[..., 0], gamma[..., 0], w2, a, need)
            grads += [
                None if d_scale is None else d_scale.reshape(-1),
                None if d_w2 is None else d_w2.reshape(weight.shape),
                None if d_a is None else d_a.reshape(first.shape),
            ]
        return (None, None, None, *grads)


def _triples(tensors: tuple) -> list[tuple]:
    return [tensors[i : i + 3] for i in range(0, len(tensors), 3)]


def _plain_grads(window: Tensor, gamma: Tensor, part: Tensor, need: tuple) -> list:
    """``dγ[o] = Σ D[o]·P[o]``, ``dP = γ ⊙ D`` (in :func:`_by_part`'s layout)."""
    d_scale = _from_part((window * part).sum((2, 3, 4))) if need[0] else None
    d_weight = _from_part(window * gamma) if need[1] else None
    return [d_scale, d_weight, None]


def _dense_grads(d: Tensor, gamma: Tensor, w2: Tensor, a: Tensor, need: tuple) -> tuple:
    """Per group, with ``D [O/g, C/g, kh, kw]``: ``G = Σ_c D[o, c]·A[m, c]`` (one matrix
    product), ``dγ[o] = Σ G[o]·W₂[o]``, ``dW₂ = γ ⊙ G``, ``dA = Σ_o W₂[o]ᵀ·γ[o]·D[o]``."""
    groups, out_per_group, in_per_group, kh, kw = d.shape
    by_in = d.transpose(1, 2).reshape(groups, in_per_group, -1)  # [g, C/g, O/g·kh·kw]
    d_scale = d_w2 = d_a = None
    if need[0] or need[1]:
        g = (a @ by_in).view(groups, -1, out_per_group, kh, kw).transpose(1, 2)
        d_scale = (g * w2).sum((2, 3, 4)) if need[0] else None
        d_w2 = g.mul_(gamma) if need[1] else None
    if need[2]:
        scaled = by_in.view(groups, in_per_group, out_per_group, -1) * gamma.view(
            groups, 1, out_per_group, 1
        )
        d_a = _mid_major(w2) @ scaled.flatten(2).transpose(1, 2)
    return d_scale, d_w2, d_a


def _depthwise_grads(d: Tensor, gamma: Tensor, w2: Tensor, a: Tensor, need: tuple) -> tuple:
    """``P[o, c] = W₂[o]·A[o, c]``: ``G[o] = Σ_c D[o, c]·A[o, c]``, ``dγ[o] = Σ G[o]·W₂[o]``,
    ``dW₂ = γ ⊙ G``, ``dA[o, c] = γ[o]·Σ D[o, c]·W₂[o]`` (sums over the taps)."""
    d_scale = d_w2 = d_a = None
    if need[0] or need[1]:
        g = torch.einsum("gochw,goc->gohw", d, a)
        d_scale = torch.einsum("gohw,gohw->go", g, w2) if need[0] else None
        d_w2 = g.mul_(gamma[..., 0]) if need[1] else None
    if need[2]:
        d_a = torch.einsum("gochw,gohw->goc", d, w2) * gamma[..., 0, 0]
    return d_scale, d_w2, d_a


def scaled_sum(terms: list[Term], kernel_size: Pair, groups: int) -> Conv:
    """``Σ_b γ_b ⊙ P_b`` as one bias-free conv of ``kernel_size`` in ``groups`` groups (each
    term's groups a multiple of ``groups``), built in one pass by a custom autograd function
    that saves only its inputs. Equal to ``add`` of the scaled parts, padded to
    ``kernel_size`` and regrouped; ``dilate``-free terms only (taps already spaced alike)."""
    aligned, _ = _aligned(tuple(t.conv for t in terms))
    first = aligned[0]
    shape = (first.out_channels, first.in_channels // groups, *kernel_size)
    parts = tuple((c.groups // groups, c.kernel_size, t.depthwise) for c, t in zip(aligned, terms))
    tensors = [x for t in terms for x in (t.scale, t.weight, t.first)]
    weight = _ScaledSum.apply(shape, groups, parts, *tensors)
    return replace(
        first,
        weight=weight,
        bias=weight.new_zeros(shape[0]),
        padding=_centred(first, kernel_size),
        groups=groups,
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
