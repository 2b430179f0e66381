"""RepBlock: every branch and preset deploys to the same function, on random geometry."""

from __future__ import annotations

import pytest
import torch
from helpers import block_geometry, deploy_twin_error, randomize_norms, relative_error
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from repnet import PRESETS, RepBlock
from repnet.block import branch_shares
from repnet.branches import BRANCHES, NORMS


def build(geometry: dict, branches, dtype=torch.float64, seed: int = 0) -> RepBlock:
    torch.manual_seed(seed)
    args = {k: v for k, v in geometry.items() if k != "image"}
    block = RepBlock(**args, branches=branches, act=None).to(dtype)
    return randomize_norms(block, seed).eval()


def sample(geometry: dict, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, geometry["in_channels"], *geometry["image"], generator=generator).to(
        dtype
    )


def deploy_error(block: RepBlock, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = block(x)
        block.switch_to_deploy()
        return relative_error(expected, block(x))


def fits(geometry: dict, name: str) -> bool:
    """Whether branch ``name`` can be built for this geometry (identity has conditions)."""
    try:
        build(geometry, [name])
    except ValueError:
        return False
    return True


@given(geometry=block_geometry(), name=st.sampled_from(sorted(BRANCHES)))
def test_every_branch_alone_deploys_exactly(geometry, name):
    if not fits(geometry, name):
        assert name == "identity"
        return
    assert deploy_error(build(geometry, [name]), sample(geometry)) <= 1e-10


@given(geometry=block_geometry(), preset=st.sampled_from(sorted(PRESETS)))
def test_every_preset_deploys_exactly_in_float64(geometry, preset):
    block = build(geometry, preset)
    assert deploy_error(block, sample(geometry)) <= 1e-10


@given(
    geometry=block_geometry(),
    preset=st.sampled_from(sorted(PRESETS)),
    kinds=st.dictionaries(st.sampled_from(sorted(BRANCHES)), st.sampled_from(["bn", "none"])),
    norm_after_sum=st.booleans(),
)
def test_any_branch_norms_and_a_norm_after_the_sum_deploy_exactly(
    geometry, preset, kinds, norm_after_sum
):
    """QARepVGG-style blocks (some branches without BN, one BN after the sum), trained a
    step so the running statistics are not the initial ones, then converted in float64."""
    args = {k: v for k, v in geometry.items() if k != "image"}
    torch.manual_seed(0)
    block = RepBlock(
        **args, branches=preset, branch_norms=kinds, norm_after_sum=norm_after_sum, act=None
    ).double()
    for parameter in block.parameters():  # weights a QARepVGG start zeroed count too
        if parameter.dim() > 1:
            torch.nn.init.normal_(parameter)
    block(sample(geometry, seed=2))  # training mode: the BNs learn statistics
    randomize_norms(block)
    assert (block.norm is not None) == norm_after_sum
    for name, kind in kinds.items():
        if name in block.branches:
            assert isinstance(block.branches[name][0].norm, NORMS[kind])
    assert deploy_error(block.eval(), sample(geometry)) <= 1e-10


def test_a_qarepvgg_block_with_an_identity_starts_as_its_normalised_identity():
    """The other branches' last scales at zero (a BN's ``γ``, else the last learnable
    weight): ``BN(x)`` at the start, and what was zeroed still learns. A block
    without an unnormalised identity (stride 2, or the identity keeps its BN) is as built."""
    qa = {"branch_norms": {"1x1": "none", "identity": "none"}, "norm_after_sum": True}
    block = RepBlock(4, 4, branches="repvgg", act=None, **qa).double()
    assert torch.equal(block.branches["kxk"][0].norm.weight, torch.zeros(4))
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert torch.allclose(block(x), block.norm(x))
    composed = {"branch_norms": {"1x1_kxk": "none", "identity": "none"}, "norm_after_sum": True}
    block = RepBlock(4, 4, branches=["kxk", "1x1_kxk", "identity"], act=None, **composed)
    block(x.float()).square().sum().backward()
    first, second = (stage.op.weight for stage in block.branches["1x1_kxk"])
    assert torch.equal(second, torch.zeros_like(second))
    for zeroed in (second, block.branches["kxk"][0].norm.weight):  # not a dead end: the
        assert zeroed.grad.abs().sum() > 0  # zeros learn first, then what they gate
    assert first.abs().sum() > 0
    strided = RepBlock(4, 4, stride=2, branches="repvgg", **qa)
    assert torch.equal(strided.branches["kxk"][0].norm.weight, torch.ones(4))
    assert strided.branches["1x1"][0].op.weight.abs().sum() > 0
    normed = RepBlock(4, 4, branches="repvgg", branch_norms={"1x1": "none"}, norm_after_sum=True)
    assert torch.equal(normed.branches["kxk"][0].norm.weight, torch.ones(4))


def test_branch_norms_name_known_branches_and_kinds_and_only_offline():
    with pytest.raises(ValueError, match="branch_norms maps branch names"):
        RepBlock(4, 4, branch_norms={"3x3": "none"})
    with pytest.raises(ValueError, match="one of bn, scale, none"):
        RepBlock(4, 4, branch_norms={"1x1": "group"})
    with pytest.raises(ValueError, match="branch_norms is for offline blocks"):
        RepBlock(4, 4, branch_norms={"1x1": "none"}, online=True)


@given(geometry=block_geometry(), preset=st.sampled_from(sorted(PRESETS)))
def test_every_preset_deploys_within_float32_tolerance(geometry, preset):
    block = build(geometry, preset, dtype=torch.float32)
    assert deploy_error(block, sample(geometry, torch.float32)) <= 1e-5


@given(geometry=block_geometry(odd_kernels=False), preset=st.sampled_from(["plain", "acb"]))
def test_even_kernels_deploy_or_say_which_branch_cannot_be_centred(geometry, preset):
    try:
        block = build(geometry, preset)
    except ValueError as error:
        assert "cannot be centred" in str(error)
        assert any(k % 2 == 0 for k in geometry["kernel_size"]) and preset == "acb"
        return
    assert deploy_error(block, sample(geometry)) <= 1e-10


@given(geometry=block_geometry())
def test_statistics_learned_in_training_mode_deploy_exactly(geometry):
    block = build(geometry, ["kxk", "1x1_kxk", "1x1_avg"]).train()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    for step in range(3):
        loss = block(sample(geometry, seed=10 + step)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert deploy_error(block.eval(), sample(geometry)) <= 1e-10


def test_switch_to_deploy_is_idempotent_and_drops_branch_state():
    block = randomize_norms(RepBlock(4, 4, branches="dbb")).eval()
    x = torch.randn(2, 4, 7, 9)
    block.switch_to_deploy()
    first = block(x)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    block.switch_to_deploy()
    assert torch.equal(first, block(x))
    assert set(state) == {"fused.weight", "fused.bias"}
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules())


def test_deploy_true_builds_the_fused_form_directly():
    trained = randomize_norms(RepBlock(3, 6, (3, 5), stride=2, dilation=2)).eval()
    direct = RepBlock(3, 6, (3, 5), stride=2, dilation=2, deploy=True)
    trained.switch_to_deploy()
    direct.load_state_dict(trained.state_dict())
    x = torch.randn(2, 3, 11, 12)
    assert torch.equal(trained(x), direct(x))


def test_presets_leave_out_an_identity_that_cannot_exist():
    assert "identity" in RepBlock(4, 4, branches="full").branch_names
    assert "identity" not in RepBlock(4, 8, branches="full").branch_names
    assert "identity" not in RepBlock(4, 4, stride=2, branches="repvgg").branch_names


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 4, "out_channels": 8, "branches": ["kxk", "identity"]}, "in_channels"),
        ({"in_channels": 4, "out_channels": 4, "stride": 2, "branches": ["identity"]}, "stride"),
        ({"in_channels": 4, "out_channels": 4, "kernel_size": 2, "branches": "full"}, "centred"),
        ({"in_channels": 4, "out_channels": 6, "groups": 4}, "divisible"),
        ({"in_channels": 4, "out_channels": 4, "padding": -1}, "non-negative"),
        ({"in_channels": 4, "out_channels": 4, "dilation": 0}, "dilation"),
        ({"in_channels": 4, "out_channels": 4, "branches": "fancy"}, "unknown branch preset"),
        ({"in_channels": 4, "out_channels": 4, "branches": ["kxk", "3x3"]}, "distinct names"),
        ({"in_channels": 4, "out_channels": 4, "branches": ["kxk", "kxk"]}, "distinct names"),
    ],
)
def test_bad_geometry_is_a_value_error_that_says_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RepBlock(**kwargs)


def test_gradients_reach_every_branch():
    block = RepBlock(4, 4, branches="full").train()
    block(torch.randn(2, 4, 6, 6)).sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


GROUPED_IDENTITY = {
    "in_channels": 4,
    "out_channels": 4,
    "kernel_size": (3, 5),
    "stride": (1, 1),
    "padding": (2, 1),
    "dilation": (2, 1),
    "groups": 2,
    "image": (6, 7),
}


@given(geometry=block_geometry(), preset=st.sampled_from(sorted(PRESETS)))
# Rare in block_geometry: groups with in = out and stride 1 (a grouped identity).
@example(geometry=GROUPED_IDENTITY, preset="full")
def test_deploy_true_block_loads_the_switched_weights_on_random_geometry(geometry, preset):
    """The fused conv keeps the block's geometry (groups included): a strict load, same numbers."""
    trained = build(geometry, preset)
    assert deploy_twin_error(trained, geometry, preset, sample(geometry)) <= 1e-10
    assert trained.fused.groups == geometry["groups"]


@given(
    geometry=block_geometry(),
    preset=st.sampled_from(sorted(PRESETS)),
    eps=st.sampled_from([1e-3, 0.5]),
)
def test_batchnorm_eps_is_folded_as_set(geometry, preset, eps):
    block = build(geometry, preset)
    for module in block.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = eps
    assert deploy_error(block, sample(geometry)) <= 1e-10


@given(geometry=block_geometry(), preset=st.sampled_from(sorted(PRESETS)))
def test_default_padding_keeps_the_size_at_stride_one(geometry, preset):
    args = {k: v for k, v in geometry.items() if k not in ("image", "padding", "stride")}
    torch.manual_seed(0)
    block = RepBlock(**args, branches=preset, act=None).double().eval()
    x = sample(geometry)
    assert block(x).shape[-2:] == x.shape[-2:]
    block.switch_to_deploy()
    assert block(x).shape[-2:] == x.shape[-2:]


def test_switch_to_deploy_twice_keeps_the_same_fused_module():
    block = RepBlock(4, 4, branches="dbb").eval()
    block.switch_to_deploy()
    fused = block.fused
    block.switch_to_deploy()
    assert block.fused is fused


def test_branch_shares_of_a_block_sum_to_one_and_skip_deployed_blocks():
    model = torch.nn.Sequential(randomize_norms(RepBlock(4, 4, branches="full")), RepBlock(4, 4))
    model[1].switch_to_deploy()
    shares = branch_shares(model)
    assert set(shares) == set(model[0].branch_names)
    assert all(len(v) == 1 for v in shares.values())
    assert abs(sum(v[0] for v in shares.values()) - 1) < 1e-6


def test_an_identity_with_an_even_kernel_says_so():
    with pytest.raises(ValueError, match="even kernel"):
        RepBlock(4, 4, kernel_size=(3, 2), branches=["kxk", "identity"])


def norm_keys(prefix: str) -> set[str]:
    stats = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return {f"{prefix}.norm.{name}" for name in stats}


def test_checkpoint_keys_of_the_train_form_are_pinned():
    """The pool's and the identity's kernels are non-persistent: checkpoints hold only what
    is learned, under the same keys as ever."""
    block = RepBlock(4, 4, branches="dbb")
    expected = {
        "branches.kxk.0.op.weight",
        "branches.1x1.0.op.weight",
        "branches.1x1_kxk.0.op.weight",
        "branches.1x1_kxk.1.op.weight",
        "branches.1x1_avg.0.op.weight",
    }
    for stage in ("kxk.0", "1x1.0", "1x1_kxk.0", "1x1_kxk.1", "1x1_avg.0", "1x1_avg.1"):
        expected |= norm_keys(f"branches.{stage}")
    assert set(block.state_dict()) == expected
    assert "branches.1x1_avg.1.op.weight" in dict(block.named_buffers())
    identity = RepBlock(4, 4, branches="repvgg")
    assert "branches.identity.0.op.weight" in dict(identity.named_buffers())
    assert "branches.identity.0.op.weight" not in identity.state_dict()


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def test_pool_and_identity_branches_run_per_channel_not_as_dense_convs():
    """1x1_avg: the padded 1x1, then a depthwise box (C·9 MACs per pixel, not C²·9); the
    identity: no FLOPs at all."""
    channels, x = 16, torch.randn(2, 16, 9, 7)
    pool = RepBlock(channels, channels, branches=["1x1_avg"], act=None)
    one_by_one = 2 * channels * channels * 2 * 11 * 9  # out channels × in × batch × 11x9 map
    box = 2 * channels * 9 * 2 * 9 * 7
    assert forward_flops(pool, x) == one_by_one + box
    assert forward_flops(RepBlock(channels, channels, branches=["identity"], act=None), x) == 0
