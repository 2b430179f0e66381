"""Backbones: every model converts to the same logits; the block choice reaches every block."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_norms

import repnet
from repnet import RepBlock
from repnet.dynamic import DynamicConv2d
from repnet.models import MODELS, SPECS, PlainNet, PlainSpec, build_model, repvgg_a0

# The grouped and SE sizes are rows of the same table: a small spec stands for them below.
VARIANTS = {name for name, spec in SPECS.items() if spec.groups > 1 or spec.se}


@pytest.mark.parametrize("name", sorted(set(MODELS) - VARIANTS))
def test_every_model_deploys_to_the_same_logits(name):
    torch.manual_seed(0)
    options = {"block": "dbb", "stem": "small"} if name == "resnet18" else {"block": "full"}
    model = build_model(name, num_classes=7, in_channels=3, **options)
    model = randomize_norms(model).double().eval()
    x = torch.randn(2, 3, 33, 31, dtype=torch.float64)
    deployed = repnet.reparameterize(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    result = repnet.verify(model, deployed, x)
    assert result.max_rel <= 1e-10 and result.argmax_agreement == 1.0


def test_repvgg_sizes_follow_the_paper():
    model = repvgg_a0(num_classes=1000, block="repvgg")
    blocks = [m for m in model.modules() if isinstance(m, RepBlock)]
    assert len(blocks) == 1 + 2 + 4 + 14 + 1
    assert [blocks[i].geometry.out_channels for i in (0, 1, 3, 7, 21)] == [48, 48, 96, 192, 1280]
    deployed = repnet.reparameterize(model)
    assert sum(p.numel() for p in deployed.parameters()) == pytest.approx(8.31e6, rel=0.01)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("plain", ("kxk",)),
        (["kxk", "1x1_avg"], ("kxk", "1x1_avg")),
        ({"branches": "acb"}, ("kxk", "1xk", "kx1")),
    ],
)
def test_the_block_choice_reaches_every_block(block, expected):
    model = build_model("tiny", num_classes=10, in_channels=1, block=block)
    names = {m.branch_names for m in model.modules() if isinstance(m, RepBlock)}
    assert names == {expected}


@pytest.mark.parametrize("kind", ["rep", "dynamic"])
def test_a_branch_list_keeps_identity_only_where_a_block_allows_one(kind):
    """Like a preset, across a network; a single block asked for one it cannot have refuses."""
    block = {"branches": ["kxk", "1x1", "identity"], "kind": kind}
    model = build_model("resnet18", num_classes=10, block=block, stem="small")
    blocks = [m for m in model.modules() if isinstance(m, (RepBlock, DynamicConv2d))]
    for module in blocks:
        geometry = module.geometry
        can_have_one = geometry.in_channels == geometry.out_channels and geometry.stride == (1, 1)
        assert ("identity" in module.branch_names) == can_have_one
    assert {len(m.branch_names) for m in blocks} == {2, 3}
    with pytest.raises(ValueError, match="identity branch cannot exist"):
        RepBlock(3, 48, branches=["kxk", "identity"])
    with pytest.raises(ValueError, match="identity branch cannot exist"):
        build_model("tiny", num_classes=10, in_channels=1, block=["identity"])


def test_small_input_options_are_options_not_forks():
    model = build_model("repvgg_a0", num_classes=10, strides=[1, 1, 2, 2, 2])
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="strides"):
        build_model("tiny", num_classes=10, strides=[1, 2])
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg99", num_classes=10)


@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_the_deploy_skeleton_is_derived_from_the_train_form_and_loads_strictly(name):
    from repnet.deployment import deploy_skeleton

    trained = randomize_norms(build_model(name, num_classes=10, in_channels=1)).eval()
    direct = deploy_skeleton({"name": name, "num_classes": 10, "in_channels": 1})
    direct.load_state_dict(repnet.reparameterize(trained).state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*direct.parameters(), *direct.buffers()])
    x = torch.randn(3, 1, 32, 32)
    assert torch.allclose(trained(x), direct(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", ["repvgg", "dbb", {"kind": "dynamic"}])
def test_grouped_and_squeeze_excite_specs_deploy_to_the_same_logits(block):
    """Groups on every other block of a stage, SE between each block's sum and its ReLU."""
    torch.manual_seed(0)
    spec = PlainSpec((1, 2, 3), (16, 16, 32), (2, 1, 2), groups=2, se=True)
    model = randomize_norms(PlainNet(spec, num_classes=5, block=block)).double().eval()
    blocks = [m for m in model.modules() if isinstance(m, (RepBlock, DynamicConv2d))]
    assert [b.geometry.groups for b in blocks] == [1, 1, 2, 1, 2, 1]
    assert all(type(b.act[0]).__name__ == "SqueezeExcite" for b in blocks)
    x = torch.randn(2, 3, 17, 15, dtype=torch.float64)
    deployed = repnet.reparameterize(model)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-10


def test_repvgg_grouped_sizes_follow_the_paper():
    """Parameter counts of the deploy forms (the RepVGG paper's table, in millions)."""
    for name, millions in (("repvgg_b1g4", 36.12), ("repvgg_b2g4", 55.77)):
        with torch.device("meta"):
            deployed = repnet.reparameterize(build_model(name, num_classes=1000), inplace=True)
        assert sum(p.numel() for p in deployed.parameters()) / 1e6 == pytest.approx(
            millions, rel=0.02
        )
