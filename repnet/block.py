"""RepBlock: parallel branches in training, one conv after ``switch_to_deploy()``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from repnet.branches import (
    BranchSpec,
    ChannelScale,
    build_branches,
    fuse_norm,
    make_geometry,
    resolve_branches,
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
            self.branches = build_branches(geo, self.branch_names, branch_norm)
            self.norm = nn.BatchNorm2d(out_channels) if online else None

    @property
    def deployed(self) -> bool:
        return self.fused is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        if self.norm is not None:
            return self.act(self.norm(self.branch_sum()(x)))
        return self.act(sum(branch(x) for branch in self.branches.values()))

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
