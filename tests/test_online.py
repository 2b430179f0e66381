"""Online re-parameterization: one conv + BN in training, the same deploy form, cheaper steps."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from helpers import (
    QUICK,
    ROOT,
    block_geometry,
    compose,
    deploy_twin_error,
    randomize_norms,
    relative_error,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from repnet import PRESETS, RepBlock
from repnet.branches import BRANCHES, ChannelScale
from repnet.training import train


def online_block(geometry: dict, branches, seed: int = 0) -> RepBlock:
    """An online block with random BN statistics and random branch scales, in float64."""
    torch.manual_seed(seed)
    args = {k: v for k, v in geometry.items() if k != "image"}
    block = RepBlock(**args, branches=branches, act=None, online=True).double()
    randomize_norms(block, seed)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, ChannelScale):
                module.weight.uniform_(-1.5, 1.5)
    return block.eval()


def sample(geometry: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (3, geometry["in_channels"], *geometry["image"])
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


@given(geometry=block_geometry(), branches=st.sampled_from(sorted(PRESETS)))
def test_online_presets_deploy_exactly(geometry, branches):
    block = online_block(geometry, branches)
    x = sample(geometry)
    with torch.no_grad():
        expected = block(x)
        block.switch_to_deploy()
        assert relative_error(expected, block(x)) <= 1e-10


@given(geometry=block_geometry(), name=st.sampled_from(sorted(BRANCHES)))
def test_online_branches_compute_what_the_offline_branches_compute(geometry, name):
    """A branch run online (kernel built, one conv) equals the same branch run as modules."""
    try:
        block = online_block(geometry, [name])
    except ValueError:
        assert name == "identity"
        return
    x = sample(geometry)
    with torch.no_grad():
        as_modules = block.branches[name](x)
        as_one_conv = block.branch_sum()(x)
    assert relative_error(as_modules, as_one_conv) <= 1e-10


def test_online_blocks_hold_one_batchnorm_and_train_every_parameter():
    block = RepBlock(8, 8, branches="dbb", online=True).train()
    norms = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms == [block.norm]
    block(torch.randn(4, 8, 9, 9)).square().mean().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_online_training_on_digits_learns(tmp_path):
    cfg = compose(["block.online=true", "trainer.max_epochs=3", "callbacks.progress_bar=null"])
    summary = train(cfg, tmp_path)
    assert summary["best_val_acc"] > 0.8
    assert summary["max_abs_diff"] < 1e-4 and summary["argmax_agreement"] == 1.0


def test_online_presets_train_for_a_few_batches(tmp_path):
    for preset in ("full", "dbb"):
        summary = train(
            compose([f"block={preset}", "block.online=true", *QUICK]), tmp_path / preset
        )
        assert summary["argmax_agreement"] == 1.0


def test_quick_bench_runs_and_writes_its_json(tmp_path):
    path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(path.read_text())
    assert {"inference", "conversion", "training", "model_scale"} <= set(results)
    stages = [row["stage"] for row in results["training"]]
    assert stages == ["plain conv", "offline full", "online full", "offline dbb", "online dbb"]
    assert all(row["deploy/plain"] > 0 for row in results["inference"])
    assert "## training" in result.stdout
    scale = results["model_scale"]
    presets = [
        f"{mode} {p}" for mode in ("online", "offline") for p in ("repvgg", "acb", "full", "dbb")
    ]
    trained = [row["variant"] for row in scale["training"]]
    assert trained[: 1 + len(presets)] == ["plain", *presets]
    assert all(row["step_ms"] > 0 and row["peak_MB"] > 0 for row in scale["training"])
    assert [row["variant"] for row in scale["conversion"]][: len(trained)] == trained
    assert all(isinstance(row["met"], bool) for row in scale["targets"])
    assert "## model scale: targets" in result.stdout


@given(geometry=block_geometry(), preset=st.sampled_from(sorted(PRESETS)))
def test_online_blocks_deploy_to_the_plain_deploy_form(geometry, preset):
    """Switched, an online block holds only ``fused.*``: a deploy=True block loads it strictly."""
    block = online_block(geometry, preset)
    assert deploy_twin_error(block, geometry, preset, sample(geometry)) <= 1e-10
    assert set(block.state_dict()) == {"fused.weight", "fused.bias"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules())


def kernel_flops(block: RepBlock) -> int:
    with FlopCounterMode(display=False) as counter:
        block.branch_sum()
    return counter.get_total_flops()


def test_online_kernels_need_a_matrix_product_only_for_the_1x1_kxk_branch():
    """Building the summed kernel scales, pads and adds; the pool's composition is an outer
    product and the identity lands on the diagonal: no FLOPs. Only 1x1→kxk multiplies
    matrices: ``2·O·kh·kw·(C/g)·(M/g)`` for the kernel, ``2·O·(M/g)`` for the 1x1's bias
    carried through ``Σ W₂``."""
    cheap = RepBlock(12, 12, branches=["kxk", "1x1", "identity", "1x1_avg"], online=True)
    assert kernel_flops(cheap) == 0
    grouped = RepBlock(12, 12, (3, 5), groups=3, branches=["1x1_kxk"], online=True)
    assert kernel_flops(grouped) == 2 * 12 * 4 * (3 * 5 * 4 + 1)
