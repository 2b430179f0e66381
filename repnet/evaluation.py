"""Test accuracy of a training checkpoint on a dataset: ``python eval.py ckpt_path=...``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pydantic import FilePath

from repnet.checkpoints import load_checkpoint
from repnet.config import Seed, Strict, check_target, plain, validate
from repnet.errors import UsageError
from repnet.module import Classifier
from repnet.training import build_errors


class EvalSettings(Strict):
    ckpt_path: FilePath
    seed: Seed = 0
    paths: dict[str, str]
    data: dict[str, Any]
    trainer: dict[str, Any]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """``trainer.test`` of the checkpoint's model on ``cfg.data``'s test split: ``test/acc``,
    ``test/loss``."""
    values = plain(cfg)
    validate(EvalSettings, values)
    check_target(values["data"], "data")
    check_target(values["trainer"], "trainer")
    hparams = load_checkpoint(values["ckpt_path"]).hyper_parameters
    if not hparams or "architecture" not in hparams:
        raise UsageError(f"{values['ckpt_path']} is no repnet training checkpoint")
    with build_errors():
        datamodule = instantiate(cfg.data)
        module = Classifier.load_from_checkpoint(
            values["ckpt_path"], map_location="cpu", weights_only=True
        )
    architecture = module.hparams.architecture
    shape = (architecture["num_classes"], architecture["in_channels"])
    if shape != (datamodule.num_classes, datamodule.in_channels):
        raise UsageError(
            f"the checkpoint's model takes {shape[1]}-channel images of {shape[0]} classes; "
            f"data has {datamodule.in_channels} channels and {datamodule.num_classes} classes"
        )
    with build_errors():
        trainer: pl.Trainer = instantiate(
            cfg.trainer, logger=False, enable_progress_bar=False, enable_model_summary=False
        )
    return {k: float(v) for k, v in trainer.test(module, datamodule, verbose=False)[0].items()}
