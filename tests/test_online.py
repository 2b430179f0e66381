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
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from repnet import PRESETS, RepBlock
from repnet.branches import BRANCHES, ChannelScale, scaled_kernel, summed_kernel
from repnet.kernels import Conv
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


def branch_lists():
    return st.lists(st.sampled_from(sorted(BRANCHES)), min_size=1, max_size=4, unique=True)


def online_block_or_none(geometry: dict, names: list[str]) -> RepBlock | None:
    """A random online block (``online_block``), or ``None`` where an identity cannot exist."""
    try:
        return online_block(geometry, names)
    except ValueError:
        assert "identity" in names
        return None


def parameter_grads(
    block: RepBlock, output: torch.Tensor, cotangent: torch.Tensor, *inputs: torch.Tensor
) -> list:
    """Gradients of ``<output, cotangent>`` for every parameter of ``block``, then ``inputs``."""
    wrt = [*block.parameters(), *inputs]
    grads = torch.autograd.grad(output, wrt, cotangent, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(wrt, grads)]


@given(geometry=block_geometry(), names=branch_lists())
def test_scaled_kernel_is_the_algebras_sum_with_the_same_gradients(geometry, names):
    """The one-pass custom autograd function gives the kernel algebra's ``Σ_b γ_b·W_b``, its
    geometry, and the gradients autograd gives through the algebra (float64)."""
    block = online_block_or_none(geometry, names)
    if block is None:
        return
    size = block.geometry.kernel_size
    expected, built = summed_kernel(block.branches, size), scaled_kernel(block.branches, size)
    for field in ("stride", "padding", "dilation", "groups"):
        assert getattr(built, field) == getattr(expected, field), field
    assert relative_error(expected.weight, built.weight) <= 1e-12
    assert not built.bias.any() and not expected.bias.any()
    cotangent = torch.randn_like(expected.weight)
    for mine, theirs in zip(
        parameter_grads(block, built.weight, cotangent),
        parameter_grads(block, expected.weight, cotangent),
    ):
        assert relative_error(theirs, mine) <= 1e-10


class KernelOf(torch.nn.Module):
    """``forward()`` = the online kernel of ``block`` (for ``functional_call``)."""

    def __init__(self, block: RepBlock):
        super().__init__()
        self.block = block

    def forward(self) -> torch.Tensor:
        return scaled_kernel(self.block.branches, self.block.geometry.kernel_size).weight


@settings(max_examples=15)
@given(geometry=block_geometry(), names=branch_lists())
def test_scaled_kernel_passes_gradcheck(geometry, names):
    """Finite differences agree with the custom backward, for every input (weights, scales)."""
    block = online_block_or_none(geometry, names)
    if block is None:
        return
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    keys = [f"block.{name}" for name, _ in block.named_parameters()]
    kernel = KernelOf(block)

    def built(*values):
        return torch.func.functional_call(kernel, dict(zip(keys, values)), ())

    assert torch.autograd.gradcheck(built, params, eps=1e-6, atol=1e-8)


@given(geometry=block_geometry(), preset=st.sampled_from(sorted(PRESETS)))
def test_online_training_forward_and_backward_equal_the_algebras(geometry, preset):
    """A training-mode online block (kernel rebuilt in backward where that is cheap) gives the
    output and every parameter gradient of ``BN(conv(x, summed_kernel))`` by plain autograd."""
    block = online_block(geometry, preset).train()
    x = sample(geometry).requires_grad_()
    output = block(x)
    expected = block.norm(summed_kernel(block.branches, block.geometry.kernel_size)(x))
    assert relative_error(expected, output) <= 1e-10
    cotangent = torch.randn_like(output)
    mine = parameter_grads(block, output, cotangent, x)
    theirs = parameter_grads(block, expected, cotangent, x)
    for a, b in zip(theirs, mine):
        assert relative_error(a, b) <= 1e-10


def saved_storages(block: RepBlock, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward during ``block(x)``."""
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    return saved


def test_online_blocks_save_no_built_kernel_for_backward():
    """Only parameters and activations are saved: no full-size kernel (summed, scaled or
    padded). A ``dbb`` block, whose kernel needs a matrix product, keeps its summed kernel
    (building it again would cost the product once more), and nothing else kernel-sized."""
    x = torch.randn(2, 6, 7, 7)
    for preset, kept in (("repvgg", 0), ("acb", 0), ("full", 0), ("dbb", 1)):
        block = RepBlock(6, 6, branches=preset, online=True).train()
        params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        built = [
            t
            for t in saved_storages(block, x)
            if t.shape == (6, 6, 3, 3) and t.untyped_storage().data_ptr() not in params
        ]
        assert len(built) == kept, preset


def test_a_1x1_kxk_second_weight_is_stored_mid_channel_major_with_its_usual_shape():
    block = RepBlock(4, 6, branches=["1x1_kxk"], groups=2)
    weight = block.branches["1x1_kxk"][1].op.weight
    assert weight.shape == (6, 2, 3, 3) and weight.transpose(0, 1).is_contiguous()
    assert block.state_dict()["branches.1x1_kxk.1.op.weight"].shape == (6, 2, 3, 3)
    assert isinstance(block.branch_kernels()["1x1_kxk"], Conv)
