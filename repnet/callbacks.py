"""Lightning callbacks: re-parameterization diagnostics, divergence, dynamic-conv temperature."""

from __future__ import annotations

import math
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
from pydantic import Field
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from repnet.block import branch_shares
from repnet.dynamic import DynamicConv2d
from repnet.errors import TrainingDivergedError
from repnet.reparam import reparameterize

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ReparamDiagnostics(pl.Callback):
    """At every validation, converts a copy of the model and runs it beside the trained one.

    Logs ``deploy/max_abs_diff`` ``max|y - y'|``, ``deploy/max_rel_diff`` (over ``max|y|``),
    ``deploy/argmax_agreement``, ``deploy/val_acc``, each branch type's mean share
    ``‖W_b‖ / Σ‖W‖`` of the fused kernel (``branches/<name>``, histograms per block in
    ``branch_share/<name>``).
    """

    def __init__(self) -> None:
        self.deployed: torch.nn.Module | None = None
        self.metrics: MetricCollection | None = None
        self.hparams_logged = False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        self.deployed = reparameterize(pl_module.model)
        classes = pl_module.hparams.architecture["num_classes"]
        self.metrics = MetricCollection(
            {
                "max_abs_diff": MaxMetric(),
                "scale": MaxMetric(),
                "argmax_agreement": MeanMetric(),
                "val_acc": MulticlassAccuracy(classes, average="micro"),
            }
        ).to(pl_module.device)

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Tensor, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        images, labels = batch
        deployed = self.deployed(images)
        metrics = self.metrics
        metrics["max_abs_diff"].update((outputs - deployed).abs().max())
        metrics["scale"].update(outputs.abs().max())
        agree = (outputs.argmax(1) == deployed.argmax(1)) & deployed.isfinite().all(1)
        metrics["argmax_agreement"].update(agree.double())
        metrics["val_acc"].update(deployed, labels)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.deployed = None
        if self.metrics["scale"].update_count == 0:
            return
        figures = {name: float(value) for name, value in self.metrics.compute().items()}
        scale = figures.pop("scale")
        figures["max_rel_diff"] = figures["max_abs_diff"] / scale if scale > 0 else math.inf
        for name, value in figures.items():
            pl_module.log(f"deploy/{name}", value, sync_dist=True)  # equal on every rank
        if not trainer.sanity_checking:
            self._log_branch_shares(trainer, pl_module)

    def _log_branch_shares(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        for name, shares in branch_shares(pl_module.model).items():
            pl_module.log(f"branches/{name}", sum(shares) / len(shares), sync_dist=True)
            values = torch.tensor(shares)
            finite = bool(values.isfinite().all())
            if trainer.is_global_zero and finite and hasattr(experiment, "add_histogram"):
                experiment.add_histogram(f"branch_share/{name}", values, trainer.global_step)


class RunHParams(pl.Callback):
    """The HPARAMS tab: the run-defining ``values`` (model, block, data, batch size, …)
    against ``hp/best_val_acc`` and ``hp/max_rel_diff`` (the deploy gap), after each
    validation; registered with real first values, not placeholders."""

    def __init__(self, values: dict[str, Any]):
        self.values, self.best, self.registered = values, -math.inf, False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/acc" not in metrics:
            return
        self.best = max(self.best, float(metrics["val/acc"]))
        figures = {"hp/best_val_acc": self.best}
        if "deploy/max_rel_diff" in metrics:
            figures["hp/max_rel_diff"] = float(metrics["deploy/max_rel_diff"])
        for logger in trainer.loggers:
            if self.registered:
                logger.log_metrics(figures, step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):  # the metrics the HPARAMS tab lists
                logger.log_hyperparams(self.values, figures)
            else:
                logger.log_hyperparams(self.values)
                logger.log_metrics(figures, step=trainer.global_step)
        self.registered = True


class StopOnDivergence(pl.Callback):
    """Stops training when the loss is not finite, and never saves non-finite weights."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise TrainingDivergedError(
                f"training diverged: the loss became {loss.item()} at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); the learning rate is the usual cause "
                "(lower optim.optimizer.lr); the last good checkpoint is kept"
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        bad = next(
            (
                k
                for k, v in checkpoint["state_dict"].items()
                if v.is_floating_point() and not v.isfinite().all()
            ),
            None,
        )
        if bad is not None:
            raise TrainingDivergedError(
                f"training diverged: {bad} is not finite at step {trainer.global_step}; "
                "no checkpoint was written (lower optim.optimizer.lr)"
            )


class TemperatureAnnealing(pl.Callback):
    """Anneal every dynamic conv's softmax temperature linearly from ``start`` (epoch 0) to
    ``end`` (epoch ``epochs - 1`` and after): near-uniform experts first, then sharper."""

    def __init__(
        self, start: Positive = 30.0, end: Positive = 1.0, epochs: Annotated[int, Field(ge=1)] = 10
    ):
        self.start, self.end, self.epochs = start, end, epochs

    def temperature(self, epoch: int) -> float:
        progress = min(1.0, epoch / max(1, self.epochs - 1))
        return self.start + (self.end - self.start) * progress

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, DynamicConv2d):
                module.temperature.fill_(self.temperature(trainer.current_epoch))
