"""From a training checkpoint to a verified deploy form, its files and a cost report."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from repnet.checkpoints import Checkpoint, DeployError, load_checkpoint, staged
from repnet.data import DATAMODULES
from repnet.export import EXPORTERS, Runner
from repnet.models import build_model
from repnet.reparam import Verification, reparameterize, verify

CONFIG_NAME, WEIGHTS_NAME = "config.yaml", "model.safetensors"
DATAMODULE_CLASSES = {
    f"{cls.__module__}.{cls.__qualname__}": cls
    for cls in {getattr(factory, "func", factory) for factory in DATAMODULES.values()}
}


@dataclass
class DeployReport:
    """What ``deploy`` checked, wrote and measured."""

    out_dir: Path
    checks: dict[str, Verification]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        header = ("form", "parameters", "MFLOPs/image", "CPU ms, batch 1", "file", "MB")
        lines = [header] + [tuple(str(row.get(key, "")) for key in header) for row in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as plain data: nothing resolved (no ``${oc.env:…}``), nothing instantiated."""
    try:
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as error:  # omegaconf and yaml raise many kinds on a broken file
        raise DeployError(f"{path} is not a readable YAML config ({error})") from None
    if not isinstance(content, dict):
        raise DeployError(f"{path} is not a config mapping")
    return content


def find_run_config(ckpt_path: Path, config: str | Path | None) -> dict[str, Any] | None:
    """The given config file, else ``config.yaml`` beside the checkpoint or one folder up."""
    if config is not None:
        if not Path(config).is_file():
            raise DeployError(f"no config file at {config}")
        return _read_yaml(Path(config))
    for candidate in (ckpt_path.parent / CONFIG_NAME, ckpt_path.parent.parent / CONFIG_NAME):
        if candidate.is_file():
            return _read_yaml(candidate)
    return None


def describe(checkpoint: Checkpoint, run_config: dict | None) -> tuple[dict, list[int]]:
    """``build_model`` keywords and one sample's ``[C, H, W]``, from run config or checkpoint."""
    for source in (run_config, checkpoint.hyper_parameters):
        if isinstance(source, dict) and "architecture" in source and "input_size" in source:
            architecture, input_size = source["architecture"], source["input_size"]
            if not isinstance(architecture, dict) or not _is_shape(input_size):
                raise DeployError(
                    "the architecture or input_size recorded for this model is malformed"
                )
            return dict(architecture), [int(n) for n in input_size]
    raise DeployError(
        "cannot tell the architecture: the checkpoint holds none and no run config.yaml was "
        "found beside it; pass config=<run>/config.yaml"
    )


def _is_shape(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(n, int) and n > 0 for n in value)
    )


def _mismatch(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return [
        f"{label}: {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("resized", resized))
        if keys
    ]


def deploy_skeleton(architecture: dict[str, Any]) -> nn.Module:
    """The deploy form's modules, weightless: the train form built on the meta device (no
    memory, no initialisation) and converted; ``load_state_dict(assign=True)`` fills it."""
    with torch.device("meta"):
        return reparameterize(build_model(**architecture), inplace=True)


def load_model(architecture: dict[str, Any], state: dict[str, Tensor]) -> nn.Module:
    """The model the weights belong to, in train form or (for deployed weights) deploy form."""
    try:
        model = build_model(**architecture)
    except (TypeError, ValueError) as error:
        raise DeployError(f"the recorded architecture cannot be built: {error}") from None
    problems = _mismatch(model, state)
    if problems:
        skeleton = deploy_skeleton(architecture)
        if _mismatch(skeleton, state):
            raise DeployError(
                f"the checkpoint is not a {architecture.get('name')} with block "
                f"{architecture.get('block')}: {'; '.join(problems)}"
            )
        model = skeleton
    model.load_state_dict(state, assign=True)
    return model.eval()


def validation_batch(run_config: dict | None, batches: int) -> tuple[Tensor | None, str]:
    """Real validation images from the run's data, when it is a repnet dataset that is here.

    The config is untrusted: only repnet's own data modules are built, from plain values.
    """
    data = dict(run_config.get("data") or {}) if run_config is not None else {}
    if batches < 1 or not data:
        return None, "no real data: random inputs only"
    datamodule_class = DATAMODULE_CLASSES.get(str(data.pop("_target_", "")))
    if "download" in data:
        data["download"] = False  # deploying never downloads
    plain = all(isinstance(v, str | int | float | bool | type(None)) for v in data.values())
    if datamodule_class is None or not plain:
        return None, "the run's data is not a plain repnet dataset config: random inputs only"
    try:
        datamodule = datamodule_class(**data)
        datamodule.setup("validate")
        loader = iter(datamodule.val_dataloader())
        images = torch.cat([next(loader)[0] for _ in range(batches)])
    except (Exception, StopIteration) as error:
        return None, f"real data unavailable ({type(error).__name__}: {error}): random inputs only"
    return images, f"{len(images)} real validation images"


def latency_ms(run: Runner, x: Tensor, runs: int) -> float:
    """Median wall time of ``run(x)`` over ``runs`` calls, after two warm-up calls."""
    times = []
    with torch.inference_mode():
        for index in range(runs + 2):
            start = time.perf_counter()
            run(x)
            if index >= 2:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def mflops(model: nn.Module, x: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e6 / len(x)


def _megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f}"


def default_out_dir(ckpt_path: Path) -> Path:
    """``<run>/deploy`` for ``<run>/checkpoints/x.ckpt``, else ``deploy`` beside the file."""
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return run / "deploy"


def check_formats(export: str | Sequence[str]) -> list[str]:
    formats = [export] if isinstance(export, str) else list(export)
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise DeployError(f"unknown export format {unknown}; formats: {', '.join(EXPORTERS)}")
    return list(dict.fromkeys(formats))  # each once, in the order given


def require(
    name: str, value: Any, kind: type[int] | type[float], minimum: float, maximum: float = math.inf
) -> None:
    """A :class:`DeployError` unless ``value`` is a ``kind`` (an int counts as a float, a bool
    as neither, NaN as nothing) in ``[minimum, maximum]``: checked before any work."""
    kinds = (int, float) if kind is float else (int,)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or value != value  # NaN
        or not minimum <= value <= maximum
    ):
        what = "an integer" if kind is int else "a number"
        bound = f" >= {minimum}" if maximum == math.inf else f" in [{minimum}, {maximum}]"
        raise DeployError(f"{name} must be {what}{bound}, got {value!r}")


def deploy(
    ckpt_path: str | Path,
    config: str | Path | None = None,
    out_dir: str | Path | None = None,
    export: str | Sequence[str] = (),
    export_batch: int | None = None,
    max_rel: float = 1e-4,
    random_inputs: int = 8,
    real_batches: int = 1,
    latency_runs: int = 20,
    seed: int = 0,
) -> DeployReport:
    """Convert ``ckpt_path``, verify it, and write ``model.safetensors``, ``config.yaml`` and
    any ``export`` (``onnx``, ``pt2``) into ``out_dir``; nothing is written if a check fails.

    Exports take a dynamic batch unless ``export_batch`` fixes it (dynamic convs need that:
    their group count is the batch size).
    """
    ckpt_path = Path(ckpt_path)
    formats = check_formats(export)
    if export_batch is not None:
        require("export_batch", export_batch, int, 1)
    require("max_rel", max_rel, float, 0)
    require("random_inputs", random_inputs, int, 1)
    require("real_batches", real_batches, int, 0)
    require("latency_runs", latency_runs, int, 1)
    require("seed", seed, int, -(2**63), 2**64 - 1)  # what torch.manual_seed takes
    checkpoint = load_checkpoint(ckpt_path)
    run_config = find_run_config(ckpt_path, config)
    architecture, input_size = describe(checkpoint, run_config)
    model = load_model(architecture, checkpoint.state_dict)
    deployed = reparameterize(model)
    out = Path(out_dir) if out_dir else default_out_dir(ckpt_path)
    if out.exists() and not out.is_dir():
        raise DeployError(f"out_dir {out} exists and is not a folder")
    if (
        formats
        and export_batch is None
        and any(getattr(m, "needs_fixed_batch", False) for m in deployed.modules())
    ):
        raise DeployError(
            "dynamic convolutions export only for a fixed batch (their group count is the "
            "batch size): pass export_batch=N"
        )

    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(max(2, random_inputs, export_batch or 0), *input_size, generator=generator)
    real, data_note = validation_batch(run_config, real_batches)
    try:
        checks = {"random inputs": verify(model, deployed, random)}
    except RuntimeError as error:
        raise DeployError(f"the model does not take inputs of size {input_size}: {error}") from None
    if real is not None:
        checks["real validation data"] = verify(model, deployed, real)
    report = DeployReport(out, checks, notes=[data_note])
    _refuse_if_over(checks, max_rel, "the deploy form")

    one = random[:1]
    example = random[: export_batch or 2]  # a dynamic batch is traced with 2 (1 specialises)
    owned = [WEIGHTS_NAME, CONFIG_NAME, *(filename for filename, _ in EXPORTERS.values())]
    with staged(out, owned) as stage:
        state = {k: v.contiguous() for k, v in deployed.state_dict().items()}
        save_file(state, stage / WEIGHTS_NAME)
        summary = {name: vars(check) for name, check in checks.items()}
        OmegaConf.save(
            {
                "architecture": architecture,
                "input_size": input_size,
                "deploy": True,
                "source": str(ckpt_path.resolve()),
                "verification": summary,
            },
            stage / CONFIG_NAME,
        )
        report.rows = [
            _row("train form (eval)", model, one, model, latency_runs, ckpt_path),
            _row("deploy form", deployed, one, deployed, latency_runs, stage / WEIGHTS_NAME),
        ]
        for name in formats:
            filename, exporter = EXPORTERS[name]
            try:
                runner = exporter(deployed, example, stage / filename, export_batch is None)
            except DeployError:
                raise
            except Exception as error:  # the exporters fail in many ways on unsupported graphs
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise DeployError(
                    f"export {name!r} failed: {type(error).__name__}: {reason}"
                ) from None
            check = verify(deployed, runner, example)
            checks[f"{name} vs deploy form"] = check
            _refuse_if_over({name: check}, max_rel, f"the {name} export")
            label, x = (
                (name, one) if export_batch is None else (f"{name} (batch {export_batch})", example)
            )
            report.rows.append(_row(label, None, x, runner, latency_runs, stage / filename))
        for row in report.rows:
            row["file"] = Path(row["file"]).name
    return report


def _row(form, model, example, runner, runs, file: Path) -> dict[str, Any]:
    row = {"form": form, "CPU ms, batch 1": f"{latency_ms(runner, example, runs):.3f}"}
    if model is not None:
        row["parameters"] = f"{sum(p.numel() for p in model.parameters()):,}"
        row["MFLOPs/image"] = f"{mflops(model, example):.2f}"
    return {**row, "file": str(file), "MB": _megabytes(file)}


def _refuse_if_over(checks: dict[str, Verification], max_rel: float, what: str) -> None:
    for name, check in checks.items():
        if not check.max_rel <= max_rel:
            raise DeployError(
                f"{what} differs from the trained model on {name}: {check} "
                f"(tolerance max_rel={max_rel:g}); nothing was written"
            )


def load_deployed(out_dir: str | Path) -> nn.Module:
    """The deploy-form model written by ``deploy``: built fused (no branches) and loaded."""
    out_dir = Path(out_dir)
    config_path, weights_path = out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise DeployError(f"{out_dir} holds no deployed model ({CONFIG_NAME}, {WEIGHTS_NAME})")
    config = _read_yaml(config_path)
    model = deploy_skeleton(config["architecture"])
    state = load_checkpoint(weights_path).state_dict
    if mismatch := _mismatch(model, state):
        raise DeployError(f"{weights_path} does not fit its {CONFIG_NAME}: {'; '.join(mismatch)}")
    model.load_state_dict(state, assign=True)
    return model.eval()
