"""What a model costs: parameters, and FLOPs per image counted by ``torch.utils.flop_counter``."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def mflops_per_image(model: nn.Module, images: Tensor) -> float:
    """FLOPs of one forward pass over ``images``, divided by the batch size, in millions."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(images)
    return counter.get_total_flops() / 1e6 / len(images)
