"""Training from a composed Hydra config: a preflight that refuses bad runs, then a fit."""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, Timer
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from repnet.checkpoints import AtomicCheckpointIO, load_checkpoint
from repnet.config import check_train_config
from repnet.costs import mflops_per_image, parameters
from repnet.errors import CheckpointError, UsageError, refuse
from repnet.models import load_pretrained
from repnet.module import Classifier
from repnet.reparam import reparameterize

# What a checkpoint's weights and optimizer state are bound to: a resumed run keeps them.
RESUMED_HPARAMS = ("architecture", "input_size", "optim")


@dataclass
class Run:
    """A checked config and what it builds: data, module."""

    config: dict[str, Any]
    datamodule: pl.LightningDataModule
    module: Classifier


@contextlib.contextmanager
def build_errors() -> Iterator[None]:
    """What building from a checked config can still refuse (a dataset that is not there,
    geometry a block cannot take, an unknown model option), as one :class:`UsageError`."""
    try:
        yield
    except InstantiationException as error:
        cause = error.__cause__
        raise UsageError(str(cause if cause is not None else error).replace("\n", " ")) from None
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None


def prepare(cfg: DictConfig) -> Run:
    """Everything that can refuse a run, before anything is written: the config's values,
    the data (downloaded if it may be, then read), the model, a checkpoint to resume from."""
    config = check_train_config(cfg)
    if config["num_threads"] is not None:
        torch.set_num_threads(config["num_threads"])
    pl.seed_everything(config["seed"], workers=True, verbose=False)
    with build_errors():
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        module = build_module(config, datamodule)
    if config["ckpt_path"] is not None:
        check_resumable(config["ckpt_path"], module.hparams, config["trainer"])
    return Run(config, datamodule, module)


def build_module(config: dict[str, Any], datamodule) -> Classifier:
    """The module for ``config``'s model on ``datamodule``'s images, holding the weights of
    ``model.pretrained`` when given (a classifier of another class count re-initialised)."""
    options = dict(config["model"])
    pretrained = options.pop("pretrained", None)
    architecture = {
        **options,
        "block": config["block"],
        "num_classes": datamodule.num_classes,
        "in_channels": datamodule.in_channels,
    }
    module = Classifier(
        architecture=architecture,
        input_size=[datamodule.in_channels, datamodule.image_size, datamodule.image_size],
        optim=config["optim"],
        label_smoothing=config["label_smoothing"],
        preprocessing=datamodule.preprocessing(),
    )
    if pretrained is not None and config["ckpt_path"] is None:  # a resumed run has its own
        try:
            report = load_pretrained(module.model, pretrained)
        except CheckpointError as error:
            raise UsageError(f"model.pretrained: {error}") from None
        rank_zero_info(f"model.pretrained {pretrained}: {report}")
    return module


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    """``cfg.trainer`` with the configured callbacks and loggers, writing into ``run_dir``."""
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    loggers = [instantiate(lg, save_dir=str(run_dir)) for lg in (cfg.logger or {}).values() if lg]
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(run_dir / "checkpoints")
    with build_errors():
        return instantiate(
            cfg.trainer,
            _convert_="all",  # plain dicts and lists: Lightning takes max_time={hours: 1}
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
            default_root_dir=str(run_dir),
        )


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train as ``cfg`` says into ``run_dir``: checkpoints, logs, the resolved ``config.yaml``
    (kept when resuming into the same run); returns the summary it prints."""
    run, run_dir = prepare(cfg), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, run_dir)
    if trainer.is_global_zero and not (run_dir / "config.yaml").exists():
        recorded = ("architecture", "input_size", "preprocessing")
        shape = {key: run.module.hparams[key] for key in recorded}
        OmegaConf.save(OmegaConf.create({**run.config, **shape}), run_dir / "config.yaml")
    trainer.fit(
        run.module, datamodule=run.datamodule, ckpt_path=run.config["ckpt_path"], weights_only=True
    )
    final = trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    summary = summarize(trainer, final[0] if final else {}, run_dir)
    if trainer.is_global_zero:
        write_results(run_dir / "results.json", results(run, trainer, summary))
        print(summary_line(summary), flush=True)
    return summary


def summarize(trainer: pl.Trainer, final: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The run's figures: best and final accuracy, the deploy gap, and where files went."""
    best = trainer.checkpoint_callback
    last = run_dir / "checkpoints" / "last.ckpt"
    figures = {
        "final_val_acc": "val/acc",
        "deploy_val_acc": "deploy/val_acc",
        "max_abs_diff": "deploy/max_abs_diff",
        "max_rel_diff": "deploy/max_rel_diff",
        "argmax_agreement": "deploy/argmax_agreement",
    }
    return {
        "best_val_acc": best_score(best) if best is not None else None,
        **{name: float(final[key]) if key in final else None for name, key in figures.items()},
        "run_dir": str(run_dir),
        "tensorboard": any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers),
        "best_checkpoint": best.best_model_path or None if best else None,
        "last_checkpoint": str(last) if last.is_file() else None,
    }


def results(run: Run, trainer: pl.Trainer, summary: dict[str, Any]) -> dict[str, Any]:
    """``results.json``: the summary's figures, what the model costs trained and deployed
    (parameters, MFLOPs per image), wall time, epochs, seed and versions."""
    model = run.module.model.eval()
    example = run.module.example_input_array
    deployed = reparameterize(model)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return {
        **{k: v for k, v in summary.items() if k != "tensorboard"},
        "params": {"train": parameters(model), "deploy": parameters(deployed)},
        "mflops_per_image": {
            "train": mflops_per_image(model, example),
            "deploy": mflops_per_image(deployed, example),
        },
        "wall_time_s": timer.time_elapsed("train") if timer is not None else None,
        "epochs": trainer.current_epoch,
        "seed": run.config["seed"],
        "versions": {name: version(name) for name in ("repnet", "torch", "pytorch-lightning")},
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    """JSON written whole: to a temporary name beside ``path``, then renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temporary, path)


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
    parts = []
    if summary["best_val_acc"] is not None:
        parts.append(f"best val acc {summary['best_val_acc']:.4f}")
    if summary["final_val_acc"] is not None:
        parts.append(f"final model val acc {summary['final_val_acc']:.4f}")
    if summary["deploy_val_acc"] is not None:
        parts[-1] += (
            f", deployed {summary['deploy_val_acc']:.4f} (gap {summary['max_abs_diff']:.2e} abs, "
            f"{summary['max_rel_diff']:.2e} rel, argmax agreement "
            f"{summary['argmax_agreement']:.2%})"
        )
    parts.append(f"run {summary['run_dir']}")
    if summary["best_checkpoint"]:
        parts.append(f"best {summary['best_checkpoint']}")
    if summary["tensorboard"]:
        parts.append(f"tensorboard --logdir {summary['run_dir']}")
    return " | ".join(parts)


def check_resumable(path: str | Path, hparams: dict[str, Any], trainer: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model or optimizer, naming what differs (else Lightning
    fails deep inside, or silently keeps the checkpoint's learning rate), and another
    ``max_epochs`` than its run's ``config.yaml`` records (it reshapes the LR schedule)."""
    saved = load_checkpoint(path).hyper_parameters or {}
    found = [
        line
        for key in RESUMED_HPARAMS
        if key in saved
        for line in differences(saved[key], hparams[key], key)
    ]
    run_config = Path(path).parent.parent / "config.yaml"
    if run_config.is_file():
        epochs = OmegaConf.select(OmegaConf.load(run_config), "trainer.max_epochs")
        found += differences(epochs, trainer.get("max_epochs"), "trainer.max_epochs")
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


class Preflight(HydraCallback):
    """Hydra callback: runs :func:`prepare` before Hydra makes the run directory, so a run
    refused for its config, data or checkpoint leaves nothing behind; refuses a run directory
    that holds files but is no earlier run (a user's folder); a run resumed into its own
    directory keeps that run's ``.hydra/`` records and ``config.yaml``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = config.copy()
        with open_dict(task):
            del task["hydra"]
        run_dir = Path(config.hydra.run.dir)
        try:
            if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run(run_dir):
                raise UsageError(f"{run_dir} holds files and is no repnet run: choose another")
            prepare(task)
        except UsageError as error:
            refuse(error)
        if is_run(run_dir):  # resumed into its own run: Hydra keeps the first run's records
            with read_write(config):
                config.hydra.output_subdir = None


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run directory: Hydra's records and a resolved config."""
    return (path / ".hydra").is_dir() or (path / "checkpoints").is_dir()


SUMMARY_COLUMNS = ("best_val_acc", "final_val_acc", "deploy_val_acc", "max_rel_diff", "wall_time_s")


class SweepSummary(HydraCallback):
    """Hydra callback: after a multirun, ``summary.csv`` in the sweep directory and a printed
    table, from each job's ``results.json``; a row per job, named by its overrides that
    differ between the jobs (``block=dbb,seed=1``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted(path.parent for path in sweep.glob("*/results.json"))
        if not jobs:
            return
        overrides = [job_overrides(job) for job in jobs]
        shared = set.intersection(*(set(names) for names in overrides))
        rows = [
            {
                "run": ",".join(o for o in names if o not in shared) or job.name,
                **json.loads((job / "results.json").read_text()),
            }
            for job, names in zip(jobs, overrides)
        ]
        columns = ("run", *SUMMARY_COLUMNS)
        with open(sweep / "summary.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        print(format_table(columns, rows))


def job_overrides(job: Path) -> list[str]:
    """The command-line overrides of a job, as Hydra recorded them in ``.hydra/``."""
    path = job / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def format_table(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """Rows as aligned text columns; floats with 4 significant digits."""
    cells = [columns] + [
        tuple(
            f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c))
            for c in columns
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)
