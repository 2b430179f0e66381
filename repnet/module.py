"""The LightningModule: classification with any backbone; steps, metrics and optimizers.

Hyper-parameters are plain values (dicts, lists, numbers, strings; the optimizer and
schedule as ``_target_`` configs), so a checkpoint loads with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pydantic import Field
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from repnet.models import build_model
from repnet.models.pretrained import head_and_backbone

DEFAULT_OPTIM = {
    "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9},
    "scheduler": {"_target_": "repnet.schedules.warmup_cosine", "_partial_": True},
    "interval": "step",
}


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``build_model(**architecture)``: loss and accuracy logged;
    weight decay only on weights of two or more dimensions (not on BN, scales, biases);
    ``optim.backbone_lr`` scales the LR of all but the classifier."""

    def __init__(
        self,
        architecture: dict[str, Any],
        input_size: list[int],
        optim: dict[str, Any] | None = None,
        label_smoothing: Annotated[float, Field(ge=0, le=1)] = 0.0,
        preprocessing: dict[str, Any] | None = None,
    ):
        """``architecture`` is ``build_model``'s keywords (name, block, num_classes, …);
        ``input_size`` one sample's ``[C, H, W]``; ``optim`` the ``optimizer`` and
        ``scheduler`` configs (``_target_`` + ``_partial_``) and the schedule ``interval``;
        ``preprocessing`` how an image file becomes an input, and the label names (kept for
        deploy and predict, see ``ImageClassificationDataModule.preprocessing``)."""
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(**architecture)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        num_classes = architecture["num_classes"]
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

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

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs loss and accuracy; returns the logits (callbacks compare them)."""
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str, accuracy) -> Tensor:
        """``<split>/loss`` (synced across processes) and ``<split>/acc``; the logits."""
        images, labels = batch
        logits = self(images)
        accuracy(logits, labels)
        self.log(f"{split}/loss", self.criterion(logits, labels), sync_dist=True)
        self.log(f"{split}/acc", accuracy, prog_bar=split == "val")
        return logits

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """Class probabilities ``softmax(logits)`` of a batch of images (or ``(images, …)``)."""
        images = batch[0] if isinstance(batch, tuple | list) else batch
        return self(images).softmax(1)

    def parameter_groups(self, backbone_lr: float) -> list[dict[str, Any]]:
        """Weights (decayed) and the rest (not); with ``backbone_lr`` ≠ 1 the classifier's and
        the backbone's apart, the backbone's marked to run at ``backbone_lr`` × the LR."""
        parts = {"": list(self.model.parameters())}
        if backbone_lr != 1:
            head, backbone = head_and_backbone(self.model)
            parts = {"head_": head, "backbone_": backbone}
        groups = [
            {
                "params": [p for p in params if (p.ndim > 1) == decay],
                "name": f"{part}{'decay' if decay else 'no_decay'}",
                **({} if decay else {"weight_decay": 0.0}),
                **({"lr_scale": backbone_lr} if part == "backbone_" else {}),
            }
            for part, params in parts.items()
            for decay in (True, False)
        ]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        optim = {**DEFAULT_OPTIM, **(self.hparams.optim or {})}
        optimizer = instantiate(optim["optimizer"])(
            self.parameter_groups(optim.get("backbone_lr", 1.0))
        )
        for group in optimizer.param_groups:
            group["lr"] *= group.pop("lr_scale", 1.0)
        if not optim.get("scheduler"):
            return {"optimizer": optimizer}
        schedule = instantiate(optim["scheduler"])
        steps = {"total_steps": int(self.trainer.estimated_stepping_batches)}
        if "total_steps" not in inspect.signature(schedule).parameters:
            steps = {}  # a torch scheduler of its own options
        scheduler = {"scheduler": schedule(optimizer, **steps), "interval": optim["interval"]}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
