"""Whole-model conversion to the deploy form, and its verification.

Conversion has two passes. First every module that can convert itself does, by the
protocol its library speaks — ``switch_to_deploy()`` (RepVGG, DBB, ACNet, OREPA,
mmpretrain, repnet), ``reparameterize()`` (timm) or ``fuse()`` returning or installing a
fused module (timm) — top-down, so a module its parent removed is never visited, and each
at most once. Then every eval-mode BatchNorm next to a linear map (``nn.Linear``,
``nn.Conv1d/2d/3d``) is folded into it wherever that is exact, found in the traced graph
(of the whole model, or of the parts that trace when the whole does not).
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repnet.block import RepBlock
from repnet.errors import DeployError
from repnet.kernels import bn_affine, to_conv2d

PROTOCOLS = ("switch_to_deploy", "reparameterize", "fuse")
CONVERTED = "_repnet_converted"  # set on a module once its protocol has run

# The linear maps a BatchNorm folds into, and the BatchNorms each pairs with.
NORMS_OF: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Linear: (nn.BatchNorm1d,),
    nn.Conv1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
}
PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
PASSIVE = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
ADDITIONS = (operator.add, operator.iadd, torch.add)


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Deploy form of ``model``, in eval mode: every conversion protocol run, BNs folded.

    ``inplace=False`` leaves ``model`` untouched. A conversion that changes nothing, or
    leaves parallel linear branches summed, warns and names them.
    """
    model = model.eval() if inplace else _deploy_copy(model)
    with torch.no_grad():
        converted: list[nn.Module] = []
        model = _convert(model, converted)
        folded, unmerged = _fold_norms(model)
    if unmerged:
        warnings.warn(
            "reparameterize left parallel linear branches summed in "
            f"{', '.join(unmerged)}: no conversion protocol "
            f"({'(), '.join(PROTOCOLS)}()) merged them",
            stacklevel=2,
        )
    elif not converted and not folded and not _converted_before(model):
        warnings.warn(
            "reparameterize changed nothing: no module has a conversion protocol "
            f"({'(), '.join(PROTOCOLS)}()) and no BatchNorm could be folded",
            stacklevel=2,
        )
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


@contextmanager
def forward_hooks(modules: Mapping[str, nn.Module], hook_for: Callable[[str], Callable]):
    """``hook_for(name)`` as the forward hook of each named module inside the block,
    removed after it."""
    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


# ---- pass 1: the modules' own conversions ----


def _protocol(module: nn.Module) -> tuple[str, Callable[[], object]] | None:
    """The first of ``PROTOCOLS`` that ``module`` has as a method callable without arguments."""
    if getattr(module, CONVERTED, False):
        return None
    for name in PROTOCOLS:
        method = getattr(module, name, None)
        if inspect.ismethod(method) and _callable_without_arguments(method):
            return name, method
    return None


def _callable_without_arguments(method: Callable) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    optional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return all(p.default is not p.empty or p.kind in optional for p in parameters)


def _tensor_kind(module: nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """The one floating dtype and device of ``module``'s tensors, if they share one."""
    kinds = {
        (t.dtype, t.device)
        for t in chain(module.parameters(), module.buffers())
        if t.is_floating_point()
    }
    return kinds.pop() if len(kinds) == 1 else None


@contextmanager
def _creating(kind: tuple[torch.dtype, torch.device] | None) -> Iterator[None]:
    """New tensors made inside are of ``kind`` by default: a hook that builds a module and
    copies a kernel into it then rounds nothing (a float32 module would)."""
    if kind is None:
        yield
        return
    default = torch.get_default_dtype()
    torch.set_default_dtype(kind[0])
    try:
        with kind[1]:
            yield
    finally:
        torch.set_default_dtype(default)


def _convert(module: nn.Module, converted: list[nn.Module]) -> nn.Module:
    """Run ``module``'s protocol, then convert the children it has *after* that, in place.

    Returns what replaces ``module`` (``fuse()`` may return a new module). The result keeps
    ``module``'s dtype and device (third-party hooks often build float32 modules).
    """
    protocol = _protocol(module)
    if protocol is not None:
        name, method = protocol
        kind = _tensor_kind(module)
        with _creating(kind):
            result = method()
        if name == "fuse" and isinstance(result, nn.Module):
            module = result
        if kind is not None and any(
            (t.dtype, t.device) != kind
            for t in chain(module.parameters(), module.buffers())
            if t.is_floating_point()
        ):
            module.to(device=kind[1], dtype=kind[0])
        object.__setattr__(module, CONVERTED, True)
        converted.append(module)
    for child_name, child in list(module.named_children()):
        replacement = _convert(child, converted)
        if replacement is not child:
            setattr(module, child_name, replacement)
    return module


def _converted_before(model: nn.Module) -> bool:
    """Whether ``model`` holds the deploy form of something: a converted module or block."""
    return any(
        getattr(m, CONVERTED, False) or (isinstance(m, RepBlock) and m.deployed)
        for m in model.modules()
    )


# ---- pass 2: BatchNorms folded into their linear maps ----


def _norm_rest(norm: nn.Module) -> nn.Module | None:
    """What is left of an eval-mode BatchNorm once its affine map ``s·x + t`` is folded away:
    nothing (``nn.Identity``) for a plain BN, the dropout and activation of a BN that adds
    them (timm's ``BatchNormAct2d``); ``None`` for a norm that cannot be folded."""
    if not isinstance(norm, _BatchNorm) or norm.running_mean is None or norm.running_var is None:
        return None
    if type(norm) in PLAIN_NORMS:
        return nn.Identity()
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    if not isinstance(drop, nn.Module) or not isinstance(act, nn.Module):
        return None
    if {id(child) for child in norm.children()} != {id(drop), id(act)}:
        return None
    rest = [m for m in (drop, act) if not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _features(linear: nn.Module) -> tuple[int, int]:
    """``(inputs, outputs)`` of a linear map: features or channels."""
    if isinstance(linear, nn.Linear):
        return linear.in_features, linear.out_features
    return linear.in_channels, linear.out_channels


def _pads_exactly(linear: nn.Module) -> bool:
    """Whether a BN before ``linear`` commutes with its padding: no padding, or padding that
    copies input values (reflect, replicate, circular). Zero padding would need ``BN(0)``."""
    if isinstance(linear, nn.Linear) or linear.padding_mode != "zeros":
        return True
    if linear.padding == "valid":
        return True
    if linear.padding == "same":
        return all(d * (k - 1) == 0 for d, k in zip(linear.dilation, linear.kernel_size))
    return not any(linear.padding)


@dataclass(frozen=True)
class Fold:
    """BN ``norm`` folded into ``linear``: ``after`` it, ``BN(Wx)``; before it, ``W·BN(x)``."""

    linear: str
    norm: str
    after: bool


class _LeafTracer(torch.fx.Tracer):
    """Traces norms and the modules in ``leaves`` (known untraceable) as single calls."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            id(module) in self.leaves
            or isinstance(module, _BatchNorm)
            or super().is_leaf_module(module, qualified_name)
        )


@dataclass
class _Graph:
    prefix: str
    root: nn.Module
    graph: torch.fx.Graph


def _graphs(module: nn.Module, prefix: str, leaves: set[int]) -> tuple[bool, list[_Graph]]:
    """Traced graphs covering ``module``: its own, with untraceable descendants as leaves
    (and their insides as graphs of their own); if ``module`` itself does not trace, the
    graphs of its children. Returns whether ``module`` traced, and the graphs."""
    try:
        return True, [_Graph(prefix, module, _LeafTracer(leaves).trace(module))]
    except Exception:  # a forward can fail to trace in any way
        pass
    own: list[_Graph] = []  # graphs of the children that trace
    inner: list[_Graph] = []  # graphs inside the children that do not
    for name, child in module.named_children():
        traced, graphs = _graphs(child, f"{prefix}{name}.", leaves)
        (own if traced else inner).extend(graphs)
    if inner:  # some children now known untraceable: as leaves, the rest may trace
        try:
            return True, [_Graph(prefix, module, _LeafTracer(leaves).trace(module)), *inner]
        except Exception:
            pass
    leaves.add(id(module))
    return False, own + inner


def _untouchable(model: nn.Module, graphs: list[_Graph]) -> set[int]:
    """Ids of modules a fold must not change: shared (reached twice), holding a tensor that
    another module holds too (tied weights), hooked, or whose tensors a forward reads."""
    holders: Counter[int] = Counter()
    owners: dict[int, list[nn.Module]] = {}
    visits: Counter[int] = Counter()
    for _, module in model.named_modules(remove_duplicate=False):
        visits[id(module)] += 1
        for tensor in chain(module._parameters.values(), module._buffers.values()):
            if tensor is not None:
                holders[id(tensor)] += 1
                owners.setdefault(id(tensor), []).append(module)
    untouchable = {key for key, count in visits.items() if count > 1}
    for key, count in holders.items():
        if count > 1:
            untouchable.update(id(m) for m in owners[key])
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            untouchable.add(id(module))
    for item in graphs:
        for node in item.graph.nodes:
            if node.op == "get_attr":
                owner = node.target.rpartition(".")[0]
                untouchable.add(id(item.root.get_submodule(owner)))
    return untouchable


def _single_call(node: torch.fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module a node calls on exactly one input, or ``None``."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        return modules[node.target]
    return None


def _graph_folds(item: _Graph, untouchable: set[int]) -> list[Fold]:
    """The BN folds one traced graph shows: a linear map and a BN next to each other, each
    called once, the value between them used by nothing else."""
    modules = dict(item.root.named_modules())
    calls = Counter(node.target for node in item.graph.nodes if node.op == "call_module")
    once = {name for name, count in calls.items() if count == 1}
    folds, used = [], set()

    def usable(name: str, key: object) -> bool:
        return name in once and key not in used and id(modules[name]) not in untouchable

    for node in item.graph.nodes:
        norm = _single_call(node, modules)
        rest = _norm_rest(norm) if norm is not None else None
        if rest is None or not usable(node.target, node.target):
            continue
        source = node.args[0]
        linear = _single_call(source, modules) if isinstance(source, torch.fx.Node) else None
        if (
            linear is not None
            and isinstance(norm, NORMS_OF.get(type(linear), ()))
            and _features(linear)[1] == norm.num_features
            and len(source.users) == 1
            and usable(source.target, (source.target, "after"))
        ):
            folds.append(Fold(item.prefix + source.target, item.prefix + node.target, True))
            used.update({node.target, (source.target, "after")})
            continue
        if len(node.users) != 1 or not isinstance(rest, nn.Identity):
            continue
        (user,) = node.users
        linear = _single_call(user, modules)
        if (
            linear is not None
            and isinstance(norm, NORMS_OF.get(type(linear), ()))
            and _features(linear)[0] == norm.num_features
            and _pads_exactly(linear)
            and usable(user.target, (user.target, "before"))
        ):
            folds.append(Fold(item.prefix + user.target, item.prefix + node.target, False))
            used.update({node.target, (user.target, "before")})
    return folds


def _fold(linear: nn.Module, norm: _BatchNorm, after: bool) -> None:
    """``BN(W·x + b)`` as ``W'·x + b'`` with ``W' = s·W``, ``b' = s·b + t``; or ``W·BN(x) + b``
    with ``W'[o, c] = W[o, c]·s[c]``, ``b' = b + Σ_{c,taps} W[o, c]·t[c]`` (per group)."""
    scale, shift = bn_affine(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    weight = linear.weight
    bias = linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])
    if after:
        weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
        bias = bias * scale + shift
    else:
        groups = getattr(linear, "groups", 1)
        per_group = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
        scale, shift = (v.reshape(groups, 1, -1, 1) for v in (scale, shift))
        bias = bias + (per_group * shift).sum((2, 3)).reshape(-1)
        weight = (per_group * scale).reshape(weight.shape)
    linear.weight = nn.Parameter(weight)
    linear.bias = nn.Parameter(bias)


def _fold_norms(model: nn.Module) -> tuple[int, list[str]]:
    """Fold every BN that can be folded, in place; returns how many, and the names of the
    modules that still sum parallel linear branches (see :func:`unmerged_branches`)."""
    leaves: set[int] = set()
    _, graphs = _graphs(model, "", leaves)
    untouchable = _untouchable(model, graphs)
    folds = [fold for item in graphs for fold in _graph_folds(item, untouchable)]
    unmerged = [name for item in graphs for name in _graph_sums(item)]
    for fold in folds:
        norm = model.get_submodule(fold.norm)
        _fold(model.get_submodule(fold.linear), norm, fold.after)
        model.set_submodule(fold.norm, _norm_rest(norm))
    return len(folds), unmerged


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm next to a linear map into it, where exact, in place."""
    _fold_norms(model)
    return model


# ---- what is left unmerged ----


def _linear_path(node: object, modules: dict[str, nn.Module]) -> list[object]:
    """Walk back from ``node`` through linear maps, foldable norms and no-ops: the nodes
    passed, ending with the one where the walk stops."""
    path = [node]
    while isinstance(node, torch.fx.Node):
        module = _single_call(node, modules)
        if module is None or not (
            type(module) in NORMS_OF
            or isinstance(module, PASSIVE)
            or isinstance(_norm_rest(module), nn.Identity)
        ):
            break
        node = node.args[0]
        path.append(node)
    return path


def _linears_before(path: list[object], meeting: object, modules: dict[str, nn.Module]) -> list:
    """Names of the linear maps on ``path`` before it reaches ``meeting``."""
    names = []
    for node in path[: path.index(meeting)]:
        if type(_single_call(node, modules)) in NORMS_OF:
            names.append(node.target)
    return names


def _addends(node: torch.fx.Node) -> list[object]:
    """The terms of a sum ``a + b + …``, nested additions (used by nothing else) unrolled."""
    terms = []
    for arg in node.args:
        if _is_addition(arg) and len(arg.users) == 1:
            terms.extend(_addends(arg))
        else:
            terms.append(arg)
    return terms


def _is_addition(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_function" and node.target in ADDITIONS)
        or (node.op == "call_method" and node.target in ("add", "add_"))
    )


def _common_prefix(names: Sequence[str]) -> str:
    parts = [name.split(".") for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _graph_sums(item: _Graph) -> list[str]:
    """Modules in one graph that add two or more linear branches of the same input: terms
    of a sum whose walks back meet, each through a linear map before they do."""
    modules = dict(item.root.named_modules())
    found = []
    for node in item.graph.nodes:
        if not _is_addition(node) or any(_is_addition(user) for user in node.users):
            continue
        paths = [_linear_path(term, modules) for term in _addends(node)]
        linears: set[str] = set()
        for i, first in enumerate(paths):
            for second in paths[i + 1 :]:
                meeting = next((n for n in first if n in second), None)
                if meeting is None:
                    continue
                ours = _linears_before(first, meeting, modules)
                theirs = _linears_before(second, meeting, modules)
                if ours and theirs:
                    linears.update(ours + theirs)
        if linears:
            owner = _common_prefix([name.rpartition(".")[0] for name in sorted(linears)])
            name = (item.prefix + owner).rstrip(".") or "the model"
            found.append(f"{name} ({type(item.root.get_submodule(owner)).__name__})")
    return found


def unmerged_branches(model: nn.Module) -> list[str]:
    """Names of the modules that sum two or more parallel linear branches of one input
    (conv, BN, identity), which one conv could replace: what a conversion left unmerged."""
    leaves: set[int] = set()
    _, graphs = _graphs(model, "", leaves)
    return [name for item in graphs for name in _graph_sums(item)]


# ---- verification ----


@dataclass(frozen=True)
class Verification:
    """How far a deployed model is from the trained one on the same inputs.

    ``max_rel = max|a - b| / max|a|`` (relative to the output's scale; ``inf`` where a
    difference is NaN, so no tolerance accepts it); ``argmax_agreement`` is the share of
    rows whose top class agrees (NaN rows never do), ``None`` where no output is class
    scores ``[batch, classes]``.
    """

    max_abs: float
    max_rel: float
    argmax_agreement: float | None

    def __str__(self) -> str:
        text = f"max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}"
        if self.argmax_agreement is None:
            return text
        return f"{text}, argmax agreement {self.argmax_agreement:.2%}"


def _tensors(output: object, path: str = "output") -> list[tuple[str, Tensor]]:
    """Every tensor in an output (a tensor, or tuples, lists and dicts of them), by path."""
    if isinstance(output, Tensor):
        return [(path, output)]
    if isinstance(output, Mapping):
        return [leaf for key in output for leaf in _tensors(output[key], f"{path}[{key!r}]")]
    if isinstance(output, (tuple, list)):
        return [leaf for i, item in enumerate(output) for leaf in _tensors(item, f"{path}[{i}]")]
    raise DeployError(f"cannot compare {path}: a {type(output).__name__}, not tensors")


def _paired(reference: object, other: object) -> list[tuple[Tensor, Tensor]]:
    """The two outputs' tensors side by side; refuses outputs of different structure or shape."""
    ours, theirs = _tensors(reference), _tensors(other)
    if [path for path, _ in ours] != [path for path, _ in theirs]:
        raise DeployError(
            f"the outputs differ in structure: {[p for p, _ in ours]} vs {[p for p, _ in theirs]}"
        )
    for (path, a), (_, b) in zip(ours, theirs):
        if a.shape != b.shape:
            raise DeployError(
                f"the outputs differ in shape: {path} is {tuple(a.shape)} vs {tuple(b.shape)}"
            )
    return [(a.detach().double(), b.detach().double()) for (_, a), (_, b) in zip(ours, theirs)]


def _argmax_agreement(pairs: list[tuple[Tensor, Tensor]]) -> float | None:
    """Share of rows of the class-score outputs ``[batch, classes]`` whose top class agrees."""
    scores = [(a, b) for a, b in pairs if a.ndim == 2 and a.shape[1] > 1 and a.shape[0] > 0]
    if not scores:
        return None
    agree = [
        (a.argmax(1) == b.argmax(1)) & ~a.isnan().any(1) & ~b.isnan().any(1) for a, b in scores
    ]
    return torch.cat(agree).double().mean().item()


@torch.no_grad()
def verify(
    train_model: Callable[[Tensor], object],
    deploy_model: Callable[[Tensor], object],
    inputs: Tensor,
) -> Verification:
    """Run both on ``inputs`` (modules in eval mode, restored after) and compare the outputs:
    tensors, or tuples, lists and dicts of them, of the same shapes (else a ``DeployError``).

    Either side may be any callable, e.g. an ONNX Runtime session wrapped in a function.
    """
    outputs = []
    for model in (train_model, deploy_model):
        with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
            outputs.append(model(inputs))
    pairs = [(a, b) for a, b in _paired(*outputs) if a.numel()]
    differences = [(a - b).abs() for a, b in pairs]
    if any(d.isnan().any() for d in differences):
        return Verification(math.nan, math.inf, _argmax_agreement(pairs))
    max_abs = max((d.max().item() for d in differences), default=0.0)
    scale = max((a.abs().max().item() for a, _ in pairs), default=0.0)
    max_rel = max_abs / scale if scale > 0 else max_abs
    return Verification(max_abs, max_rel, _argmax_agreement(pairs))
