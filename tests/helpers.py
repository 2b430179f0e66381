"""Shared test helpers: random BN statistics and random geometry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytorch_lightning as pl
import torch
from hypothesis import strategies as st
from torch import nn


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters (never the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for tensor, low, high in (
                (module.running_mean, -1.0, 1.0),
                (module.running_var, 0.3, 3.0),
                (module.weight, 0.3, 2.0),
                (module.bias, -1.0, 1.0),
            ):
                if tensor is None:  # no running statistics, or no affine parameters
                    continue
                random = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.copy_(low + (high - low) * random)
    return model


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``max|a - b| / max|a|`` (plain ``max|a - b|`` where ``a`` is all zeros)."""
    difference, scale = (reference - other).abs().max().item(), reference.abs().max().item()
    return difference / scale if scale > 0 else difference


@torch.no_grad()
def deploy_twin_error(block: nn.Module, geometry: dict, branches, x: torch.Tensor) -> float:
    """Switch ``block`` to deploy, load its weights strictly (same keys, same shapes) into a
    ``deploy=True`` block of the same geometry, and return its error against ``block`` before."""
    from repnet import RepBlock

    args = {k: v for k, v in geometry.items() if k != "image"}
    twin = RepBlock(**args, branches=branches, act=None, deploy=True).double()
    expected = block(x)
    block.switch_to_deploy()
    twin.load_state_dict(block.state_dict())
    return relative_error(expected, twin(x))


@st.composite
def block_geometry(draw, odd_kernels: bool = True):
    """Random geometry for a block: channels, groups, kernel, stride, padding, dilation, image."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups == 1
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    if depthwise:
        channels = draw(st.integers(2, 5))
        in_channels = out_channels = groups = channels
    sizes = [1, 3, 5, 7] if odd_kernels else [1, 2, 3, 4]
    kernel = (draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    same = [d * (k - 1) // 2 for d, k in zip(dilation, kernel)]
    padding = tuple(draw(st.integers(0, s + 2)) for s in same)
    image = []
    for k, d, p in zip(kernel, dilation, padding):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        image.append(draw(st.integers(smallest, smallest + 7)))
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "image": tuple(image),
    }


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "repnet" / "configs"


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python <checkout>/<script> args...`` from the checkout, its output captured."""
    command = [sys.executable, str(ROOT / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


# A short real run: two epochs of a few batches, no progress bar.
QUICK = [
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.num_sanity_val_steps=0",
    "callbacks.progress_bar=null",
]


def compose(overrides: list[str] = (), return_hydra_config: bool = False):
    """The training config as ``train.py`` would compose it, with ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3", job_name="test"):
        return hydra_compose(
            "train", overrides=list(overrides), return_hydra_config=return_hydra_config
        )


class CrashAtEpochStart(pl.Callback):
    """Raises as training epoch ``epoch`` starts: a run killed mid-way."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


class RecordStart(pl.Callback):
    """Records the epoch, step, learning rate and optimizer state with which ``fit`` starts."""

    seen: ClassVar[dict] = {}

    def on_train_start(self, trainer, module):
        optimizer = trainer.optimizers[0]
        RecordStart.seen.update(
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            lr=optimizer.param_groups[0]["lr"],
            optimizer_states=len(optimizer.state),
        )
