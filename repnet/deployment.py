"""From a training checkpoint to a verified deploy form, its files and a cost report.

``deploy`` is six steps, one function each: :func:`load` (checkpoint, run config and the
recorded architecture, all checked as untrusted input), :func:`convert`, :func:`check`,
:func:`write`, :func:`export` and :func:`report`. The folder is replaced whole
(:func:`repnet.checkpoints.replacing`): a reader sees the old set or the new one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from omegaconf import OmegaConf
from pydantic import Field
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from repnet import quantize
from repnet.checkpoints import check_manifest, load_checkpoint, replacing, write_whole
from repnet.config import Open, Seed, Strict, validate
from repnet.errors import DeployError, UsageError
from repnet.export import EXPORTERS, Runner, onnx_with_metadata
from repnet.models import build_model, build_pretrained
from repnet.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from repnet.quantize import Calibration
from repnet.reparam import Verification, reparameterize, verify

CONFIG_NAME, WEIGHTS_NAME = "config.yaml", "model.safetensors"
CARD_NAME = "config.json"  # the deploy folder's description of its model
# What a checkpoint or config may ask deploy to build and feed: beyond these it is refused.
MAX_CLASSES = 100_000
MAX_INPUT_CHANNELS = 64
MAX_INPUT_SIDE = 4096
MAX_VERIFY_VALUES = 2**28  # numbers in one batch of verification inputs (1 GiB of float32)
MAX_CONFIG_BYTES = 2**20

Count = Annotated[int, Field(ge=1, le=1024, strict=True)]
Channels = Annotated[int, Field(ge=1, le=MAX_INPUT_CHANNELS, strict=True)]
Side = Annotated[int, Field(ge=1, le=MAX_INPUT_SIDE, strict=True)]


class DeployOptions(Strict):
    """``deploy``'s options (``command_configs/deploy.yaml``) with the values each accepts."""

    ckpt_path: Path
    config: Path | None = None
    model: str | None = None
    input_size: tuple[Channels, Side, Side] | None = None
    out_dir: Path | None = None
    export: list[Literal["onnx", "pt2", "onnx_int8"]] = Field(default_factory=list)
    export_batch: Count | None = None
    max_rel: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 1e-4
    random_inputs: Count = 8
    real_batches: Annotated[int, Field(ge=0, le=64, strict=True)] = 4
    latency_seconds: Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)] = 0.05
    seed: Seed = 0
    max_int8_drop: Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)] = 1.0
    int8_calibration: Calibration = "minmax"
    int8_per_channel: Annotated[bool, Field(strict=True)] = True
    calibration_images: Annotated[int, Field(ge=1, le=65536, strict=True)] = 256


class Preprocessing(Strict):
    """``ImageClassificationDataModule.preprocessing``: timm's ``pretrained_cfg`` keys for
    resize, crop and normalisation, and the class names."""

    input_size: tuple[Channels, Side, Side]
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    crop_pct: Annotated[float, Field(gt=0, le=1)] = 1.0
    crop_mode: Literal["center"] = "center"
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]
    label_names: list[str] | None = None


IMAGENET = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": 224 / 256}


class Architecture(Open):
    """``build_model``'s keywords as a run records them; the ranges bound what an untrusted
    checkpoint or config can make deploy build (the model checks the rest)."""

    name: str
    num_classes: Annotated[int, Field(ge=1, le=MAX_CLASSES, strict=True)]
    in_channels: Channels


class Recorded(Open):
    """What a run records of its model: ``architecture``, one sample's ``[C, H, W]`` and how
    an image file becomes an input (``preprocessing``, absent in older runs)."""

    architecture: dict[str, Any]
    input_size: tuple[Channels, Side, Side]
    preprocessing: Preprocessing | None = None


@dataclass
class Source:
    """A checkpoint's model, loaded: the weights in their architecture, train or deploy form."""

    path: Path
    model: nn.Module
    architecture: dict[str, Any]
    input_size: list[int]
    run_config: dict[str, Any] | None
    preprocessing: dict[str, Any]


@dataclass
class DeployReport:
    """What ``deploy`` checked, wrote and measured (``int8``: the int8 export's accuracy)."""

    out_dir: Path
    checks: dict[str, Verification]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    int8: quantize.Int8Accuracy | None = None

    def table(self) -> str:
        header = ("form", "parameters", "MFLOPs/image", "CPU ms, batch 1", "file", "MB")
        lines = [header] + [tuple(str(row.get(key, "")) for key in header) for row in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


# ---- load ----


def _yaml_text(path: Path) -> str:
    """The file's text, refused when over ``MAX_CONFIG_BYTES``, nested over 1000 deep (the
    pure-Python YAML scanner is quadratic in depth) or holding YAML aliases (an alias bomb
    expands exponentially; configs never need them). libyaml scans it: linear, depth-capped."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise DeployError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a config")
    text = path.read_text()
    if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, yaml.CSafeLoader)):
        raise DeployError(f"{path} uses YAML aliases (*name), which configs here never need")
    return text


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping as plain data: nothing resolved (``${oc.env:…}`` stays text), nothing
    instantiated, size and aliases bounded."""
    try:
        content = OmegaConf.to_container(OmegaConf.create(_yaml_text(path)), resolve=False)
    except DeployError:
        raise
    except Exception as error:  # OS, decoding, YAML and omegaconf errors of many kinds
        raise DeployError(f"{path} is not a readable YAML config ({_first_line(error)})") from None
    if not isinstance(content, dict):
        raise DeployError(f"{path} is not a config mapping")
    return content


def find_run_config(ckpt_path: Path, config: Path | None) -> tuple[Path, dict] | None:
    """The given config file, else ``config.yaml`` beside the checkpoint or one folder up."""
    if config is not None:
        if not config.is_file():
            raise DeployError(f"no config file at {config}")
        return config, read_yaml(config)
    for candidate in (ckpt_path.parent / CONFIG_NAME, ckpt_path.parent.parent / CONFIG_NAME):
        if candidate.is_file():
            return candidate, read_yaml(candidate)
    return None


Description = tuple[dict[str, Any], list[int], dict[str, Any] | None]


def recorded(where: Path, source: Mapping[str, Any]) -> Description:
    """``build_model`` keywords, ``[C, H, W]`` and the preprocessing (``None``: not
    recorded) from a run's record, checked like user input."""
    try:
        validate(Recorded, source)
        validate(Architecture, source["architecture"], "architecture")
    except UsageError as error:
        raise DeployError(f"{where}: {error}") from None
    return dict(source["architecture"]), list(source["input_size"]), source.get("preprocessing")


def describe(
    ckpt_path: Path, hyper_parameters: Any, run_config: tuple[Path, dict] | None
) -> Description:
    """The architecture, input size and preprocessing from the run config, else from the
    checkpoint, else from a deploy folder's ``config.json`` beside it."""
    for where, source in (run_config or (None, None), (ckpt_path, hyper_parameters)):
        if isinstance(source, dict) and "architecture" in source and "input_size" in source:
            return recorded(where, source)
    if (ckpt_path.parent / CARD_NAME).is_file():  # weights in a deploy folder
        return read_card(ckpt_path.parent / CARD_NAME)
    raise DeployError(
        "cannot tell the architecture: the checkpoint holds none and no run config.yaml was "
        "found beside it; pass config=<run>/config.yaml"
    )


def _mismatch(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """How ``state`` does not fit ``model``: keys missing or unexpected, shapes, or a kind of
    number (floating or not) other than the model's."""
    expected = model.state_dict()
    common = [k for k in expected if k in state]
    found = {
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "resized": [
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in common
            if state[k].shape != expected[k].shape
        ],
        "retyped": [
            f"{k} {state[k].dtype} vs {expected[k].dtype}"
            for k in common
            if state[k].is_floating_point() != expected[k].is_floating_point()
            or state[k].is_complex()
        ],
    }
    return [
        f"{label}: {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''} ({len(keys)})"
        for label, keys in found.items()
        if keys
    ]


def _build(architecture: dict[str, Any]) -> nn.Module:
    try:
        return build_model(**architecture)
    except (TypeError, ValueError) as error:
        raise DeployError(f"the recorded architecture cannot be built: {error}") from None


def deploy_skeleton(architecture: dict[str, Any]) -> nn.Module:
    """The deploy form's modules, weightless: the train form built on the meta device (no
    memory, no initialisation) and converted; :func:`fill` loads it."""
    with torch.device("meta"):
        return reparameterize(_build(architecture), inplace=True)


def fill(model: nn.Module, state: dict[str, Tensor], what: str) -> nn.Module:
    """``state`` assigned into ``model`` (floating tensors in the model's dtype), in eval
    mode; refused where it does not fit or leaves a tensor on the meta device."""
    if problems := _mismatch(model, state):
        raise DeployError(f"{what}: {'; '.join(problems)}")
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    empty = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise DeployError(f"{what}: {', '.join(empty[:6])} not in the weights")
    return model.eval()


def load_model(architecture: dict[str, Any], state: dict[str, Tensor]) -> nn.Module:
    """The model the weights belong to, in train form or (weights already deployed) deploy
    form; both are matched on the meta device, so nothing is allocated before the weights fit."""
    what = (
        f"the checkpoint is not a {architecture.get('name')} with block {architecture.get('block')}"
    )
    with torch.device("meta"):
        problems = _mismatch(_build(architecture), state)
    if not problems:
        return fill(_build(architecture), state, what)
    skeleton = deploy_skeleton(architecture)
    if _mismatch(skeleton, state):
        raise DeployError(f"{what}: {'; '.join(problems)}")
    return fill(skeleton, state, what)


def load(options: DeployOptions, run_config: tuple[Path, dict] | None) -> Source:
    """Step 1: the weights (``weights_only``, checksums checked) in their checked architecture:
    a repnet run's, or published weights of ``options.model`` (any layout
    :func:`~repnet.models.build_pretrained` reads)."""
    if options.model is not None:
        return load_published(options)
    checkpoint = load_checkpoint(options.ckpt_path)
    architecture, input_size, preprocessing = describe(
        options.ckpt_path, checkpoint.hyper_parameters, run_config
    )
    model = load_model(architecture, checkpoint.state_dict)
    config = run_config[1] if run_config else None
    return Source(options.ckpt_path, model, architecture, input_size, config, preprocessing)


def load_published(options: DeployOptions) -> Source:
    """Published weights as ``options.model``; inputs of ``options.input_size`` (default
    ``[3, 224, 224]``) preprocessed as ImageNet models are."""
    channels = options.input_size[0] if options.input_size else 3
    model, report = build_pretrained(options.model, options.ckpt_path, in_channels=channels)
    architecture = report.architecture
    try:
        validate(Architecture, architecture, "architecture")
    except UsageError as error:
        raise DeployError(f"{options.ckpt_path}: {error}") from None
    input_size = list(options.input_size or (architecture["in_channels"], 224, 224))
    preprocessing = {"input_size": input_size, "interpolation": "bilinear", **IMAGENET}
    return Source(options.ckpt_path, model, architecture, input_size, None, preprocessing)


# ---- convert, check ----


def convert(source: Source, options: DeployOptions) -> nn.Module:
    """Step 2: the deploy form; exporting a module that says it ``needs_fixed_batch`` (its
    graph depends on the batch size) asks for ``export_batch``."""
    deployed = reparameterize(source.model)
    fixed = [m for m in deployed.modules() if getattr(m, "needs_fixed_batch", False)]
    if options.export and options.export_batch is None and fixed:
        raise DeployError(
            f"{type(fixed[0]).__name__} exports only for a fixed batch (its graph depends on "
            "the batch size): pass export_batch=N"
        )
    return deployed


@dataclass
class RealData:
    """Images of the run's own data with their labels, or ``None`` and a note saying why not."""

    images: Tensor | None
    labels: Tensor | None
    note: str


def run_datamodule(run_config: dict | None) -> tuple[Any, str]:
    """The run's data module (not set up), or ``None`` and why not.

    The config is untrusted: only repnet's own data modules are built, from plain values.
    """
    data = dict(run_config.get("data") or {}) if run_config is not None else {}
    if not data:
        return None, "no real data"
    from repnet.data import DATAMODULES  # Lightning: only when there is data to read

    classes = {getattr(f, "func", f) for f in DATAMODULES.values()}
    datamodule_class = {f"{c.__module__}.{c.__qualname__}": c for c in classes}.get(
        str(data.pop("_target_", ""))
    )
    if "download" in data:
        data["download"] = False  # deploying never downloads
    plain = all(isinstance(v, str | int | float | bool | type(None)) for v in data.values())
    if datamodule_class is None or not plain:
        return None, "the run's data is not a plain repnet dataset config"
    try:
        return datamodule_class(**data), ""
    except Exception as error:
        return None, f"real data unavailable ({type(error).__name__}: {error})"


def validation_batch(run_config: dict | None, batches: int) -> RealData:
    """``batches`` batches of real validation images and labels from the run's data, when it
    is a repnet dataset that is here."""
    datamodule, why = run_datamodule(run_config) if batches >= 1 else (None, "no real data")
    if datamodule is None:
        return RealData(None, None, f"{why}: random inputs only")
    try:
        datamodule.setup("validate")
        loader = iter(datamodule.val_dataloader())
        parts = zip(*[next(loader) for _ in range(batches)])  # (images, labels) per batch
        images, labels = (torch.cat(part) for part in parts)
    except (Exception, StopIteration) as error:
        note = f"real data unavailable ({type(error).__name__}: {error}): random inputs only"
        return RealData(None, None, note)
    return RealData(images, labels, f"{len(images)} real validation images")


def training_images(run_config: dict | None, count: int, seed: int) -> RealData:
    """The first ``count`` images (fewer if the split is smaller) of the run's training data
    as its train loader gives them (shuffled, augmented; seeded), to calibrate int8 on."""
    datamodule, why = run_datamodule(run_config)
    if datamodule is None:
        return RealData(None, None, why)
    parts, total = [], 0
    try:
        datamodule.setup("fit")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for images, _ in datamodule.train_dataloader():
                parts.append(images)
                total += len(images)
                if total >= count:
                    break
    except Exception as error:
        return RealData(None, None, f"training data unavailable ({_first_line(error)})")
    if not parts:
        return RealData(None, None, "the training split is empty")
    images = torch.cat(parts)[:count]
    return RealData(images, None, f"{len(images)} training images")


def random_inputs(source: Source, options: DeployOptions) -> Tensor:
    """Seeded normal inputs: ``random_inputs`` of them, at least 2 and ``export_batch``."""
    count = max(2, options.random_inputs, options.export_batch or 0)
    if count * math.prod(source.input_size) > MAX_VERIFY_VALUES:
        raise DeployError(
            f"{count} inputs of size {source.input_size} exceed {MAX_VERIFY_VALUES:,} numbers; "
            "lower random_inputs or export_batch"
        )
    generator = torch.Generator().manual_seed(options.seed)
    return torch.randn(count, *source.input_size, generator=generator)


def refuse_if_over(checks: dict[str, Verification], max_rel: float, what: str) -> None:
    for name, result in checks.items():
        if not result.max_rel <= max_rel:
            raise DeployError(
                f"{what} differs from the trained model on {name}: {result} "
                f"(tolerance max_rel={max_rel:g}); nothing was written"
            )


def check(
    source: Source, deployed: nn.Module, inputs: Tensor, options: DeployOptions
) -> tuple[dict[str, Verification], RealData]:
    """Step 3: the deploy form against the train form on random and real inputs, within
    ``max_rel``; returns the checks and the real data used (images, labels, a note)."""
    try:
        checks = {"random inputs": verify(source.model, deployed, inputs)}
    except RuntimeError as error:
        raise DeployError(
            f"the model does not take inputs of size {source.input_size}: {_first_line(error)}"
        ) from None
    real = validation_batch(source.run_config, options.real_batches)
    if real.images is not None:
        checks["real validation data"] = verify(source.model, deployed, real.images)
    refuse_if_over(checks, options.max_rel, "the deploy form")
    return checks, real


# ---- write, export ----


def model_card(source: Source, checks: dict[str, Verification]) -> dict[str, Any]:
    """``config.json``: the model in the keys timm and the Hugging Face hub use
    (``architecture``, ``num_classes``, ``pretrained_cfg`` with resize, crop and
    normalisation, ``label_names``), ``model_args`` for ``build_model``, and repnet's record
    (version, source file name, checks). No path of this machine."""
    architecture = dict(source.architecture)
    name, num_classes = architecture.pop("name"), architecture.pop("num_classes")
    preprocessing = dict(source.preprocessing or {"input_size": source.input_size})
    labels = preprocessing.pop("label_names", None) or [str(i) for i in range(num_classes)]
    return {
        "architecture": name,
        "num_classes": num_classes,
        "model_args": architecture,
        "pretrained_cfg": {**preprocessing, "num_classes": num_classes},
        "label_names": labels,
        "repnet": {
            "version": version("repnet"),
            "form": "deploy",
            "source": source.path.name,
            "verification": {name: vars(result) for name, result in checks.items()},
        },
    }


def read_card(path: Path) -> Description:
    """A ``config.json`` as ``(architecture, input_size, preprocessing)``, checked like any
    untrusted record."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise DeployError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a config")
        text = path.read_text()
    except OSError as error:
        raise DeployError(f"{path} cannot be read ({_first_line(error)})") from None
    return card_description(text, path)


def card_description(text: str, where: Path) -> Description:
    """A model card's JSON text (from ``config.json`` or a file's metadata) as
    ``(architecture, input_size, preprocessing)``."""
    try:
        card = json.loads(text)
        preprocessing = dict(card["pretrained_cfg"])
        if "label_names" in card:
            preprocessing["label_names"] = card["label_names"]
        preprocessing.pop("num_classes", None)
        architecture = {
            "name": card["architecture"],
            "num_classes": card["num_classes"],
            **card["model_args"],
        }
        record = {"architecture": architecture, "input_size": preprocessing["input_size"]}
    except Exception as error:  # decoding, JSON, depth, type and key errors of many kinds
        raise DeployError(f"{where} holds no model card ({_first_line(error)})") from None
    if "mean" in preprocessing:  # recorded by the run (not by runs of older versions)
        record["preprocessing"] = preprocessing
    return recorded(where, record)


def write(folder: Path, source: Source, deployed: nn.Module, checks: dict) -> dict[str, Any]:
    """Step 4: the deploy-form weights (the model card in their ``__metadata__``) and the
    model card, ``config.json``; returns the card."""
    card = model_card(source, checks)
    state = {k: v.contiguous() for k, v in deployed.state_dict().items()}
    metadata = {"config": json.dumps(card)}  # one key: a map of several is written in any order
    write_whole(folder / WEIGHTS_NAME, safetensors_bytes(state, metadata=metadata))
    write_whole(folder / CARD_NAME, json.dumps(card, indent=2).encode())
    return card


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def exported(
    name: str, model: nn.Module, example: Tensor, folder: Path, dynamic: bool, **settings: Any
) -> Runner:
    """One export written into ``folder`` (an ONNX file with the model card, ``config``, in
    its metadata) and loaded back from its file; ``settings`` go to its ``serialize`` (a
    lossy export's calibration data and options)."""
    target = EXPORTERS[name]
    try:
        blob = target.serialize(model, example, dynamic, **settings)
        if target.filename.endswith(".onnx"):  # the model card, as config.json holds it
            card = (folder / CARD_NAME).read_text()
            blob = onnx_with_metadata(blob, {"config": card, "repnet_version": version("repnet")})
        write_whole(folder / target.filename, blob)
        return target.load(folder / target.filename)
    except (DeployError, OSError):
        raise
    except Exception as error:  # the exporters fail in many ways on unsupported graphs
        raise DeployError(f"export {name!r} failed: {_first_line(error)}") from None


def export(
    folder: Path, deployed: nn.Module, example: Tensor, options: DeployOptions, checks: dict
) -> dict[str, Runner]:
    """Step 5: each lossless format asked for, written, loaded back and checked on
    ``example``; a lossy one is :func:`export_int8`'s."""
    runners = {}
    for name in dict.fromkeys(options.export):  # each once, in the order given
        if EXPORTERS[name].lossy:
            continue
        runner = exported(name, deployed, example, folder, options.export_batch is None)
        result = verify(deployed, runner, example)
        refuse_if_over({name: result}, options.max_rel, f"the {name} export")
        checks[f"{name} vs deploy form"], runners[name] = result, runner
    return runners


# ---- int8 ----

INT8 = "onnx_int8"
CALIBRATION_BATCH = 64  # images per calibration batch where the export takes any batch


@dataclass
class Int8Data:
    """What the int8 export is calibrated on (equal batches of the run's training images)
    and checked on (its labelled validation images)."""

    calibration: list[Any]  # numpy arrays, as ONNX Runtime takes them
    images: Tensor
    labels: Tensor
    note: str


def int8_data(source: Source, options: DeployOptions, real: RealData) -> Int8Data | None:
    """Calibration batches and labelled validation images when ``onnx_int8`` is asked for;
    refused where the run's training or validation data is not here (random inputs would
    calibrate nothing meaningful and measure no accuracy)."""
    if INT8 not in options.export:
        return None
    if options.calibration_images * math.prod(source.input_size) > MAX_VERIFY_VALUES:
        raise DeployError(
            f"{options.calibration_images} calibration images of size {source.input_size} "
            f"exceed {MAX_VERIFY_VALUES:,} numbers; lower calibration_images"
        )
    train = training_images(source.run_config, options.calibration_images, options.seed)
    if train.images is None:
        raise DeployError(
            f"export {INT8!r} calibrates on the run's training data, which is not here "
            f"({train.note}); random inputs would calibrate nothing meaningful"
        )
    if real.labels is None:
        raise DeployError(
            f"export {INT8!r} is checked on the run's labelled validation data, which deploy "
            f"did not read ({real.note}); it needs real_batches of 1 or more"
        )
    batch = options.export_batch or min(CALIBRATION_BATCH, len(train.images))
    if len(train.images) < batch:
        raise DeployError(f"{train.note} do not fill one calibration batch of {batch}")
    batches = quantize.equal_batches(train.images, batch)
    mode = "per-channel" if options.int8_per_channel else "per-tensor"
    note = (
        f"int8 calibrated on {len(batches) * batch} training images ({len(batches)} batches "
        f"of {batch}, {options.int8_calibration}), {mode} weights"
    )
    return Int8Data(batches, real.images, real.labels, note)


def export_int8(
    folder: Path,
    deployed: nn.Module,
    example: Tensor,
    options: DeployOptions,
    checks: dict,
    data: Int8Data,
) -> tuple[Runner, quantize.Int8Accuracy, list[str]]:
    """Step 5b: the int8 ONNX export, written, loaded back and checked on the labelled
    validation images: refused when it loses more than ``max_int8_drop`` accuracy points
    (it is not held to ``max_rel``: int8 is lossy). Writes the per-layer report beside it;
    returns the runner, its accuracy and notes (calibration, accuracy, the weakest layers)."""
    settings = {"per_channel": options.int8_per_channel, "method": options.int8_calibration}
    dynamic = options.export_batch is None
    runner = exported(
        INT8, deployed, example, folder, dynamic, calibration=data.calibration, **settings
    )

    def int8(x: Tensor) -> Tensor:
        return quantize.run_in_batches(runner, x, options.export_batch)

    with torch.no_grad():
        accuracy = quantize.compare(deployed(data.images), int8(data.images), data.labels)
    checks[f"{INT8} vs deploy form"] = verify(deployed, int8, data.images)
    if not (accuracy.drop <= options.max_int8_drop and math.isfinite(accuracy.max_logit_error)):
        raise DeployError(
            f"the {INT8} export loses more than max_int8_drop={options.max_int8_drop:g} "
            f"accuracy points: {accuracy}; nothing was written"
        )
    layers = quantize.layer_report(deployed, [torch.from_numpy(b) for b in data.calibration])
    write_whole(folder / quantize.CSV_NAME, quantize.report_csv(layers))
    worst = quantize.worst_layers(layers, options.int8_per_channel)
    return runner, accuracy, [data.note, str(accuracy), worst]


# ---- report ----


def mflops(model: nn.Module, x: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e6 / len(x)


def _row(form: str, run: Runner, x: Tensor, file: Path, seconds: float, model=None) -> dict:
    """A table row: median latency, parameters and FLOPs (for modules), the file's size."""
    from repnet.timing import measure

    with torch.inference_mode():
        milliseconds = 1e3 * measure(lambda: run(x), min_run_time=seconds).median
    row = {"form": form, "CPU ms, batch 1": f"{milliseconds:.3f}"}
    if model is not None:
        row["parameters"] = f"{sum(p.numel() for p in model.parameters()):,}"
        row["MFLOPs/image"] = f"{mflops(model, x):.2f}"
    return {**row, "file": file.name, "MB": f"{file.stat().st_size / 2**20:.2f}"}


def report(
    out: Path,
    source: Source,
    deployed: nn.Module,
    runners: dict,
    inputs: Tensor,
    options: DeployOptions,
) -> list[dict[str, Any]]:
    """Step 6: parameters, FLOPs per image, latency and file size of every form written."""
    one, seconds, batch = inputs[:1], options.latency_seconds, options.export_batch
    rows = [
        _row("train form (eval)", source.model, one, source.path, seconds, source.model),
        _row("deploy form", deployed, one, out / WEIGHTS_NAME, seconds, deployed),
    ]
    for name, runner in runners.items():
        label, x = (name, one) if batch is None else (f"{name} (batch {batch})", inputs[:batch])
        rows.append(_row(label, runner, x, out / EXPORTERS[name].filename, seconds))
    return rows


def default_out_dir(ckpt_path: Path) -> Path:
    """``<run>/deploy`` for ``<run>/checkpoints/x.ckpt``, else ``deploy`` beside the file."""
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return run / "deploy"


def parse_options(values: Mapping[str, Any]) -> DeployOptions:
    """``values`` checked against :class:`DeployOptions`, or one :class:`UsageError` line."""
    return validate(DeployOptions, values)


def deploy(ckpt_path: str | Path, **options: Any) -> DeployReport:
    """Convert ``ckpt_path``, verify it, and replace ``out_dir`` (default ``<run>/deploy``)
    with ``model.safetensors``, ``config.yaml``, each ``export`` and ``manifest.json``;
    nothing is written if a check fails. ``options``: :class:`DeployOptions`."""
    options = parse_options({"ckpt_path": ckpt_path, **options})
    published = options.model is not None
    run_config = None if published else find_run_config(options.ckpt_path, options.config)
    out = options.out_dir or default_out_dir(options.ckpt_path)
    inputs = [options.ckpt_path, *([run_config[0]] if run_config else [])]
    with replacing(out, keep=[path for path in inputs if path.exists()]) as stage:
        source = load(options, run_config)
        deployed = convert(source, options)
        examples = random_inputs(source, options)
        checks, real = check(source, deployed, examples, options)
        int8, notes, accuracy = int8_data(source, options, real), [real.note], None
        with stage() as folder:
            write(folder, source, deployed, checks)
            export_example = examples[: options.export_batch or 2]  # 1 would specialise
            runners = export(folder, deployed, export_example, options, checks)
            if int8 is not None:
                runners[INT8], accuracy, int8_notes = export_int8(
                    folder, deployed, export_example, options, checks, int8
                )
                notes += int8_notes
    rows = report(out, source, deployed, runners, examples, options)
    return DeployReport(out, checks, rows, notes, accuracy)


def load_deployed(out_dir: str | Path) -> nn.Module:
    """The deploy-form model written by ``deploy``: its files checked against the manifest,
    its config read as plain typed data, a fused skeleton filled with the weights."""
    folder = Path(out_dir).resolve()  # one set, even if a new deploy replaces it meanwhile
    check_manifest(folder, [CARD_NAME, WEIGHTS_NAME])
    architecture, _, _ = read_card(folder / CARD_NAME)
    state = load_checkpoint(folder / WEIGHTS_NAME).state_dict
    what = f"{folder / WEIGHTS_NAME} does not fit its {CARD_NAME}"
    return fill(deploy_skeleton(architecture), state, what)
