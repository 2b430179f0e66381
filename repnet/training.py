"""Training from a composed Hydra config: data, model, Lightning trainer, run directory."""

from __future__ import annotations

import contextlib
import shutil
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from repnet.checkpoints import load_checkpoint
from repnet.errors import UsageError
from repnet.module import Classifier
from repnet.reparam import reparameterize

# What a checkpoint's weights and optimizer state are bound to: a resumed run keeps them.
RESUMED_HPARAMS = ("architecture", "input_size", "optimizer")


def architecture(cfg: DictConfig, datamodule) -> dict[str, Any]:
    """``build_model``'s keywords: ``cfg.model`` with ``cfg.block`` and the data's shape."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    block = OmegaConf.to_container(cfg.block, resolve=True)
    return {
        **model,
        "block": block,
        "num_classes": datamodule.num_classes,
        "in_channels": datamodule.in_channels,
    }


def build_module(cfg: DictConfig, datamodule) -> Classifier:
    return Classifier(
        architecture=architecture(cfg, datamodule),
        input_size=[datamodule.in_channels, datamodule.image_size, datamodule.image_size],
        optimizer=OmegaConf.to_container(cfg.optim, resolve=True),
        label_smoothing=cfg.label_smoothing,
        deploy_check=cfg.deploy_check,
    )


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(run_dir / "checkpoints")
    return callbacks


class RunConfigWriter(pl.Callback):
    """Writes the resolved config as ``run_dir/config.yaml`` once the data is ready (Lightning's
    ``setup``), so only a run that starts has one: a run refused for missing data leaves none."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        self.path, self.config = run_dir / "config.yaml", config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            OmegaConf.save(OmegaConf.create(self.config), self.path)


@torch.no_grad()
def final_deploy_check(module: Classifier, datamodule) -> dict[str, float]:
    """Convert the final model and compare it with the trained one on the whole validation set."""
    model = module.model.eval()
    deployed = reparameterize(model)
    gap, scale, agree, correct, deployed_correct, total = 0.0, 0.0, 0, 0, 0, 0
    dtype = next(model.parameters()).dtype  # bf16-true and 16-true runs convert the model
    for images, labels in datamodule.val_dataloader():
        images = images.to(dtype)
        logits, deployed_logits = model(images), deployed(images)
        gap = max(gap, (logits - deployed_logits).abs().max().item())
        scale = max(scale, logits.abs().max().item())
        agree += (logits.argmax(1) == deployed_logits.argmax(1)).sum().item()
        correct += (logits.argmax(1) == labels).sum().item()
        deployed_correct += (deployed_logits.argmax(1) == labels).sum().item()
        total += len(labels)
    total = max(total, 1)  # no validation data: nothing to disagree on
    return {
        "max_abs_diff": gap,
        "max_rel_diff": gap / scale if scale > 0 else gap,  # to the largest logit, as `verify`
        "argmax_agreement": agree / total,
        "final_val_acc": correct / total,
        "deploy_val_acc": deployed_correct / total,
    }


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train as ``cfg`` says, writing checkpoints, logs and the resolved config into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with config_errors():
        datamodule = instantiate(cfg.data)
        module = build_module(cfg, datamodule)
        shape = {key: module.hparams[key] for key in ("architecture", "input_size")}
        resolved = {**OmegaConf.to_container(cfg, resolve=True), **shape}
        callbacks = [*build_callbacks(cfg, run_dir), RunConfigWriter(run_dir, resolved)]
        logger = instantiate(cfg.logger, save_dir=str(run_dir)) if cfg.logger else False
        check_trainer_options(
            OmegaConf.to_container(cfg.trainer, resolve=True, throw_on_missing=True)
        )
        trainer = instantiate(
            cfg.trainer,
            _convert_="all",  # plain dicts and lists: Lightning takes max_time={hours: 1}
            callbacks=callbacks,
            logger=logger,
            enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
            default_root_dir=str(run_dir),
        )
    if cfg.ckpt_path is not None:
        check_resumable(cfg.ckpt_path, module.hparams)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    datamodule.setup("validate")
    summary = {
        "best_val_acc": best_score(checkpoint) if checkpoint is not None else None,
        **final_deploy_check(module, datamodule),
        "run_dir": str(run_dir),
        "tensorboard": isinstance(logger, TensorBoardLogger),
        "best_checkpoint": checkpoint.best_model_path if checkpoint is not None else None,
        "last_checkpoint": str(last)
        if (last := run_dir / "checkpoints" / "last.ckpt").is_file()
        else None,
    }
    if trainer.is_global_zero:
        print(summary_line(summary), flush=True)
    return summary


class RunRecords:
    """What Hydra made for this run before ``train`` was called: the run directory's
    ``output_subdir`` (``.hydra/`` with Hydra's three YAML files) and the job log. A run refused
    before it started takes them back, but only from a directory that held nothing else when
    the run began (one Hydra just made, not a user's folder or an earlier run's), and only
    entries directly inside it."""

    HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})

    def __init__(self, run_dir: Path, output_subdir: str | None, log_name: str):
        self.run_dir = run_dir
        inside = [run_dir / name for name in (output_subdir, log_name) if name]
        self.paths = [path for path in inside if path.resolve().parent == run_dir.resolve()]
        self.fresh = all(path in self.paths and self._made(path) for path in run_dir.iterdir())

    def _made(self, path: Path) -> bool:
        """An empty log, or a folder of Hydra's own YAML files: nothing anyone else wrote."""
        if path.is_dir():
            return all(p.is_file() and p.name in self.HYDRA_FILES for p in path.iterdir())
        return path.is_file() and path.stat().st_size == 0

    def forget(self) -> None:
        """Remove the records, then the directory if that empties it; nothing once the run
        has started (its ``config.yaml`` is written) or in a directory that was not fresh."""
        if not self.fresh or (self.run_dir / "config.yaml").exists():
            return
        for path in self.paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()


# What a config value must be for a type hint it can fit (a float hint takes an int too).
PLAIN_TYPES = {
    int: int,
    float: (int, float),
    bool: bool,
    str: str,
    type(None): type(None),
    list: list,
}


def check_trainer_options(options: dict[str, Any]) -> None:
    """A ``ValueError`` naming the first ``trainer.*`` value that does not fit the type
    ``pl.Trainer`` declares for it (``max_epochs=abc`` failed deep inside ``fit``)."""
    hints = typing.get_type_hints(pl.Trainer.__init__)
    for key, value in options.items():
        if key in hints and not fits(value, hints[key]):
            raise ValueError(f"trainer.{key} must be {describe(hints[key])}, got {value!r}")


def fits(value: Any, hint: Any) -> bool:
    """Whether a plain config value fits a type hint; hints it cannot judge (objects such as
    ``Strategy`` that a config cannot hold anyway) accept anything."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(fits(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(hint))
    expected = PLAIN_TYPES.get(origin or hint)
    if expected is None:
        return True
    if isinstance(value, bool):  # an int to Python, not to a config
        return expected is bool
    return isinstance(value, expected)


def describe(hint: Any) -> str:
    """``int or None``, ``one of [16, '16-true', …]``: a type hint in words."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(args)}"
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
    literals = [a for arg in args if typing.get_origin(arg) is typing.Literal for a in arg.__args__]
    others = [describe(arg) for arg in args if typing.get_origin(arg) is not typing.Literal]
    return " or ".join(([f"one of {literals}"] if literals else []) + others)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """What a bad config raises while the run is built, as one :class:`UsageError` line."""
    try:
        yield
    except MissingMandatoryValue as error:
        raise UsageError(f"{error.full_key} is required ({error.full_key}=...)") from None
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, (UsageError, ValueError)):
            raise UsageError(str(cause)) from None
        raise UsageError(str(error).replace("\n", " ")) from None
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_resumable(path: str | Path, hparams: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model or optimizer, naming what differs (else Lightning
    fails deep inside, or silently keeps the checkpoint's learning rate)."""
    saved = load_checkpoint(path).hyper_parameters or {}
    found = [
        line
        for key in RESUMED_HPARAMS
        if key in saved
        for line in differences(saved[key], hparams[key], key)
    ]
    if found:
        raise UsageError(
            f"{path} was trained with another config ({'; '.join(found)}): resume with the "
            "overrides it was trained with (its run's config.yaml lists them)"
        )


def differences(saved: Any, current: Any, name: str) -> list[str]:
    """``name.key: a in the checkpoint, b here`` for every leaf where two configs differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(saved.keys() | current.keys())
        return [
            line
            for key in keys
            for line in differences(saved.get(key), current.get(key), f"{name}.{key}")
        ]
    return [] if saved == current else [f"{name}: {saved!r} in the checkpoint, {current!r} here"]


def best_score(checkpoint: ModelCheckpoint) -> float | None:
    """The best monitored value; after a spawned (DDP) run it is only in the checkpoint file."""
    if checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    if not checkpoint.best_model_path:
        return None
    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    for state in saved["callbacks"].values():
        if state.get("monitor") == checkpoint.monitor and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


def summary_line(summary: dict[str, Any]) -> str:
    """``best val acc … | final model … | run … | best … | tensorboard …``, what the run has;
    the final model's accuracy is given trained and deployed side by side."""
    best, best_file = summary["best_val_acc"], summary["best_checkpoint"]
    parts = [f"best val acc {best:.4f}"] if best is not None else []
    parts += [
        f"final model val acc {summary['final_val_acc']:.4f}, deployed "
        f"{summary['deploy_val_acc']:.4f} (gap {summary['max_abs_diff']:.2e} abs, "
        f"{summary['max_rel_diff']:.2e} rel, argmax agreement {summary['argmax_agreement']:.2%})",
        f"run {summary['run_dir']}",
    ]
    parts += [f"best {best_file}"] if best_file else []
    parts += [f"tensorboard --logdir {summary['run_dir']}"] if summary["tensorboard"] else []
    return " | ".join(parts)
