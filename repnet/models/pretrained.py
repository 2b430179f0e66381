"""Published weights into repnet's models, by rule: each layout is a table of key patterns.

A key of another layout is a block's location plus a part inside the block
(``stage1.0.`` + ``rbr_dense.bn.weight``), or a key of the rest of the net
(``linear.weight``); each has one repnet name (``stages.1.0.`` +
``branches.kxk.0.norm.weight``, ``head.weight``). The same table read the other way
writes repnet weights in that layout. Nothing is guessed: every key must map, and every
mapped tensor must fit the model, or the error lists what did not.

Layouts: ``repvgg`` (DingXiaoH/RepVGG, train ``rbr_*`` and deploy ``rbr_reparam``, SE
``se.down/up``), ``timm`` (timm ``repvgg_*``: ``conv_kxk/conv_1x1/identity``, deploy
``reparam_conv``, SE ``attn.fc1/fc2``), ``dbb`` and ``acb`` (DiverseBranchBlock and ACNet
blocks, wherever they sit: their block keys are mapped, the path to the block is kept),
``repnet`` (repnet's own).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from repnet.errors import CheckpointError

# How published ImageNet weights expect their inputs: pixels in [0, 1], then (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TENSOR = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
FIELDS = {"s": r"\d+", "b": r"\d+", "p": TENSOR, "path": r"(?:[\w]+\.)*"}


@dataclass(frozen=True)
class Rename:
    """A key pattern in another layout and in repnet's. Fields: ``{s}`` a stage and ``{b}`` a
    block number (repnet's stage is ``s + shift``), ``{p}`` a tensor name, ``{path}`` any
    module path. ``identity_added`` marks a 1x1 kernel stored without its identity
    (DBB's ``IdentityBasedConv1x1``: repnet's kernel is the stored one plus ``I``)."""

    theirs: str
    ours: str
    shift: int = 0
    identity_added: bool = False


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, expression in FIELDS.items():
        pattern = pattern.replace(re.escape(f"{{{name}}}"), f"(?P<{name}>{expression})")
    return re.compile(pattern)


@dataclass(frozen=True)
class Layout:
    """Where blocks sit (``locations``), what a block holds (``parts``), the rest (``others``)."""

    markers: tuple[str, ...]
    locations: tuple[Rename, ...]
    parts: tuple[Rename, ...]
    others: tuple[Rename, ...] = ()
    block: str = "repvgg"

    def renames(self) -> list[Rename]:
        """Whole-key rules: every location joined with every part, then the others."""
        joined = [
            Rename(
                where.theirs + part.theirs,
                where.ours + part.ours,
                where.shift,
                part.identity_added,
            )
            for where in self.locations
            for part in self.parts
        ]
        return [*joined, *self.others]


def _block(theirs: str, ours: str, tensors: str = "{p}") -> list[Rename]:
    return [Rename(f"{theirs}.{tensors}", f"{ours}.{tensors}")]


def _conv_bn(theirs: str, ours: str) -> list[Rename]:
    """A conv (bias-free) and its BN: ``conv.weight`` and ``bn.*`` of a ``conv_bn`` pair."""
    return [
        Rename(f"{theirs}.conv.weight", f"{ours}.op.weight"),
        Rename(f"{theirs}.bn.{{p}}", f"{ours}.norm.{{p}}"),
    ]


LAYOUTS: dict[str, Layout] = {
    "repvgg": Layout(
        markers=("rbr_dense.", "rbr_reparam."),
        locations=(Rename("stage0.", "stages.0.0."), Rename("stage{s}.{b}.", "stages.{s}.{b}.")),
        parts=(
            *_conv_bn("rbr_dense", "branches.kxk.0"),
            *_conv_bn("rbr_1x1", "branches.1x1.0"),
            Rename("rbr_identity.{p}", "branches.identity.0.norm.{p}"),
            Rename("rbr_reparam.{p}", "fused.{p}"),
            Rename("se.down.{p}", "act.0.down.{p}"),
            Rename("se.up.{p}", "act.0.up.{p}"),
        ),
        others=(Rename("linear.{p}", "head.{p}"),),
    ),
    "timm": Layout(
        markers=("conv_kxk.", "reparam_conv."),
        locations=(
            Rename("stem.", "stages.0.0."),
            Rename("stages.{s}.{b}.", "stages.{s}.{b}.", shift=1),
        ),
        parts=(
            *_conv_bn("conv_kxk", "branches.kxk.0"),
            *_conv_bn("conv_1x1", "branches.1x1.0"),
            Rename("identity.{p}", "branches.identity.0.norm.{p}"),
            Rename("reparam_conv.{p}", "fused.{p}"),
            Rename("attn.fc1.{p}", "act.0.down.{p}"),
            Rename("attn.fc2.{p}", "act.0.up.{p}"),
        ),
        others=(Rename("head.fc.{p}", "head.{p}"),),
    ),
    "dbb": Layout(
        markers=("dbb_origin.", "dbb_reparam."),
        locations=(Rename("{path}", "{path}"),),
        parts=(
            *_conv_bn("dbb_origin", "branches.kxk.0"),
            *_conv_bn("dbb_1x1", "branches.1x1.0"),
            Rename("dbb_avg.conv.weight", "branches.1x1_avg.0.op.weight"),
            Rename("dbb_avg.bn.bn.{p}", "branches.1x1_avg.0.norm.{p}"),
            Rename("dbb_avg.avgbn.{p}", "branches.1x1_avg.1.norm.{p}"),
            Rename(
                "dbb_1x1_kxk.idconv1.weight", "branches.1x1_kxk.0.op.weight", identity_added=True
            ),
            Rename("dbb_1x1_kxk.bn1.bn.{p}", "branches.1x1_kxk.0.norm.{p}"),
            Rename("dbb_1x1_kxk.conv2.weight", "branches.1x1_kxk.1.op.weight"),
            Rename("dbb_1x1_kxk.bn2.{p}", "branches.1x1_kxk.1.norm.{p}"),
            Rename("dbb_reparam.{p}", "fused.{p}"),
        ),
        block="dbb",
    ),
    "acb": Layout(
        markers=("square_conv.", "fused_conv."),
        locations=(Rename("{path}", "{path}"),),
        parts=(
            Rename("square_conv.weight", "branches.kxk.0.op.weight"),
            Rename("square_bn.{p}", "branches.kxk.0.norm.{p}"),
            Rename("ver_conv.weight", "branches.kx1.0.op.weight"),
            Rename("ver_bn.{p}", "branches.kx1.0.norm.{p}"),
            Rename("hor_conv.weight", "branches.1xk.0.op.weight"),
            Rename("hor_bn.{p}", "branches.1xk.0.norm.{p}"),
            Rename("fused_conv.{p}", "fused.{p}"),
        ),
        block="acb",
    ),
}
# Keys a layout holds that no rule maps, and why (said in the error).
UNMAPPABLE = {
    "dbb_1x1_kxk.conv1.": "a DBB 1x1→kxk branch whose inner width differs from its input "
    "channels (repnet's 1x1_kxk keeps the input width)",
    "dbb_avg.avgbn.": "a DBB average branch without its 1x1 conv (a depthwise DBB; repnet's "
    "1x1_avg always has the 1x1)",
    "last_bn.": "an ACNet block with a BN after the sum (not a repnet block)",
}


def _identity_1x1(like: Tensor) -> Tensor:
    """The identity as a ``[C, C/g, 1, 1]`` kernel: ``I[o, o mod C/g] = 1``."""
    channels, per_group = like.shape[0], like.shape[1]
    eye = torch.zeros_like(like)
    rows = torch.arange(channels)
    eye[rows, rows % per_group] = 1
    return eye


def _apply(renames: list[Rename], key: str, value: Tensor, to_ours: bool):
    """``(key, value)`` renamed by the first matching rule, or ``None``."""
    for rule in renames:
        source, target = (rule.theirs, rule.ours) if to_ours else (rule.ours, rule.theirs)
        match = _regex(source).fullmatch(key)
        if match is None:
            continue
        fields = match.groupdict()
        if "s" in fields:
            fields["s"] = str(int(fields["s"]) + (rule.shift if to_ours else -rule.shift))
            if int(fields["s"]) < 0:
                continue
        if rule.identity_added:
            value = value + _identity_1x1(value) if to_ours else value - _identity_1x1(value)
        return target.format(**fields), value
    return None


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """The layout whose marker keys ``state`` holds (``repnet`` for repnet's own)."""
    for name, layout in LAYOUTS.items():
        if any(marker in key for key in state for marker in layout.markers):
            return name
    if any(".branches." in key or ".fused." in key for key in state):
        return "repnet"
    raise CheckpointError(
        "these weights are in no known layout (RepVGG, timm repvgg, DBB, ACNet or repnet); "
        f"first keys: {', '.join(list(state)[:5])}"
    )


def _renamed(state: Mapping[str, Tensor], layout: str, to_ours: bool) -> dict[str, Tensor]:
    """``state`` in the other naming; refuses keys no rule maps, naming them (and why)."""
    if layout == "repnet":
        return dict(state)
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; layouts: repnet, {', '.join(LAYOUTS)}")
    renames = LAYOUTS[layout].renames()
    out, unmapped = {}, []
    for key, value in state.items():
        renamed = _apply(renames, key, value, to_ours)
        if renamed is None:
            unmapped.append(key)
        else:
            out[renamed[0]] = renamed[1]
    if unmapped:
        reasons = sorted({why for part, why in UNMAPPABLE.items() for k in unmapped if part in k})
        raise CheckpointError(
            f"{len(unmapped)} keys of the {layout} layout do not map to repnet: "
            f"{_listed(unmapped)}" + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    return out


def to_repnet(state: Mapping[str, Tensor], layout: str = "auto") -> dict[str, Tensor]:
    """Weights of another layout renamed (and, for DBB's identity-based 1x1, re-valued) to
    repnet's keys."""
    return _renamed(state, detect_layout(state) if layout == "auto" else layout, to_ours=True)


def from_repnet(state: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """repnet weights written in another layout's keys: the rule of :func:`to_repnet` reversed."""
    return _renamed(state, layout, to_ours=False)


def _listed(keys: list[str], shown: int = 8) -> str:
    more = f" … ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def classifier_name(model: nn.Module) -> str:
    """The name of the model's classifier: its last ``nn.Linear``."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise CheckpointError(f"{type(model).__name__} has no nn.Linear classifier")
    return names[-1]


@dataclass(frozen=True)
class PretrainedReport:
    """What :func:`load_pretrained` did: the layout read, tensors loaded, tensors left as
    initialised (a classifier for another class count); for :func:`build_pretrained` also
    the model's ``build_model`` keywords."""

    layout: str
    loaded: int
    reinitialised: tuple[str, ...] = field(default_factory=tuple)
    architecture: dict = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors ({self.layout} layout)"
        if self.reinitialised:
            text += (
                f"; the class count differs, so {', '.join(self.reinitialised)} were re-initialised"
            )
        return text


def read_weights(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict from a file (``.pt``/``.pth``/``.ckpt``/``.safetensors``, read as plain
    weights only) or a mapping already."""
    if isinstance(source, Mapping):
        return dict(source)
    from repnet.checkpoints import load_checkpoint

    return load_checkpoint(source).state_dict


def _mismatches(model: nn.Module, state: Mapping[str, Tensor], head: str) -> tuple[list, list]:
    """``(problems, head keys to keep)``: problems name missing, unexpected and resized keys;
    a classifier of another size is kept as initialised instead."""
    expected = model.state_dict()
    keep = [
        key
        for key in expected
        if key.startswith(f"{head}.") and key in state and state[key].shape != expected[key].shape
    ]
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and k not in keep and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("resized", resized))
        if keys
    ]
    return problems, keep


def load_pretrained(
    model: nn.Module, source: str | Path | Mapping[str, Tensor], layout: str = "auto"
) -> PretrainedReport:
    """Load published or repnet weights into ``model`` (train or deploy form, matching the
    weights), in place. A classifier of another class count stays as initialised (reported);
    anything else that does not fit is refused with a :class:`CheckpointError` listing it."""
    state = read_weights(source)
    layout = detect_layout(state) if layout == "auto" else layout
    state = to_repnet(state, layout)
    head = classifier_name(model)
    problems, keep = _mismatches(model, state, head)
    if problems:
        raise CheckpointError(
            f"the {layout} weights do not fit this {type(model).__name__}: {'; '.join(problems)}"
        )
    for key in keep:
        del state[key]
    model.load_state_dict(state, strict=False)
    return PretrainedReport(layout, len(state), tuple(keep))


def is_deploy_form(state: Mapping[str, Tensor]) -> bool:
    """Whether repnet-named weights hold fused convs rather than branches."""
    return any(".fused." in key for key in state) and not any(".branches." in key for key in state)


def build_pretrained(
    name: str,
    source: str | Path | Mapping[str, Tensor],
    num_classes: int | None = None,
    layout: str = "auto",
    **options,
) -> tuple[nn.Module, PretrainedReport]:
    """Model ``name`` holding published weights, in their form (train, or deployed for fused
    weights) and eval mode. ``num_classes`` defaults to the weights', the input channels to
    3 (``in_channels=`` for others), the block to the layout's (``repvgg``, ``dbb``,
    ``acb``); the report's ``architecture`` is the ``build_model`` keywords used."""
    from repnet.models import build_model
    from repnet.reparam import reparameterize

    state = read_weights(source)
    layout = detect_layout(state) if layout == "auto" else layout
    ours = to_repnet(state, layout)
    if layout in LAYOUTS:
        options.setdefault("block", LAYOUTS[layout].block)
    if num_classes is None and "head.weight" in ours:
        num_classes = ours["head.weight"].shape[0]
    if num_classes is not None:
        options["num_classes"] = num_classes
    options.setdefault("in_channels", 3)
    architecture = {"name": name, **options}
    try:
        if not is_deploy_form(ours):
            model = build_model(**architecture)
            report = load_pretrained(model, ours, "repnet")
            return model.eval(), replace(report, layout=layout, architecture=architecture)
        with torch.device("meta"):
            model = reparameterize(build_model(**architecture), inplace=True)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"cannot build {name!r} with {options}: {error}") from None
    problems, keep = _mismatches(model, ours, classifier_name(model))
    if problems or keep:
        problems += [f"resized: {key}" for key in keep]
        raise CheckpointError(
            f"the {layout} weights do not fit a deployed {name}: {'; '.join(problems)}"
        )
    model.load_state_dict(ours, strict=False, assign=True)
    empty = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if empty:
        raise CheckpointError(f"the {layout} weights leave {_listed(empty)} of {name} unset")
    return model.eval(), PretrainedReport(layout, len(ours), architecture=architecture)


def head_and_backbone(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The classifier's parameters and the rest, for a lower backbone learning rate."""
    head = model.get_submodule(classifier_name(model))
    ids = {id(p) for p in head.parameters()}
    return list(head.parameters()), [p for p in model.parameters() if id(p) not in ids]
