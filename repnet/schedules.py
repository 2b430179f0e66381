"""Learning-rate schedules built from torch's own schedulers."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup: Annotated[float, Field(ge=0, lt=1)] = 0.05,
) -> LRScheduler:
    """Linear warm-up over the first ``warmup`` share of ``total_steps`` (factor ``(t+1)/w``),
    then cosine annealing ``½(1 + cos πt/(T - w))`` down to 0 at ``total_steps``."""
    warmup_steps = round(warmup * total_steps)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    linear = LinearLR(
        optimizer, start_factor=1 / warmup_steps, total_iters=max(1, warmup_steps - 1)
    )
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup_steps])
