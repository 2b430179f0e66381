"""Dynamic convolution: per-sample mixtures of (re-parameterizable) expert kernels.

``y = act(BN(conv(x, Σ_k a_k(x)·W_k) + Σ_k a_k(x)·b_k))``, with attention
``a(x) = softmax(MLP(GAP(x)) / τ)``. A batch of different kernels is one grouped
conv: the batch folds into the channel axis, ``[1, B·C, H, W]`` with kernels
``[B·O, C/g, kh, kw]`` and ``groups = B·g``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from repnet.branches import (
    PRESETS,
    BranchSpec,
    ChannelScale,
    Geometry,
    build_branches,
    conv_weight,
    make_geometry,
    resolve_branches,
    summed_kernel,
)
from repnet.kernels import apply_conv, bn_affine


def mixed_kernels(
    attention: Tensor, weights: Tensor, biases: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Per-sample kernels ``W_b = Σ_k a_bk W_k`` and biases ``b_b = Σ_k a_bk b_k``, the batch
    folded into the output channels: ``[B·O, C/g, kh, kw]`` and ``[B·O]`` (views, no copies).

    With a weight gradient: one ``[B, K] @ [K, N]`` product with no transposed copy, so its
    backward products (``aᵀ @ G``, ``G @ Wᵀ``) are contiguous too. Without one: ``B``
    products ``[1, K] @ [K, N]`` against the experts broadcast (not copied), the faster
    form on CPU; its backward would build a ``[B, K, N]`` weight gradient. A
    ``torch.jit.trace`` always takes the second form: its check runs without autograd and
    must see the same graph (TensorBoard's ``log_graph`` traces the model).
    """
    flat = weights.flatten(1)
    if torch.is_grad_enabled() and flat.requires_grad and not torch.jit.is_tracing():
        mixed = attention @ flat
    else:
        mixed = torch.bmm(attention.unsqueeze(1), flat.expand(attention.shape[0], -1, -1))
    bias = None if biases is None else (attention @ biases).view(-1)
    return mixed.view(-1, *weights.shape[2:]), bias


def conv_grouped(x: Tensor, kernels: Tensor, bias: Tensor | None, geo: Geometry) -> Tensor:
    """All samples in one conv: batch folded into channels, ``groups = B·g``.

    Every reshape here is a view (NCHW input): no copies.
    """
    batch, _, height, width = x.shape
    y = apply_conv(
        x.reshape(1, -1, height, width),
        kernels,
        bias,
        geo.stride,
        geo.padding,
        geo.dilation,
        batch * geo.groups,
    )
    return y.view(batch, -1, *y.shape[2:])


def conv_per_sample(x: Tensor, kernels: Tensor, bias: Tensor | None, geo: Geometry) -> Tensor:
    """One conv per sample (large maps: each conv is big enough to run efficiently)."""
    batch = len(x)
    biases = [None] * batch if bias is None else bias.chunk(batch)
    return torch.cat(
        [
            apply_conv(x[i : i + 1], w, b, geo.stride, geo.padding, geo.dilation, geo.groups)
            for i, (w, b) in enumerate(zip(kernels.chunk(batch), biases))
        ]
    )


STRATEGIES: dict[str, Callable[[Tensor, Tensor, Tensor | None, Geometry], Tensor]] = {
    "grouped": conv_grouped,
    "per_sample": conv_per_sample,
}


class DynamicConv2d(nn.Module):
    """A dynamic conv of ``num_experts`` experts, each a set of linear branches, then BN and act.

    ``branches`` is any preset or list of :class:`~repnet.RepBlock` branches; each
    expert's kernel is built by the kernel algebra on every forward (branch BNs are
    per-channel scales, as in online mode). An expert of the one ``kxk`` branch (``plain``)
    is its kernel: all experts are then one ``[K, O, C/g, kh, kw]`` parameter, as in the
    deployed form. Trained experts have no bias (the BN after the mix gives the shift).
    ``switch_to_deploy()`` collapses each expert to one kernel and folds the BN into the
    experts (``Σ_k a_k = 1``, so the BN shift folds exactly). ``strategy`` is ``grouped``
    (one conv for the whole batch) or ``per_sample`` (a loop).
    """

    # The grouped conv's group count is the batch size: an export must fix the batch.
    needs_fixed_batch = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        num_experts: int = 4,
        temperature: float = 30.0,
        reduction: int = 4,
        branches: BranchSpec = "plain",
        act: Callable[[], nn.Module] | None = nn.ReLU,
        strategy: str = "grouped",
        deploy: bool = False,
        strict: bool | None = None,
    ):
        super().__init__()
        geo = make_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        if num_experts < 1:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        self.geometry, self.strategy = geo, strategy
        # A buffer, so the annealed value is saved with the weights and deployed with them.
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.branch_names = resolve_branches(branches, geo, strict)
        hidden = max(4, in_channels // reduction)
        self.attention = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_experts)
        )
        self.act = act() if act is not None else nn.Identity()
        shape = (num_experts, out_channels, in_channels // groups, *geo.kernel_size)
        self.weight = self.bias = self.experts = self.norm = None
        if deploy:
            self.weight = nn.Parameter(torch.zeros(shape))
            self.bias = nn.Parameter(torch.zeros(num_experts, out_channels))
            return
        self.norm = nn.BatchNorm2d(out_channels)
        if self.branch_names == PRESETS["plain"]:
            self.weight = nn.Parameter(conv_weight(*shape))
        else:
            self.experts = nn.ModuleList(
                build_branches(geo, self.branch_names, ChannelScale) for _ in range(num_experts)
            )

    @property
    def deployed(self) -> bool:
        return self.norm is None

    def expert_kernels(self) -> tuple[Tensor, Tensor | None]:
        """All experts' kernels ``[K, O, C/g, kh, kw]`` and biases ``[K, O]`` (``None`` before
        deployment: every branch op and scale is bias-free)."""
        if self.experts is None:
            return self.weight, self.bias
        size = self.geometry.kernel_size
        return torch.stack([summed_kernel(expert, size).weight for expert in self.experts]), None

    def attend(self, x: Tensor) -> Tensor:
        """Expert weights per sample, ``softmax(MLP(GAP(x)) / τ)``: ``[B, K]``, rows sum to 1."""
        return torch.softmax(self.attention(x.mean((2, 3))) / self.temperature, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        kernels, bias = mixed_kernels(self.attend(x), *self.expert_kernels())
        y = STRATEGIES[self.strategy](x, kernels, bias, self.geometry)
        if self.norm is not None:
            y = self.norm(y)
        return self.act(y)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Experts become plain kernels with the BN folded in; a second call changes nothing."""
        if self.deployed:
            return
        weights, _ = self.expert_kernels()
        norm = self.norm
        scale, shift = bn_affine(
            norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps
        )
        self.weight = nn.Parameter(weights * scale.reshape(1, -1, 1, 1, 1))
        self.bias = nn.Parameter(shift.expand(len(weights), -1).clone())
        self.experts = self.norm = None

    def extra_repr(self) -> str:
        geo = self.geometry
        return (
            f"{geo.in_channels}, {geo.out_channels}, kernel_size={geo.kernel_size}, "
            f"stride={geo.stride}, padding={geo.padding}, dilation={geo.dilation}, "
            f"groups={geo.groups}, experts={self.attention[-1].out_features}, "
            f"branches={list(self.branch_names)}, temperature={self.temperature.item():g}, "
            f"strategy={self.strategy}, deployed={self.deployed}"
        )
