"""RepBlock: parallel branches in training, one conv after ``switch_to_deploy()``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from repnet.branches import (
    BRANCHES,
    NORMS,
    BranchSet,
    BranchSpec,
    ChannelScale,
    NoNorm,
    NormKind,
    build_branches,
    builds_cheaply,
    fuse_norm,
    make_geometry,
    resolve_branches,
    scaled_kernel,
    summed_kernel,
)
from repnet.kernels import Conv, of_conv2d, regroup, to_conv2d


class RepBlock(nn.Module):
    """``act(Σ_branches BN_b(op_b(x)))`` in training; ``act(conv(x))`` once deployed.

    ``padding=None`` keeps the size (``d·(k-1)//2``); ``branches`` is a preset name
    (``full``, ``repvgg``, ``acb``, ``dbb``, ``plain``) or a list of branch names.
    ``online=True`` trains cheaply: branch BNs become per-channel scales ``γ_b``, and
    every forward builds ``W = Σ_b γ_b·W_b`` with the kernel algebra and runs
    ``act(BN(conv(x, W)))`` — one conv, one BN (online re-parameterization).
    ``branch_norms`` sets the norm of the branches it names (``bn``, ``scale`` or ``none``)
    and ``norm_after_sum`` adds a BN after the sum, ``act(BN(Σ_b norm_b(op_b(x))))``: the
    QARepVGG block (``qarepvgg`` config) is BN on ``kxk`` only, then one after the sum;
    such a block with an identity starts as ``BN(x)`` (see ``start_as_identity``).
    ``deploy=True`` builds the deployed form directly (to load fused weights).
    ``strict`` decides an identity that cannot exist here (see ``resolve_branches``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        branches: BranchSpec = "full",
        act: Callable[[], nn.Module] | None = nn.ReLU,
        online: bool = False,
        branch_norms: Mapping[str, NormKind] | None = None,
        norm_after_sum: bool = False,
        deploy: bool = False,
        strict: bool | None = None,
    ):
        super().__init__()
        geo = make_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self.geometry = geo
        self.branch_names = resolve_branches(branches, geo, strict)
        self.online = online
        norms = norm_choice(branch_norms or {}, online)
        self.act = act() if act is not None else nn.Identity()
        if deploy:
            self.fused = nn.Conv2d(
                in_channels,
                out_channels,
                geo.kernel_size,
                geo.stride,
                geo.padding,
                geo.dilation,
                groups,
                bias=True,
            )
            self.branches = self.norm = None
        else:
            self.fused = None
            branch_norm = ChannelScale if online else nn.BatchNorm2d
            self.branches = build_branches(geo, self.branch_names, branch_norm, norms)
            self.norm = nn.BatchNorm2d(out_channels) if online or norm_after_sum else None
            if norm_after_sum and not online:
                start_as_identity(self.branches)

    @property
    def deployed(self) -> bool:
        return self.fused is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        if self.online:
            return self.act(self.norm(self.online_conv(x)))
        total = sum_outputs(branch(x) for branch in self.branches.values())
        return self.act(self.norm(total) if self.norm is not None else total)

    def online_conv(self, x: Tensor) -> Tensor:
        """``conv(x, W)``, ``W = Σ_b γ_b ⊙ W_b`` built for this call. Where ``W`` builds without a
        matrix product, the conv does not keep it for backward: it is built again there, so
        only the block in backward holds its kernel (memory of one kernel, not of all)."""
        size = self.geometry.kernel_size
        kernel = scaled_kernel(self.branches, size)
        if not builds_cheaply(self.branches):
            return kernel(x)
        return conv_rebuilding_kernel(kernel, lambda: scaled_kernel(self.branches, size), x)

    def branch_kernels(self) -> dict[str, Conv]:
        """Each branch's equivalent conv (eval-mode statistics) in the block's groups."""
        groups = self.geometry.groups
        return {name: regroup(branch.kernel(), groups) for name, branch in self.branches.items()}

    def branch_sum(self) -> Conv:
        """``Σ_b`` of the branch kernels, at the full kernel size."""
        return summed_kernel(self.branches, self.geometry.kernel_size)

    def kernel(self) -> Conv:
        """The one conv the block equals in eval mode (online: with the trailing BN folded)."""
        if self.fused is not None:
            return of_conv2d(self.fused)
        if self.norm is not None:
            return fuse_norm(self.norm, self.branch_sum())
        return self.branch_sum()

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the branches by their one conv; a second call changes nothing."""
        if self.fused is not None:
            return
        self.fused = to_conv2d(self.kernel())
        self.branches = self.norm = None

    def extra_repr(self) -> str:
        geo = self.geometry
        return (
            f"{geo.in_channels}, {geo.out_channels}, kernel_size={geo.kernel_size}, "
            f"stride={geo.stride}, padding={geo.padding}, dilation={geo.dilation}, "
            f"groups={geo.groups}, branches={list(self.branch_names)}, online={self.online}, "
            f"deployed={self.deployed}"
        )


def norm_choice(branch_norms: Mapping[str, NormKind], online: bool) -> dict[str, type]:
    """The norm class of each branch ``branch_norms`` names; online blocks keep scales."""
    unknown = [name for name in branch_norms if name not in BRANCHES]
    kinds = [kind for kind in branch_norms.values() if kind not in NORMS]
    if unknown or kinds:
        raise ValueError(
            f"branch_norms maps branch names ({', '.join(BRANCHES)}) to one of "
            f"{', '.join(NORMS)}; got {dict(branch_norms)}"
        )
    if online and branch_norms:
        raise ValueError("branch_norms is for offline blocks: online=true trains scales")
    return {name: NORMS[kind] for name, kind in branch_norms.items()}


def start_as_identity(branches: BranchSet) -> None:
    """In a block whose identity has no norm and whose sum has one (QARepVGG), zero the last
    scale of every other branch: the ``γ`` of its norm, or without one the weight of its last
    learnable op (a composition keeps its first weight random, so the zeroed one gets a
    gradient). The block starts as ``BN(x)``, a residual block with its residual branches
    zero-initialised; with ``γ = 1`` the normalised branches outweigh the identity and a
    deep stack trains like a plain VGG (figures in benchmarks/README.md, int8 section)."""
    if "identity" not in branches or not isinstance(branches["identity"][0].norm, NoNorm):
        return
    for name, branch in branches.items():
        if name == "identity":
            continue
        norm = branch[-1].norm
        if not isinstance(norm, NoNorm):
            nn.init.zeros_(norm.weight)
            continue
        weights = [getattr(stage.op, "weight", None) for stage in branch]
        learnable = [w for w in weights if isinstance(w, nn.Parameter)]
        if learnable:  # a branch with nothing to learn (a fixed pool) stays as it is
            nn.init.zeros_(learnable[-1])


def sum_outputs(outputs: Iterable[Tensor]) -> Tensor:
    """``Σ_b y_b``: the first two added into a new tensor, the rest added to it in place
    (no pass adding a start value of 0, no tensor per partial sum)."""
    first, *rest = outputs
    if not rest:
        return first
    total = first + rest[0]
    for output in rest[1:]:
        total += output
    return total


def conv_rebuilding_kernel(kernel: Conv, build: Callable[[], Conv], x: Tensor) -> Tensor:
    """``kernel(x)``, with ``kernel.weight`` left out of what autograd saves: backward calls
    ``build()`` (without grad) for an equal weight instead."""
    storage = kernel.weight.untyped_storage().data_ptr()

    def pack(tensor: Tensor) -> Tensor | None:
        return None if tensor.untyped_storage().data_ptr() == storage else tensor

    def unpack(packed: Tensor | None) -> Tensor:
        if packed is not None:
            return packed
        with torch.no_grad():
            return build().weight

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return kernel(x)


@torch.no_grad()
def branch_shares(model: nn.Module) -> dict[str, list[float]]:
    """Per branch type, each undeployed block's share ``‖W_b‖ / Σ_b' ‖W_b'‖`` of its kernel."""
    shares: dict[str, list[float]] = {}
    for module in model.modules():
        if isinstance(module, RepBlock) and not module.deployed:
            norms = {name: k.weight.norm() for name, k in module.branch_kernels().items()}
            total = sum(norms.values())
            for name, norm in norms.items():
                shares.setdefault(name, []).append((norm / total).item())
    return shares
