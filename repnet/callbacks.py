"""Lightning callbacks: temperature annealing for dynamic convs."""

from __future__ import annotations

import pytorch_lightning as pl

from repnet.dynamic import DynamicConv2d


class TemperatureAnnealing(pl.Callback):
    """Anneal every dynamic conv's softmax temperature linearly from ``start`` (epoch 0) to
    ``end`` (epoch ``epochs - 1`` and after): near-uniform experts first, then sharper."""

    def __init__(self, start: float = 30.0, end: float = 1.0, epochs: int = 10):
        self.start, self.end, self.epochs = start, end, epochs

    def temperature(self, epoch: int) -> float:
        progress = min(1.0, epoch / max(1, self.epochs - 1))
        return self.start + (self.end - self.start) * progress

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, DynamicConv2d):
                module.temperature.fill_(self.temperature(trainer.current_epoch))
