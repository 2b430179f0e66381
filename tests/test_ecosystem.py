"""Models and weights from the ecosystem: timm's re-parameterizable families convert fully
with repnet alone, and published RepVGG / DBB / ACNet weights load by rule, both ways."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norms
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repnet
from repnet.errors import CheckpointError, UsageError
from repnet.models import PlainNet, PlainSpec, build_model
from repnet.models.pretrained import (
    build_pretrained,
    from_repnet,
    head_and_backbone,
    load_pretrained,
    to_repnet,
)
from repnet.reparam import unmerged_branches

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

REPVGG_SIZES = [
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b1g4",
    "repvgg_b2",
    "repvgg_b2g4",
    "repvgg_b3",
    "repvgg_b3g4",
    "repvgg_d2se",
]


@pytest.mark.parametrize(
    "name",
    ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m1", "repghostnet_050", "efficientnet_b0"],
)
def test_timm_models_convert_fully_and_exactly_with_repnet_alone(name):
    """No BN and no summed branches left, nothing left that timm's own conversion removes,
    float64 kept, the original untouched, the function kept to float64 rounding."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, num_classes=10)).double().eval()
    before = copy.deepcopy(model.state_dict())
    deployed = repnet.reparameterize(model)
    assert not any(isinstance(m, _BatchNorm) for m in deployed.modules())
    assert unmerged_branches(deployed) == []
    timm_keys = set(reparameterize_model(model).state_dict())
    left = [
        key
        for key in deployed.state_dict()
        if key not in timm_keys
        and not (key.endswith(".bias") and f"{key[:-5]}.weight" in timm_keys)
    ]
    assert left == []  # only the biases BNs were folded into are new
    assert {p.dtype for p in deployed.parameters()} == {torch.float64}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    result = repnet.verify(model, deployed, x)
    assert result.max_rel <= 1e-10 and result.argmax_agreement == 1.0


# ---- published layouts ----


def shapes(state: dict) -> dict:
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("name", REPVGG_SIZES)
def test_every_timm_repvgg_size_maps_onto_repnet_key_for_key(name):
    """Built on the meta device (no memory): every timm key maps, every shape fits, and
    repnet's weights written back in timm's layout are timm's keys exactly."""
    with torch.device("meta"):
        theirs = timm.create_model(name).state_dict()
        ours = build_model(name, num_classes=1000).state_dict()
    assert shapes(to_repnet(theirs, "timm")) == shapes(ours)
    assert shapes(from_repnet(ours, "timm")) == shapes(theirs)


def tiny_timm_repvgg(groups: int = 0, se: bool = False) -> nn.Module:
    """timm's RepVGG construction at a test's size: one block per stage."""
    from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg

    extra = {"attn_layer": "se", "attn_kwargs": {"rd_ratio": 1 / 16, "rd_divisor": 1}} if se else {}
    config = ByoModelCfg(
        blocks=_rep_vgg_bcfg(d=(2, 2, 1, 1), wf=(0.25, 0.25, 0.25, 0.25), groups=groups),
        stem_type="rep",
        stem_chs=16,
        **extra,
    )
    return ByobNet(config, num_classes=5)


@pytest.mark.parametrize(("groups", "se"), [(0, False), (2, False), (0, True)])
def test_timm_repvgg_weights_give_repnet_the_same_function_in_both_forms(groups, se):
    """Grouped layers (every other block from the second on) and SE (between the sum and
    the ReLU) in the same places as timm's; the deployed weights load deployed."""
    torch.manual_seed(0)
    theirs = randomize_norms(tiny_timm_repvgg(groups, se)).double().eval()
    spec = PlainSpec((1, 2, 2, 1, 1), (16, 16, 32, 64, 128), (2, 2, 2, 2, 2), max(groups, 1), se)
    ours = PlainNet(spec, num_classes=5).double()
    report = load_pretrained(ours, theirs.state_dict())
    assert report.layout == "timm" and not report.reinitialised
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert repnet.verify(theirs, ours, x).max_rel <= 1e-12
    deployed_theirs = reparameterize_model(theirs)
    deployed = PlainNet(spec, num_classes=5, block={"branches": "repvgg", "deploy": True})
    load_pretrained(deployed.double(), deployed_theirs.state_dict())
    assert repnet.verify(theirs, deployed, x).max_rel <= 1e-10


OFFICIAL_REPVGG_KEYS = {
    "repvgg_a0": {
        "stage0.rbr_dense.conv.weight": (48, 3, 3, 3),
        "stage0.rbr_1x1.bn.running_var": (48,),
        "stage1.1.rbr_identity.weight": (48,),
        "stage3.13.rbr_dense.bn.num_batches_tracked": (),
        "stage4.0.rbr_1x1.conv.weight": (1280, 192, 1, 1),
        "linear.weight": (1000, 1280),
    },
    "repvgg_b1g4": {  # groups on the layers 2, 4, 6, …, counting stage0 as 0
        "stage1.0.rbr_dense.conv.weight": (128, 64, 3, 3),
        "stage1.1.rbr_dense.conv.weight": (128, 32, 3, 3),
        "stage1.1.rbr_1x1.conv.weight": (128, 32, 1, 1),
        "stage1.2.rbr_dense.conv.weight": (128, 128, 3, 3),
        "stage2.0.rbr_dense.conv.weight": (256, 128, 3, 3),  # layer 5
        "stage2.1.rbr_dense.conv.weight": (256, 64, 3, 3),  # layer 6
    },
    "repvgg_d2se": {
        "stage0.se.down.weight": (4, 64, 1, 1),
        "stage1.7.se.up.bias": (160,),
        "stage4.0.se.down.weight": (160, 2560, 1, 1),
    },
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_REPVGG_KEYS))
@pytest.mark.parametrize("deployed", [False, True])
def test_official_repvgg_layout_round_trips(name, deployed):
    """repnet's weights written in the official layout (the rule read the other way) have
    the official names and shapes, and read back to the same tensors."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=1000, block="repvgg")
    if deployed:
        model = repnet.reparameterize(model, inplace=True)
    ours = model.state_dict()
    official = from_repnet(ours, "repvgg")
    wanted = OFFICIAL_REPVGG_KEYS[name]
    if deployed:
        wanted = {"stage0.rbr_reparam.bias": (official["stage0.rbr_reparam.bias"].shape[0],)}
        assert not any("rbr_dense" in key for key in official)
    assert {k: tuple(official[k].shape) for k in wanted} == wanted
    back = to_repnet(official)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())


def test_official_deployed_repvgg_weights_build_a_deployed_model(tmp_path):
    torch.manual_seed(0)
    trained = randomize_norms(build_model("repvgg_a0", num_classes=3)).double().eval()
    path = tmp_path / "RepVGG-A0-deploy.pth"
    official = from_repnet(repnet.reparameterize(trained).state_dict(), "repvgg")
    torch.save(official, path)
    model, report = build_pretrained("repvgg_a0", path)
    assert report.layout == "repvgg" and report.loaded == len(official)
    assert all(m.deployed for m in model.modules() if isinstance(m, repnet.RepBlock))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert repnet.verify(trained, model.double(), x).max_rel <= 1e-10


# DBB and ACNet blocks, computed from their published definitions in the official layout.


def bn(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(
        x,
        state[f"{prefix}running_mean"],
        state[f"{prefix}running_var"],
        state[f"{prefix}weight"],
        state[f"{prefix}bias"],
        eps=1e-5,
    )


def bn_and_pad(state: dict, prefix: str, x: torch.Tensor, pad: int) -> torch.Tensor:
    """DBB's BN-and-pad: BN, then a border of ``pad`` pixels holding what BN gives a zero."""
    y = F.pad(bn(state, prefix, x), (pad,) * 4)
    border = bn(state, prefix, torch.zeros_like(x[:, :, :1, :1]))
    inside = F.pad(torch.ones_like(x[:, :1]), (pad,) * 4)
    return y + (1 - inside) * border


def dbb_block(state: dict, x: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """A 3x3 DiverseBranchBlock in the official layout: ``kxk + 1x1 + (1x1→avg) + (1x1→kxk)``,
    the last with an identity-based 1x1 (``W + I``)."""
    w = state["dbb_1x1_kxk.idconv1.weight"]
    eye = torch.zeros_like(w)
    eye[torch.arange(w.shape[0]), torch.arange(w.shape[0]) % w.shape[1]] = 1
    origin = bn(
        state,
        "dbb_origin.bn.",
        F.conv2d(x, state["dbb_origin.conv.weight"], None, stride, 1, 1, groups),
    )
    point = bn(
        state, "dbb_1x1.bn.", F.conv2d(x, state["dbb_1x1.conv.weight"], None, stride, 0, 1, groups)
    )
    avg = F.conv2d(x, state["dbb_avg.conv.weight"], groups=groups)
    avg = F.avg_pool2d(bn_and_pad(state, "dbb_avg.bn.bn.", avg, 1), 3, stride)
    avg = bn(state, "dbb_avg.avgbn.", avg)
    mid = bn_and_pad(state, "dbb_1x1_kxk.bn1.bn.", F.conv2d(x, w + eye, groups=groups), 1)
    deep = F.conv2d(mid, state["dbb_1x1_kxk.conv2.weight"], None, stride, 0, 1, groups)
    return origin + point + avg + bn(state, "dbb_1x1_kxk.bn2.", deep)


def acb_block(state: dict, x: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """A 3x3 ACNet block in the official layout: ``3x3 + 3x1 + 1x3``, each with its BN."""
    square = F.conv2d(x, state["square_conv.weight"], None, stride, 1, 1, groups)
    ver = F.conv2d(x, state["ver_conv.weight"], None, stride, (1, 0), 1, groups)
    hor = F.conv2d(x, state["hor_conv.weight"], None, stride, (0, 1), 1, groups)
    return bn(state, "square_bn.", square) + bn(state, "ver_bn.", ver) + bn(state, "hor_bn.", hor)


@pytest.mark.parametrize(("layout", "reference"), [("dbb", dbb_block), ("acb", acb_block)])
@pytest.mark.parametrize(("stride", "groups"), [(1, 1), (2, 2)])
def test_dbb_and_acnet_blocks_map_by_rule_to_the_same_function(layout, reference, stride, groups):
    torch.manual_seed(0)
    block = repnet.RepBlock(4, 6, stride=stride, groups=groups, branches=layout, act=None)
    block = randomize_norms(block).double().eval()
    official = from_repnet({f"layer.{k}": v for k, v in block.state_dict().items()}, layout)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    inner = {k.removeprefix("layer."): v for k, v in official.items()}
    assert (reference(inner, x, stride, groups) - block(x)).abs().max() <= 1e-12
    back = to_repnet(official)
    assert back.keys() == {f"layer.{k}" for k in block.state_dict()}
    deployed = from_repnet(repnet.reparameterize(block).state_dict(), layout)
    assert set(deployed) == {
        f"{'dbb_reparam' if layout == 'dbb' else 'fused_conv'}.{p}" for p in ("weight", "bias")
    }


def test_what_does_not_map_is_listed_with_the_reason():
    block = repnet.RepBlock(4, 4, branches="dbb").state_dict()
    official = from_repnet(block, "dbb")
    official["dbb_1x1_kxk.conv1.weight"] = official.pop("dbb_1x1_kxk.idconv1.weight")
    with pytest.raises(CheckpointError, match=r"dbb_1x1_kxk\.conv1\.weight.*inner width"):
        to_repnet(official)
    with pytest.raises(CheckpointError, match="no known layout"):
        to_repnet({"features.0.weight": torch.zeros(1)})


def test_fine_tuning_reinitialises_a_classifier_of_another_size_and_refuses_the_rest(tmp_path):
    torch.manual_seed(0)
    source = randomize_norms(build_model("tiny", num_classes=10, in_channels=1)).eval()
    path = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model = build_model("tiny", num_classes=3, in_channels=1)
    head = model.head.weight.clone()
    report = load_pretrained(model, path)
    assert report.reinitialised == ("head.weight", "head.bias") and "re-initialised" in str(report)
    assert torch.equal(model.head.weight, head)
    assert torch.equal(
        model.stages[1][0].branches.kxk[0].op.weight, source.stages[1][0].branches.kxk[0].op.weight
    )
    heads, backbone = head_and_backbone(model)
    assert len(heads) == 2 and len(backbone) == len(list(model.parameters())) - 2
    with pytest.raises(CheckpointError, match=r"resized: stages\.0\.0"):
        load_pretrained(build_model("tiny", num_classes=10, in_channels=3), path)


def test_train_starts_from_timm_weights_with_a_new_classifier_and_a_slower_backbone(tmp_path):
    """``model.pretrained=<timm file>``: the backbone holds timm's weights, the 10-class head
    is new, the backbone's groups run at ``optim.backbone_lr`` × the LR, and the run trains."""
    from helpers import QUICK, compose
    from safetensors.torch import save_file

    from repnet.config import check_train_config
    from repnet.data import DigitsDataModule
    from repnet.training import build_module, train

    theirs = timm.create_model("repvgg_a0", num_classes=5, in_chans=1)
    path = tmp_path / "repvgg_a0.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, path)
    overrides = [
        "model=repvgg_a0",
        "block=repvgg",
        f"model.pretrained={path}",
        "optim.backbone_lr=0.1",
        "data.batch_size=16",
        *QUICK,
    ]
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    config = check_train_config(compose([*overrides, "optim.scheduler=null"]))
    module = build_module(config, datamodule)
    expected = to_repnet(theirs.state_dict())
    state = module.model.state_dict()
    backbone = [k for k in expected if not k.startswith("head.")]
    assert all(torch.equal(state[k], expected[k]) for k in backbone)
    assert module.model.head.out_features == 10
    optimizer = module.configure_optimizers()
    lrs = {group["name"]: group["lr"] for group in optimizer["optimizer"].param_groups}
    assert lrs["backbone_decay"] == pytest.approx(0.1 * lrs["head_decay"])
    summary = train(compose(overrides), tmp_path / "run")
    assert summary["best_val_acc"] is not None
    with pytest.raises(UsageError, match=r"model\.pretrained: Path does not point to a file"):
        check_train_config(compose(["model.pretrained=/no/such/file.pth"]))
    wrong = [*overrides[:2], f"model.pretrained={path}", "model=tiny"]
    with pytest.raises(UsageError, match=r"model\.pretrained: the timm weights do not fit"):
        train(compose(wrong[2:]), tmp_path / "refused")


def test_deploy_takes_published_weights_with_a_model_name(tmp_path):
    """``deploy.py ckpt_path=<timm weights> model=repvgg_a0``: no run needed; the folder's
    model computes timm's function and describes itself as an ImageNet-style model."""
    import json

    from safetensors.torch import save_file

    from repnet.deployment import deploy

    theirs = randomize_norms(timm.create_model("repvgg_a0", num_classes=7)).eval()
    path = tmp_path / "repvgg_a0.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, path)
    out = tmp_path / "deploy"
    report = deploy(path, model="repvgg_a0", input_size=[3, 64, 64], out_dir=out)
    assert report.checks["random inputs"].max_rel < 1e-5
    card = json.loads((out / "config.json").read_text())
    assert card["architecture"] == "repvgg_a0" and card["num_classes"] == 7
    assert card["model_args"] == {"in_channels": 3, "block": "repvgg"}
    assert card["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert card["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert card["label_names"] == [str(i) for i in range(7)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, ours = theirs(x), repnet.load_deployed(out)(x)
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    with pytest.raises(UsageError, match="cannot build 'repvgg_z9'"):
        deploy(path, model="repvgg_z9", out_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
