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

from repnet.block import RepBlock
from repnet.dynamic import DynamicConv2d
from repnet.errors import TrainingDivergedError
from repnet.kernels import pad_to
from repnet.reparam import reparameterize

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ReparamDiagnostics(pl.Callback):
    """At every validation, converts a copy of the model and runs it beside the trained one.

    Logs ``deploy/max_abs_diff`` ``max|y - y'|``, ``deploy/max_rel_diff`` (over ``max|y|``),
    ``deploy/argmax_agreement``, ``deploy/val_acc``; each branch's share ``‖W_b‖ / Σ‖W‖`` of
    its block's kernel (``blocks/<block>/<branch>``, the mean over blocks in
    ``branches/<branch>``, histograms in ``branch_share/<branch>``); and every
    ``image_every_n_epochs`` a picture per block of ``mean |W|`` per kernel tap, fused and per
    branch (``skeleton/<block>``). TensorBoard gets one chart of trained and deployed accuracy.
    """

    def __init__(self, image_every_n_epochs: Annotated[int, Field(ge=1)] = 5) -> None:
        self.image_every_n_epochs = image_every_n_epochs
        self.deployed: torch.nn.Module | None = None
        self.metrics: MetricCollection | None = None

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

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(CHARTS)

    def _log_branch_shares(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        shares: dict[str, list[float]] = {}
        for path, block in rep_blocks(pl_module.model):
            for branch, share in block_shares(block).items():
                pl_module.log(f"blocks/{path}/{branch}", share)
                shares.setdefault(branch, []).append(share)
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for branch, values in shares.items():
            pl_module.log(f"branches/{branch}", sum(values) / len(values))
            if math.isfinite(sum(values)):
                for logger in tensorboards:
                    logger.experiment.add_histogram(
                        f"branch_share/{branch}", torch.tensor(values), trainer.global_step
                    )
        if trainer.current_epoch % self.image_every_n_epochs == 0:
            for logger in tensorboards:
                for path, block in rep_blocks(pl_module.model):
                    image = skeleton(block)
                    logger.experiment.add_image(
                        f"skeleton/{path}", image, trainer.global_step, dataformats="HW"
                    )


# TensorBoard's CUSTOM SCALARS tab: trained and deployed accuracy on one chart.
CHARTS = {
    "re-parameterization": {
        "accuracy, trained and deployed": ["Multiline", ["val/acc", "deploy/val_acc"]],
        "deploy gap": ["Multiline", ["deploy/max_abs_diff", "deploy/max_rel_diff"]],
    }
}


def rep_blocks(model: torch.nn.Module) -> list[tuple[str, RepBlock]]:
    """The blocks still in train form, by module path (``stages.1.0``)."""
    return [
        (path, m) for path, m in model.named_modules() if isinstance(m, RepBlock) and not m.deployed
    ]


@torch.no_grad()
def block_shares(block: RepBlock) -> dict[str, float]:
    """Each branch's share ``‖W_b‖ / Σ_b' ‖W_b'‖`` of the block's kernel."""
    norms = {name: k.weight.norm() for name, k in block.branch_kernels().items()}
    total = sum(norms.values())
    return {name: float(norm / total) for name, norm in norms.items()}


@torch.no_grad()
def skeleton(block: RepBlock, scale: int = 12) -> Tensor:
    """``mean_{o,c} |W[o, c, u, v]|`` per tap ``(u, v)``, each tile scaled to ``[0, 1]``: the
    fused kernel, then each branch's, side by side with a dark column between them."""
    size = block.geometry.kernel_size
    kernels = [block.kernel(), *(pad_to(k, size) for k in block.branch_kernels().values())]
    tiles = []
    for kernel in kernels:
        taps = kernel.weight.detach().abs().float().mean((0, 1)).cpu()
        tiles += [taps / taps.max().clamp_min(1e-12), torch.zeros(size[0], 1)]
    picture = torch.cat(tiles[:-1], dim=1).nan_to_num(0.0)
    return picture.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


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


class DynamicConvMonitor(pl.Callback):
    """Dynamic convs at each validation: the temperature ``dynamic/temperature`` and, on the
    first batch, each block's attention entropy ``mean_b(-Σ_k a_bk log a_bk)`` and expert
    usage ``mean_b a_bk`` (``dynamic/<block>/entropy``, ``dynamic/<block>/expert_<k>``)."""

    def __init__(self) -> None:
        self.attention: dict[str, Tensor] = {}
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx > 0 or trainer.sanity_checking:
            return
        for path, module in pl_module.model.named_modules():
            if isinstance(module, DynamicConv2d):
                self.hooks.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str):
        def record(module: DynamicConv2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.attention[path] = module.attend(inputs[0]).detach()
            self.temperature = float(module.temperature)

        return record

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for path, attention in self.attention.items():
            entropy = -(attention * attention.clamp_min(1e-12).log()).sum(1).mean()
            pl_module.log(f"dynamic/{path}/entropy", entropy)
            for expert, usage in enumerate(attention.mean(0)):
                pl_module.log(f"dynamic/{path}/expert_{expert}", usage)
        if self.attention:
            pl_module.log("dynamic/temperature", self.temperature)
        self.attention = {}


def images_in_batch(batch: tuple[Tensor, Tensor]) -> int:
    """The batch size of an ``(images, labels)`` batch (for Lightning's ``ThroughputMonitor``)."""
    return len(batch[0])


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
