"""Backbones that take a block choice: ``repvgg_a0(num_classes=1000, block="repvgg")``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from repnet.models.blocks import block_factory
from repnet.models.plain import SPECS, PlainNet, PlainSpec
from repnet.models.pretrained import build_pretrained, load_pretrained
from repnet.models.resnet import ResNet18


def _plain(name: str, **options) -> PlainNet:
    return PlainNet(SPECS[name], **options)


MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(_plain, name) for name in SPECS},
    "resnet18": ResNet18,
}

repvgg_a0 = MODELS["repvgg_a0"]
repvgg_a1 = MODELS["repvgg_a1"]
repvgg_a2 = MODELS["repvgg_a2"]
repvgg_b0 = MODELS["repvgg_b0"]
repvgg_b1 = MODELS["repvgg_b1"]
repvgg_b2 = MODELS["repvgg_b2"]
repvgg_b3 = MODELS["repvgg_b3"]
repvgg_b1g2 = MODELS["repvgg_b1g2"]
repvgg_b1g4 = MODELS["repvgg_b1g4"]
repvgg_b2g2 = MODELS["repvgg_b2g2"]
repvgg_b2g4 = MODELS["repvgg_b2g4"]
repvgg_b3g2 = MODELS["repvgg_b3g2"]
repvgg_b3g4 = MODELS["repvgg_b3g4"]
repvgg_d2se = MODELS["repvgg_d2se"]
resnet18 = ResNet18


def build_model(name: str, **options) -> nn.Module:
    """The model registered as ``name`` (see ``MODELS``) built with ``options``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(MODELS)}")
    return MODELS[name](**options)


__all__ = [
    "MODELS",
    "SPECS",
    "PlainNet",
    "PlainSpec",
    "ResNet18",
    "block_factory",
    "build_model",
    "build_pretrained",
    "load_pretrained",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b1g2",
    "repvgg_b1g4",
    "repvgg_b2",
    "repvgg_b2g2",
    "repvgg_b2g4",
    "repvgg_b3",
    "repvgg_b3g2",
    "repvgg_b3g4",
    "repvgg_d2se",
    "resnet18",
]
