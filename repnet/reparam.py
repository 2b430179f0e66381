"""Whole-model conversion to the deploy form, and its verification."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

from repnet.block import RepBlock
from repnet.kernels import fuse_bn, of_conv2d, to_conv2d

BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Deploy form of ``model``, in eval mode: every ``switch_to_deploy()`` called, conv→BN fused.

    Blocks are found by duck typing (anything with ``switch_to_deploy``), so
    third-party blocks convert too. ``inplace=False`` leaves ``model`` untouched.
    """
    model = model.eval() if inplace else _deploy_copy(model)
    for module in list(model.modules()):
        switch = getattr(module, "switch_to_deploy", None)
        if callable(switch):
            switch()
    fuse_conv_bn(model)
    return model.eval()  # the modules that conversion made, too


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; after it, every submodule back in its own
    mode (a BN frozen in eval mode stays frozen when the rest trains)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def _deploy_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, less the work conversion would throw away: RepBlocks are
    copied without their branches and given the fused conv computed from the original."""
    blocks = [m for m in model.modules() if isinstance(m, RepBlock) and not m.deployed]
    memo: dict[int, object] = {}
    for block in blocks:
        memo[id(block.branches)] = memo[id(block.norm)] = None
    with eval_mode(model):
        kernels = [block.kernel() for block in blocks]
    duplicate = copy.deepcopy(model, memo).eval()
    for block, kernel in zip(blocks, kernels):
        memo[id(block)].fused = to_conv2d(kernel)
    return duplicate


class _BlockLeafTracer(torch.fx.Tracer):
    """Traces blocks (anything with ``switch_to_deploy``) as single calls: they are already
    converted, and their insides (shape-dependent strategies, say) need not be traceable."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return hasattr(module, "switch_to_deploy") or super().is_leaf_module(module, qualified_name)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where a conv's only use is one BN, found in the traced graph."""
    graph = _BlockLeafTracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCH_NORMS):
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and _foldable(modules[source.target], modules[node.target])
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A zero-padded ``nn.Conv2d`` and a BN with running statistics (eval uses those)."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and bn.running_mean is not None
    )


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv into that conv, in place."""
    try:
        pairs = _conv_bn_pairs(model)
    except Exception as error:  # untraceable models keep their conv→BN pairs
        warnings.warn(
            f"conv→BN pairs left unfused: the model could not be traced ({error})", stacklevel=2
        )
        return model
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        conv = model.get_submodule(conv_name)
        fused = fuse_bn(
            of_conv2d(conv), bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        model.set_submodule(conv_name, to_conv2d(fused))
        model.set_submodule(bn_name, nn.Identity())
    return model


@dataclass(frozen=True)
class Verification:
    """How far a deployed model is from the trained one on the same inputs.

    ``max_rel = max|a - b| / max|a|`` (relative to the output's scale);
    ``argmax_agreement`` is the share of rows whose top class agrees.
    """

    max_abs: float
    max_rel: float
    argmax_agreement: float

    def __str__(self) -> str:
        return (
            f"max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}, "
            f"argmax agreement {self.argmax_agreement:.2%}"
        )


@torch.no_grad()
def verify(
    train_model: Callable[[Tensor], Tensor],
    deploy_model: Callable[[Tensor], Tensor],
    inputs: Tensor,
) -> Verification:
    """Run both on ``inputs`` (modules in eval mode, restored after) and compare the outputs.

    Either side may be any callable, e.g. an ONNX Runtime session wrapped in a function.
    """
    outputs = []
    for model in (train_model, deploy_model):
        with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
            outputs.append(model(inputs))
    reference, deployed = outputs
    difference = (reference - deployed).abs().max().item()
    scale = reference.abs().max().item()
    agreement = 1.0
    if reference.ndim == 2:
        agreement = (reference.argmax(1) == deployed.argmax(1)).double().mean().item()
    return Verification(difference, difference / scale if scale > 0 else difference, agreement)
