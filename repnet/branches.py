"""Branches: small modules that run in training and know their equivalent conv.

A branch is a sequence of stages; a stage is one linear op (a learnable conv, or
a fixed kernel: identity, average pool) followed by its own norm. Every stage,
and so every branch, has ``kernel()``: the :class:`~repnet.kernels.Conv` it
equals in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import reduce
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repnet.kernels import (
    Conv,
    Pair,
    Term,
    add,
    affine,
    apply_conv,
    compose,
    fuse_bn,
    identity,
    pad_to,
    pair,
    regroup,
    scaled_sum,
)


class ChannelScale(nn.Module):
    """A learnable per-channel scale ``y = γ·x``, the linear stand-in for BN in online mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.reshape(1, -1, 1, 1)

    def fuse(self, conv: Conv) -> Conv:
        return affine(conv, self.weight, torch.zeros_like(self.weight))


class NoNorm(nn.Identity):
    """No norm after a stage (QARepVGG's 1x1 and identity branches): ``y = x``."""

    def fuse(self, conv: Conv) -> Conv:
        return conv


Norm = nn.BatchNorm2d | ChannelScale | NoNorm
NormKind = Literal["bn", "scale", "none"]
NORMS: dict[str, type[Norm]] = {"bn": nn.BatchNorm2d, "scale": ChannelScale, "none": NoNorm}


def fuse_norm(norm: nn.Module, conv: Conv) -> Conv:
    """Fold a stage's norm into its conv: a BatchNorm (also once made a ``SyncBatchNorm``) by its
    running statistics, ``W·γ/σ``, ``β + (b - μ)·γ/σ``; a ``ChannelScale`` by its scale."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return fuse_bn(conv, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    return norm.fuse(conv)


class KernelOp(nn.Module):
    """A bias-free linear op held as its kernel and run as a conv: learnable (a parameter), or
    fixed (a non-persistent buffer: the constructor makes it, checkpoints leave it out)."""

    def __init__(self, conv: Conv, learnable: bool):
        super().__init__()
        if learnable:
            self.weight = nn.Parameter(conv.weight)
        else:
            self.register_buffer("weight", conv.weight, persistent=False)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups

    def kernel(self) -> Conv:
        zeros = self.weight.new_zeros(self.weight.shape[0])
        return Conv(self.weight, zeros, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        return apply_conv(
            x, self.weight, None, self.stride, self.padding, self.dilation, self.groups
        )


class Passthrough(KernelOp):
    """The identity (a depthwise 1x1 of ones): only its padding, or cropping, is left to do."""

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph)) if (ph, pw) != (0, 0) else x


class AveragePool(KernelOp):
    """Average pooling, zeros counted, per channel: ``y = (box ∗ x)/(kh·kw)``, run as a
    depthwise conv (on CPU several times faster than ``avg_pool2d`` forward and backward,
    see benchmarks/README.md; and it takes any dilation). Its buffer is the box of ones,
    exact in any dtype the module is cast to (a stored ``1/(kh·kw)`` cast from float32 to
    float64 would keep float32's rounding)."""

    def __init__(
        self, channels: int, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
    ):
        box = torch.ones(channels, 1, *kernel_size)
        conv = Conv(box, box.new_zeros(channels), stride, padding, dilation, channels)
        super().__init__(conv, learnable=False)

    def kernel(self) -> Conv:
        box = super().kernel()
        return replace(box, weight=box.weight / math.prod(box.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.kernel().weight
        return apply_conv(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


def conv_weight(*shape: int) -> Tensor:
    """A kernel ``[O, C/g, kh, kw]`` (or a stack ``[K, O, C/g, kh, kw]``, each slice alike)
    initialised like ``nn.Conv2d``'s: Kaiming uniform, ``a = √5``, fan-in ``C/g·kh·kw``."""
    *stack, out_channels, in_per_group, kh, kw = shape
    weight = torch.empty(math.prod(stack), out_channels, in_per_group, kh, kw)
    for kernel in weight:
        nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
    return weight.reshape(shape)


def learnable_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> KernelOp:
    """A conv initialised like ``nn.Conv2d``."""
    weight = conv_weight(out_channels, in_channels // groups, *kernel_size)
    zeros = weight.new_zeros(out_channels)
    return KernelOp(Conv(weight, zeros, stride, padding, dilation, groups), learnable=True)


class Stage(nn.Module):
    """One linear op and its norm: ``y = norm(op(x))``."""

    def __init__(self, op: KernelOp, norm: Norm):
        super().__init__()
        self.op, self.norm = op, norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.op(x))

    def kernel(self) -> Conv:
        return fuse_norm(self.norm, self.op.kernel())


class Branch(nn.Sequential):
    """Stages applied in turn; its kernel is their composition ``k_n ∘ … ∘ k_1``."""

    def kernel(self) -> Conv:
        return reduce(compose, (stage.kernel() for stage in self))


@dataclass(frozen=True)
class Geometry:
    """The geometry of a block's main ``kxk`` conv, which every branch must line up with."""

    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int

    def padding_for(self, size: Pair, branch: str) -> Pair:
        """Padding giving a ``size`` kernel the main one's outputs: ``P - d(K-k)/2``."""
        grow = [big - small for big, small in zip(self.kernel_size, size)]
        if any(g % 2 for g in grow):
            raise ValueError(
                f"branch {branch!r} ({size[0]}x{size[1]}) cannot be centred in a "
                f"{self.kernel_size[0]}x{self.kernel_size[1]} kernel: sizes must differ by an "
                "even number, so use odd kernel sizes or leave this branch out"
            )
        return (
            self.padding[0] - self.dilation[0] * grow[0] // 2,
            self.padding[1] - self.dilation[1] * grow[1] // 2,
        )

    def identity_problem(self) -> str | None:
        """Why an identity branch cannot exist here, or ``None`` when it can."""
        if self.in_channels != self.out_channels:
            return f"in_channels ({self.in_channels}) != out_channels ({self.out_channels})"
        if self.stride != (1, 1):
            return f"stride is {self.stride}, not 1"
        if any(k % 2 == 0 for k in self.kernel_size):
            return f"an even kernel {self.kernel_size} has no centre tap"
        return None


NormFactory = Callable[[int], Norm]
BranchBuilder = Callable[[Geometry, NormFactory], Branch]

# Branch builders by name; ``register_branch`` adds one (inside or outside the package).
BRANCHES: dict[str, BranchBuilder] = {}


def register_branch(name: str) -> Callable[[BranchBuilder], BranchBuilder]:
    """Decorator: ``@register_branch("5x5")`` makes ``builder(geometry, norm) -> Branch``
    available by name to presets, lists and every block; a name is registered once."""

    def register(builder: BranchBuilder) -> BranchBuilder:
        if name in BRANCHES:
            raise ValueError(f"a branch named {name!r} is already registered")
        BRANCHES[name] = builder
        return builder

    return register


def _single(size_of: Callable[[Geometry], Pair], name: str) -> BranchBuilder:
    """A branch of one conv of size ``size_of(geometry)`` lined up with the main kernel."""

    def build(geo: Geometry, norm: NormFactory) -> Branch:
        size = size_of(geo)
        op = learnable_conv(
            geo.in_channels,
            geo.out_channels,
            size,
            geo.stride,
            geo.padding_for(size, name),
            geo.dilation,
            geo.groups,
        )
        return Branch(Stage(op, norm(geo.out_channels)))

    return register_branch(name)(build)


_single(lambda g: g.kernel_size, "kxk")
_single(lambda g: (1, 1), "1x1")
_single(lambda g: (1, g.kernel_size[1]), "1xk")
_single(lambda g: (g.kernel_size[0], 1), "kx1")


@register_branch("identity")
def _identity(geo: Geometry, norm: NormFactory) -> Branch:
    padding = geo.padding_for((1, 1), "identity")
    conv = identity(geo.out_channels, padding, geo.dilation)
    return Branch(Stage(Passthrough(conv, learnable=False), norm(geo.out_channels)))


def _after_1x1(
    name: str,
    second: Callable[[Geometry, int], KernelOp],
    mid_channels: Callable[[Geometry], int],
) -> BranchBuilder:
    """A 1x1 conv, then ``second``; the 1x1 runs on the padded input so the borders stay exact."""

    def build(geo: Geometry, norm: NormFactory) -> Branch:
        mid = mid_channels(geo)
        first = learnable_conv(
            geo.in_channels, mid, (1, 1), (1, 1), geo.padding, (1, 1), geo.groups
        )
        return Branch(Stage(first, norm(mid)), Stage(second(geo, mid), norm(geo.out_channels)))

    return register_branch(name)(build)


def mid_major(op: KernelOp) -> KernelOp:
    """``op``'s weight ``[O, M/g, kh, kw]`` stored mid-channel-major (``[M/g, O, kh, kw]``
    contiguous, seen transposed; same values, shape and state dict): the online 1x1→kxk
    kernel product ``Aᵀ·W₂`` and its backward then read and write it without a copy."""
    op.weight = nn.Parameter(op.weight.detach().transpose(0, 1).contiguous().transpose(0, 1))
    return op


def _kxk_after(geo: Geometry, mid: int) -> KernelOp:
    return mid_major(
        learnable_conv(
            mid, geo.out_channels, geo.kernel_size, geo.stride, (0, 0), geo.dilation, geo.groups
        )
    )


def _avg_after(geo: Geometry, mid: int) -> KernelOp:
    return AveragePool(mid, geo.kernel_size, geo.stride, (0, 0), geo.dilation)


_after_1x1("1x1_kxk", _kxk_after, lambda g: g.in_channels)
_after_1x1("1x1_avg", _avg_after, lambda g: g.out_channels)

PRESETS: dict[str, tuple[str, ...]] = {
    "full": ("kxk", "1xk", "kx1", "1x1", "identity"),
    "repvgg": ("kxk", "1x1", "identity"),
    "acb": ("kxk", "1xk", "kx1"),
    "dbb": ("kxk", "1x1", "1x1_kxk", "1x1_avg"),
    "plain": ("kxk",),
}

BranchSpec = str | Sequence[str]


def resolve_branches(
    branches: BranchSpec, geometry: Geometry, strict: bool | None = None
) -> tuple[str, ...]:
    """Branch names of a preset or a list. The one rule for an identity that cannot exist
    (in ≠ out channels, stride ≠ 1, an even kernel): ``strict=True`` refuses it, ``False``
    drops it; by default a preset drops it and a list refuses it."""
    if isinstance(branches, str):
        if branches not in PRESETS:
            raise ValueError(
                f"unknown branch preset {branches!r}; presets: {', '.join(PRESETS)} "
                f"(or a list of branch names: {', '.join(BRANCHES)})"
            )
        names = PRESETS[branches]
    else:
        names = tuple(branches)
        unknown = [n for n in names if n not in BRANCHES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(
                f"branches must be distinct names from {', '.join(BRANCHES)}; got {list(names)}"
            )
    strict = not isinstance(branches, str) if strict is None else strict
    problem = geometry.identity_problem() if "identity" in names else None
    if problem is None:
        return names
    others = tuple(n for n in names if n != "identity")
    if strict or not others:
        raise ValueError(f"an identity branch cannot exist here: {problem}")
    return others


def make_geometry(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Pair,
    stride: int | Pair,
    padding: int | Pair | None,
    dilation: int | Pair,
    groups: int,
) -> Geometry:
    """Validated :class:`Geometry`; every problem is named in one ``ValueError``."""
    kernel_size, stride, dilation = pair(kernel_size), pair(stride), pair(dilation)
    if padding is None:
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel_size))
    padding = pair(padding)
    problems = [
        f"{name} must be positive, got {value}"
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
            ("kernel_size", min(kernel_size)),
            ("stride", min(stride)),
            ("dilation", min(dilation)),
        )
        if value < 1
    ]
    if min(padding) < 0:
        problems.append(f"padding must be non-negative, got {padding}")
    if groups >= 1 and (in_channels % groups or out_channels % groups):
        problems.append(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) "
            f"must be divisible by groups ({groups})"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return Geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)


class BranchSet(nn.ModuleDict):
    """A block's branches by name, and the geometry they line up with (not state)."""

    def __init__(self, geometry: Geometry, branches: dict[str, Branch]):
        super().__init__(branches)
        self.geometry = geometry


def build_branches(
    geo: Geometry,
    names: tuple[str, ...],
    norm: NormFactory,
    norms: Mapping[str, NormFactory] | None = None,
) -> BranchSet:
    """The named branches for ``geo``, each stage ending in ``norm`` (``norms[name]`` for
    the branches it names)."""
    norms = norms or {}
    return BranchSet(geo, {name: BRANCHES[name](geo, norms.get(name, norm)) for name in names})


def summed_kernel(branches: BranchSet, kernel_size: Pair) -> Conv:
    """``Σ_b`` of the branch kernels, padded to the full ``kernel_size``, in the block's groups
    (a sum of depthwise kernels alone, an identity's, would have finer ones)."""
    total = add(*(branch.kernel() for branch in branches.values()))
    return regroup(pad_to(total, kernel_size), branches.geometry.groups)


def _on_meta(conv: Conv) -> Conv:
    """``conv``'s geometry and shapes, without its values (for the composition's geometry)."""
    return replace(conv, weight=conv.weight.detach().to("meta"), bias=conv.bias.detach().to("meta"))


def _composes_pointwise(first: Conv, second: Conv, groups: int) -> bool:
    """Whether ``second ∘ first`` is a :class:`Term` composition: ``first`` a stride-1 1x1 in
    ``groups`` groups, ``second`` dense in the same groups or depthwise of one output per
    channel (then ``second``'s taps keep their spacing, so no ``dilate``)."""
    if first.kernel_size != (1, 1) or first.stride != (1, 1) or first.groups != groups:
        return False
    depthwise = second.groups == second.out_channels == first.out_channels
    return second.groups == groups or (second.weight.shape[1] == 1 and depthwise)


def _term(branch: Branch, groups: int) -> Term:
    """The online branch ``γ ⊙ (op_n ∘ … ∘ op_1)`` (its last norm a :class:`ChannelScale`
    ``γ``; earlier stages folded into the pointwise ``A``) as a :class:`Term`."""
    *head, last = branch
    second, scale = last.op.kernel(), last.norm.weight
    if not head:
        return Term(second, scale, second.weight)
    first = reduce(compose, (stage.kernel() for stage in head))
    if _composes_pointwise(first, second, groups):
        with torch.no_grad():
            geometry = compose(_on_meta(first), _on_meta(second))
        depthwise = second.groups != groups
        return Term(geometry, scale, second.weight, first.weight.flatten(1), depthwise)
    composed = compose(first, second)
    return Term(composed, scale, composed.weight)


def scaled_kernel(branches: BranchSet, kernel_size: Pair) -> Conv:
    """Online mode's ``W = Σ_b γ_b ⊙ W_b`` (every branch ending in a :class:`ChannelScale`,
    every op bias-free, so no bias): what :func:`summed_kernel` gives, built in one pass
    by :func:`~repnet.kernels.scaled_sum`, which saves no full-size intermediate."""
    groups = branches.geometry.groups
    terms = [_term(branch, groups) for branch in branches.values()]
    return scaled_sum(terms, kernel_size, groups)


def builds_cheaply(branches: BranchSet) -> bool:
    """Whether :func:`scaled_kernel` multiplies no matrices: every branch is one op, or ends
    in a depthwise one (a composition with a pool is an outer product)."""
    return all(
        len(branch) == 1 or branch[-1].op.weight.shape[1] == 1 for branch in branches.values()
    )
