"""The LightningModule: classification with any backbone, plus re-parameterization diagnostics.

Hyper-parameters are plain values only (dicts, lists, numbers, strings), so a
checkpoint loads with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics.aggregation import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from repnet.block import branch_shares
from repnet.models import build_model
from repnet.reparam import reparameterize

DEFAULT_OPTIMIZER = {
    "name": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "betas": [0.9, 0.999],
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "schedule": "cosine",
}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear up to 1 over ``warmup`` steps, then ``½(1 + cos πt)`` down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(groups: list[dict[str, Any]], options: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov as ``options`` say) or AdamW over parameter ``groups``; the
    options are those :func:`checked_optimizer_options` passed."""
    common = {"lr": options["lr"], "weight_decay": options["weight_decay"]}
    if options["name"] == "sgd":
        return torch.optim.SGD(
            groups, momentum=options["momentum"], nesterov=options["nesterov"], **common
        )
    return torch.optim.AdamW(groups, betas=tuple(options["betas"]), **common)


def _is_finite_number(value: Any) -> bool:
    """An int (any size) or a finite float; a bool is neither here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


def checked_optimizer_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` if the optimizer and schedule are known, its own options are finite numbers
    (``betas`` two of them) and torch's optimizer takes them: a bad value (``optim.lr=-1``)
    is a ``ValueError`` naming it when the module is built, not a traceback inside ``fit``."""
    for key, known in (("name", ("sgd", "adamw")), ("schedule", ("cosine", "constant"))):
        if options[key] not in known:
            raise ValueError(f"optim.{key} must be one of {list(known)}, got {options[key]!r}")
    sgd = options["name"] == "sgd"
    for key in ("lr", "weight_decay", "warmup_epochs", *(["momentum"] if sgd else [])):
        if not _is_finite_number(options[key]):
            raise ValueError(f"optim.{key} must be a finite number, got {options[key]!r}")
    if options["warmup_epochs"] < 0:
        raise ValueError(f"optim.warmup_epochs must be >= 0, got {options['warmup_epochs']!r}")
    if sgd and not isinstance(options["nesterov"], bool):
        raise ValueError(f"optim.nesterov must be true or false, got {options['nesterov']!r}")
    betas = options["betas"]
    if not sgd and not (
        isinstance(betas, list | tuple) and len(betas) == 2 and all(map(_is_finite_number, betas))
    ):
        raise ValueError(f"optim.betas must be two finite numbers, got {betas!r}")
    try:
        make_optimizer([nn.Parameter(torch.zeros(1))], options)
    except (ValueError, TypeError) as error:
        raise ValueError(f"optim: {error}") from None
    return options


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a/b": 1}``, lists as strings: the shape TensorBoard hparams take."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = str(value) if isinstance(value, list | tuple) or value is None else value
    return flat


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``build_model(**architecture)``; logs loss, accuracy and, at every
    validation end, the deploy gap of a converted copy and each branch type's kernel share."""

    def __init__(
        self,
        architecture: dict[str, Any],
        input_size: list[int],
        optimizer: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        deploy_check: bool = True,
    ):
        """``architecture`` is ``build_model``'s keywords (name, block, num_classes, …);
        ``input_size`` is one sample's ``[C, H, W]``."""
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(**architecture)
        num_classes = architecture["num_classes"]
        self.optimizer_options = checked_optimizer_options(
            {**DEFAULT_OPTIMIZER, **(optimizer or {})}
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.deploy_acc = MulticlassAccuracy(num_classes, average="micro")
        self.deploy_gap = MaxMetric()
        self.deploy_copy: list[nn.Module] = []  # a list, so the copy is no submodule (never saved)
        self.hparams_written = False

    @property
    def example_input_array(self) -> Tensor:
        """What was set, else one image in the parameters' dtype and device (``bf16-true``
        runs too): Lightning's model summary runs it to show layer sizes and FLOPs per image."""
        if self._example_input_array is not None:
            return self._example_input_array
        parameter = next(self.model.parameters())
        shape = (1, *self.hparams.input_size)
        return torch.zeros(shape, dtype=parameter.dtype, device=parameter.device)

    @example_input_array.setter
    def example_input_array(self, example: Tensor | None) -> None:
        self._example_input_array = example

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        if self.hparams.deploy_check:
            self.deploy_copy = [reparameterize(self.model)]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", self.criterion(logits, labels), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        for deployed in self.deploy_copy:
            deployed_logits = deployed(images)
            self.deploy_gap((logits - deployed_logits).abs().max())
            self.deploy_acc(deployed_logits, labels)
            self.log("deploy/val_acc", self.deploy_acc)
            self.log("deploy/max_abs_diff", self.deploy_gap)

    def on_validation_epoch_end(self) -> None:
        self.deploy_copy = []
        if self.trainer.sanity_checking:
            return
        if self.val_acc.update_called:
            accuracy = self.val_acc.compute()  # this epoch's, synced across processes
            self.log("hp/val_acc", accuracy, sync_dist=True)  # equal on every rank already
            self._write_hparams(float(accuracy))
        for name, shares in branch_shares(self.model).items():
            self.log(f"branches/{name}", sum(shares) / len(shares), sync_dist=True)
            experiment = getattr(self.logger, "experiment", None)
            if self.trainer.is_global_zero and hasattr(experiment, "add_histogram"):
                experiment.add_histogram(
                    f"branch_share/{name}", torch.tensor(shares), self.global_step
                )

    def _write_hparams(self, accuracy: float) -> None:
        """Register the hparams with a real first value of ``hp/val_acc`` (not a placeholder)."""
        if self.hparams_written or not isinstance(self.logger, TensorBoardLogger):
            return
        self.logger.log_hyperparams(flatten(dict(self.hparams)), {"hp/val_acc": accuracy})
        self.hparams_written = True

    def configure_optimizers(self):
        options = self.optimizer_options
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]  # BN, scales, biases
        optimizer = make_optimizer(
            [
                {"params": decay, "weight_decay": options["weight_decay"], "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            ],
            options,
        )
        if options["schedule"] == "constant":
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = round(options["warmup_epochs"] * total / epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
