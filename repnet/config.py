"""Config schemas: every option a user sets is typed and ranged, and checked before any work.

Two sources of truth, both declarative: the type hints of whatever a config node builds
(``_target_``: a data module, ``pl.Trainer``, a torch optimizer, a callback — their
signatures, ranges given as ``Annotated[int, Field(ge=1)]`` in repnet's own), and the
pydantic models below for the values repnet reads itself. A bad value is one
:class:`~repnet.errors.UsageError` line naming the option and what it accepts.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Annotated, Any, Literal, TypeVar

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue
from pydantic import BaseModel, ConfigDict, Field, FilePath, ValidationError, create_model

from repnet.errors import UsageError

Settings = TypeVar("Settings", bound=BaseModel)

Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # what numpy, torch and Lightning all accept
Fraction = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class Open(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)


class OptimizerRanges(Open):
    """Ranges every torch optimizer shares; its own signature gives the types."""

    lr: NonNegative | None = None
    weight_decay: NonNegative | None = None
    momentum: NonNegative | None = None
    eps: NonNegative | None = None
    betas: tuple[Beta, Beta] | None = None


class TrainerLimits(Open):
    """What repnet needs of ``pl.Trainer``'s options beyond their types: a finite schedule
    (``max_epochs`` ≥ 1) and a process count a machine can hold."""

    max_epochs: Annotated[int, Field(ge=1)] = 1
    devices: Annotated[int, Field(ge=-1, le=64)] | str | list[int] = "auto"
    num_nodes: Annotated[int, Field(ge=1, le=4096)] = 1


class ModelSettings(Open):
    """``model``: the backbone's own options (checked by building it) and weights to start
    from: published (official or timm RepVGG, DBB, ACNet blocks) or repnet's own."""

    name: str
    pretrained: FilePath | None = None


class OptimSettings(Strict):
    """``optim``: the optimizer and scheduler (``_target_`` configs checked against what
    they build), when the schedule steps, and the backbone's learning rate as a fraction of
    the classifier's (below 1 to fine-tune pretrained weights gently)."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None
    interval: Literal["step", "epoch"] = "step"
    backbone_lr: Fraction = 1.0


class TrainSettings(Strict):
    """The top-level values of ``train.yaml``; each group is checked on its own."""

    seed: Seed = 0
    label_smoothing: Fraction = 0.0
    num_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    ckpt_path: FilePath | None = None
    paths: dict[str, str]
    data: dict[str, Any]
    model: dict[str, Any]
    block: dict[str, Any]
    optim: dict[str, Any]
    trainer: dict[str, Any]
    callbacks: dict[str, Any] | None = None
    logger: dict[str, Any] | None = None


def one_line(errors: list[dict[str, Any]], prefix: str = "") -> str:
    """The first bad option of pydantic's errors: ``data.batch_size: Input should be greater
    than or equal to 1 (got 0)``; a union's alternatives are joined with ``or``."""
    field = errors[0]["loc"][:1]
    alternatives = [e for e in errors if e["loc"][:1] == field]
    key = ".".join(str(part) for part in (prefix, *field) if part != "")
    messages = "; or ".join(dict.fromkeys(e["msg"] for e in alternatives))
    given = alternatives[0].get("input")
    shown = "" if isinstance(given, Mapping) else f" (got {given!r})"
    return f"{key}: {messages}{shown}"


def validate(
    schema: type[Settings], values: Mapping[str, Any], prefix: str = "", given: tuple = ()
) -> Settings | None:
    """``values`` checked against ``schema`` and returned as its settings, or one
    :class:`UsageError` line; arguments the code passes itself (``given``, e.g. an optimizer's
    ``params``) are not asked of the user (``None`` is returned when only those are missing)."""
    placeholders = {name: None for name in given if name in schema.model_fields}
    try:
        return schema.model_validate({**placeholders, **values})
    except ValidationError as error:
        errors = [e for e in error.errors() if e["loc"][0] not in placeholders]
        if errors:
            raise UsageError(one_line(errors, prefix)) from None
        return None


@cache
def signature_schema(target: Callable) -> type[BaseModel]:
    """A pydantic model of ``target``'s keyword arguments, from its signature and type hints
    (a class: its ``__init__``); extra keys are refused unless it takes ``**kwargs``."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except NameError:  # a hint names a type imported only for type checkers: names only
        hints = {}
    parameters = inspect.signature(function).parameters.values()
    fields = {
        p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default)
        for p in parameters
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    base = Open if takes_any else Strict
    return create_model(f"{getattr(target, '__name__', 'target')}Options", __base__=base, **fields)


def check_target(node: Mapping[str, Any], prefix: str, given: tuple[str, ...] = ()) -> None:
    """A ``_target_`` node's options against the signature of what it builds; a nested
    ``_target_`` node is checked the same way, in place of the value it builds."""
    try:
        target = get_object(node["_target_"])
    except Exception as error:  # Hydra raises several kinds for a name that does not import
        raise UsageError(f"{prefix}._target_: cannot import {node['_target_']!r}") from error
    options = {k: v for k, v in node.items() if not k.startswith("_")}
    nested = {k: v for k, v in options.items() if isinstance(v, Mapping) and "_target_" in v}
    for key, value in nested.items():
        check_target(value, f"{prefix}.{key}")
    validate(signature_schema(target), options, prefix, (*given, *nested))


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, interpolations resolved; a required value left ``???`` or an
    interpolation that cannot resolve is one :class:`UsageError` naming the key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise UsageError(f"{error.full_key} is required ({error.full_key}=...)") from None
    except InterpolationResolutionError as error:
        raise UsageError(f"{error.full_key}: {str(error).splitlines()[0]}") from None


def check_block(options: Mapping[str, Any]) -> None:
    """Block options against the signature of the block kind they build."""
    from repnet.models.blocks import KINDS

    options = dict(options)
    kind = options.pop("kind", "rep")
    if kind not in KINDS:
        raise UsageError(f"block.kind: must be one of {list(KINDS)} (got {kind!r})")
    geometry = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
    validate(signature_schema(KINDS[kind]), options, "block", (*geometry, "groups", "act"))


def check_train_config(cfg: DictConfig) -> dict[str, Any]:
    """Every option of a training config checked; returns the plain, resolved config."""
    values = plain(cfg)
    validate(TrainSettings, values)
    check_target(values["data"], "data")
    validate(ModelSettings, values["model"], "model")
    check_block(values["block"])
    validate(TrainerLimits, values["trainer"], "trainer")
    check_target(values["trainer"], "trainer")
    for name, node in (values.get("callbacks") or {}).items():
        if node:
            check_target(node, f"callbacks.{name}")
    for name, node in (values.get("logger") or {}).items():
        if node:
            check_target(node, f"logger.{name}", given=("save_dir",))
    validate(OptimSettings, values["optim"], "optim")
    optimizer, scheduler = values["optim"]["optimizer"], values["optim"].get("scheduler")
    options = {k: v for k, v in optimizer.items() if not k.startswith("_")}
    validate(OptimizerRanges, options, "optim.optimizer")
    check_target(optimizer, "optim.optimizer", given=("params",))
    if scheduler:
        check_target(scheduler, "optim.scheduler", given=("optimizer", "total_steps"))
    return values
