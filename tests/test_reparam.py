"""Whole-model conversion: duck-typed blocks, graph conv→BN fusion, verification."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_norms
from torch import nn

import repnet
from repnet.errors import DeployError
from repnet.kernels import Conv, add, fuse_bn, of_conv2d, to_conv2d
from repnet.reparam import unmerged_branches


def no_batchnorm_left(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_lose_every_batchnorm_and_keep_their_output(name):
    torch.manual_seed(0)
    model = randomize_norms(getattr(torchvision.models, name)(num_classes=10)).double().eval()
    x = torch.randn(2, 3, 67, 61, dtype=torch.float64)
    deployed = repnet.reparameterize(model)
    assert no_batchnorm_left(deployed)
    assert type(deployed) is type(model)
    result = repnet.verify(model, deployed, x)
    assert result.max_rel <= 1e-10 and result.argmax_agreement == 1.0


def test_repblocks_inside_any_model_are_switched_and_the_input_left_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        repnet.RepBlock(3, 8, stride=2, branches="dbb"),
        repnet.RepBlock(8, 8, branches="full"),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    model = randomize_norms(model).double().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 15, 13, dtype=torch.float64)
    deployed = repnet.reparameterize(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model[0].deployed and deployed[0].deployed and deployed[1].deployed
    assert no_batchnorm_left(deployed)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-10
    again = repnet.reparameterize(deployed)
    assert torch.equal(deployed(x), again(x))


class ThirdPartyBlock(nn.Module):
    """A block from elsewhere: two parallel convs, merged by its own ``switch_to_deploy``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.a(x) + self.b(x) if hasattr(self, "b") else self.a(x)

    def switch_to_deploy(self):
        if hasattr(self, "b"):
            self.a = to_conv2d(add(of_conv2d(self.a), of_conv2d(self.b)))
            del self.b


def test_duck_typed_blocks_are_switched_too():
    model = nn.Sequential(ThirdPartyBlock(), nn.ReLU()).double()
    deployed = repnet.reparameterize(model)
    assert not hasattr(deployed[0], "b")
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    assert repnet.verify(model, deployed, x).max_abs <= 1e-12


def test_inplace_conversion_returns_the_same_object():
    model = nn.Sequential(repnet.RepBlock(2, 2))
    assert repnet.reparameterize(model, inplace=True) is model and model[0].deployed


def test_verify_reports_a_real_difference():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Flatten())
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].bias.add_(0.5)
    result = repnet.verify(model, other, torch.randn(2, 1, 1, 1))
    assert result.max_abs == pytest.approx(0.5)
    assert "max abs diff" in str(result)


class PartlyTraceable(nn.Module):
    """Data-dependent control flow at the top (the whole model cannot be traced); a conv→BN
    pair inside a traceable child, and one only the untraceable forward shows."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


def test_untraceable_models_still_fold_what_their_traceable_parts_show():
    model = randomize_norms(PartlyTraceable()).double().eval()
    deployed = repnet.reparameterize(model)
    assert isinstance(deployed.features[1], nn.Identity)
    assert isinstance(deployed.bn, nn.BatchNorm2d)  # its pair is only in the untraced forward
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-10


def test_a_conversion_that_changes_nothing_says_so():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="changed nothing"):
        repnet.reparameterize(model)


def test_conv_value_round_trip_keeps_geometry():
    module = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 3), dilation=(1, 2), groups=2)
    conv = of_conv2d(module)
    assert isinstance(conv, Conv) and conv.groups == 2 and conv.dilation == (1, 2)


def test_sync_batchnorm_models_convert_too():
    """``trainer=ddp`` turns every BatchNorm into a SyncBatchNorm; conversion must not care."""
    model = nn.Sequential(
        repnet.RepBlock(3, 4, branches="dbb"), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    model = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_norms(model)).double().eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    deployed = repnet.reparameterize(model)
    assert no_batchnorm_left(deployed)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-10


@pytest.mark.parametrize(
    ("conv", "bn", "folded"),
    [
        (nn.Conv2d(2, 3, 3, padding="same"), nn.BatchNorm2d(3), True),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(3), True),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(3), True),
        (nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), False),
        (nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False), True),
    ],
)
def test_pairs_that_cannot_fold_are_kept_and_the_rest_fold(conv, bn, folded):
    model = randomize_norms(nn.Sequential(conv, bn)).double().eval()
    deployed = repnet.reparameterize(model)
    assert isinstance(deployed[1], nn.Identity) == folded
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-10


class NormAct(nn.BatchNorm2d):
    """A BN that adds dropout and an activation (timm's ``BatchNormAct2d`` shape)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop, self.act = nn.Dropout(0.5), nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BEFORE = 2  # the BN's index in the cases below where it comes first


@pytest.mark.parametrize(
    ("layers", "shape", "folded"),
    [
        ([nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3)], (2, 2, 9), True),
        ([nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3)], (2, 2, 5, 4, 6), True),
        ([nn.Linear(4, 3), nn.BatchNorm1d(3)], (5, 4), True),
        ([nn.Conv2d(2, 4, 3, padding=1, groups=2), NormAct(4)], (2, 2, 7, 6), True),
        ([nn.ReLU(), nn.Identity(), nn.BatchNorm1d(4), nn.Linear(4, 3)], (5, 4), True),
        ([nn.ReLU(), nn.Identity(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, groups=2)], None, True),
        ([nn.ReLU(), nn.Identity(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)], None, True),
        (
            [nn.ReLU(), nn.Identity(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)],
            None,
            False,  # zero padding: the border would need BN(0), not 0
        ),
        (
            [
                nn.ReLU(),
                nn.Identity(),
                nn.BatchNorm2d(4),
                nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"),
            ],
            None,
            True,
        ),
        ([nn.ReLU(), nn.Identity(), NormAct(4), nn.Conv2d(4, 6, 1)], None, False),
    ],
)
def test_bns_fold_into_every_linear_map_beside_them_where_exact(layers, shape, folded):
    """After a Conv1d/2d/3d or a Linear (a BN with an activation keeps the activation), and
    before one where its padding allows."""
    model = randomize_norms(nn.Sequential(*layers)).double().eval()
    deployed = repnet.reparameterize(model)
    norm_index = BEFORE if len(layers) == 4 else 1
    left = deployed[norm_index]
    assert (not isinstance(left, nn.modules.batchnorm._BatchNorm)) == folded
    if folded and isinstance(layers[norm_index], NormAct):
        assert isinstance(left[-1], nn.SiLU)
    x = torch.randn(*(shape or (2, 4, 7, 6)), dtype=torch.float64)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-10


# ---- proposed by the mutation audit ----


class SharedUse(nn.Module):
    """A conv→BN pair whose conv output, conv module or BN module is used elsewhere too:
    folding it would change that other use."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.conv, self.other = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if self.case == "conv output reused":
            y = self.conv(x)
            return self.bn(y) + y
        if self.case == "conv called twice":
            return self.bn(self.conv(x)) + self.conv(x)
        return self.bn(self.conv(x)) + self.bn(self.other(x))  # "bn called twice"


@pytest.mark.parametrize("case", ["conv output reused", "conv called twice", "bn called twice"])
def test_a_conv_or_bn_used_elsewhere_is_not_folded(case):
    model = randomize_norms(SharedUse(case)).double().eval()
    deployed = repnet.reparameterize(model)
    assert isinstance(deployed.bn, nn.BatchNorm2d)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-10


def test_a_conv2d_subclass_with_its_own_forward_is_not_folded():
    """A QAT conv (a leaf ``nn.Conv2d`` subclass) fake-quantizes its weight: folding the raw
    weight into the BN would be wrong."""
    qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    conv = torch.ao.nn.qat.Conv2d(2, 3, 3, padding=1, qconfig=qconfig)
    model = randomize_norms(nn.Sequential(conv, nn.BatchNorm2d(3)))
    model(torch.randn(4, 2, 7, 6))  # in train mode: the observers see the weight
    model.eval()
    deployed = repnet.reparameterize(model)
    assert isinstance(deployed[1], nn.BatchNorm2d)
    assert repnet.verify(model, deployed, torch.randn(2, 2, 7, 6)).max_rel <= 1e-6


def test_conversion_leaves_every_module_in_its_mode_and_the_deploy_form_in_eval():
    """A BN frozen in eval mode inside a training model stays frozen; every module of the
    deploy form, those that conversion made included, is in eval mode."""
    model = nn.Sequential(
        repnet.RepBlock(3, 4, branches="dbb"), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    deployed = repnet.reparameterize(model)
    assert [m.training for m in model.modules()] == modes
    assert not any(m.training for m in deployed.modules())


def test_verify_is_relative_to_the_reference_and_counts_argmax_agreement():
    reference = torch.tensor([[4.0, 0.0], [0.0, 2.0]])
    deployed = torch.tensor([[1.0, 2.0], [0.0, 3.0]])  # row 0's top class moves, row 1's stays
    result = repnet.verify(lambda x: reference, lambda x: deployed, torch.zeros(2, 1))
    assert result.max_abs == 3.0
    assert result.max_rel == 3.0 / 4.0  # max|a - b| / max|a|, a the reference (not 3 / 3)
    assert result.argmax_agreement == 0.5
    zeros = repnet.verify(lambda x: torch.zeros(2, 2), lambda x: deployed, torch.zeros(2, 1))
    assert zeros.max_rel == zeros.max_abs == 3.0  # an all-zero reference: the plain difference


def test_verify_runs_modules_in_eval_mode_and_restores_their_mode():
    model = randomize_norms(
        nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Flatten())
    ).train()
    before = copy.deepcopy(model.state_dict())
    evaluated = copy.deepcopy(model).eval()
    result = repnet.verify(model, evaluated, torch.randn(8, 1, 3, 3))
    assert result.max_abs == 0.0  # batch statistics or dropout would differ
    assert model.training and not evaluated.training
    model[1].eval()  # a frozen BN stays frozen
    repnet.verify(model, evaluated, torch.randn(8, 1, 3, 3))
    assert model[0].training and not model[1].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- issue 20: every protocol, safely ----


class Merging(nn.Module):
    """Two parallel convs that one conv replaces, merged by ``hook`` (the name a library
    uses); a second run of the hook raises (as many third-party hooks would). The new conv
    is built in the default dtype (float32), as third-party hooks do."""

    def __init__(self, hook: str):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)
        self.merged = None
        setattr(self, hook, self._merge)

    def forward(self, x):
        return self.merged(x) if self.merged is not None else self.a(x) + self.b(x)

    def _merge(self):
        if self.merged is not None:
            raise RuntimeError("converted twice")
        conv = add(of_conv2d(self.a), of_conv2d(self.b))
        self.merged = nn.Conv2d(2, 2, 3, padding=1)
        self.merged.weight.data.copy_(conv.weight)
        self.merged.bias.data.copy_(conv.bias)
        del self.a, self.b


class Fusing(nn.Sequential):
    """timm's ``fuse()`` that returns a new module (here: a conv→BN pair as one conv)."""

    def __init__(self):
        super().__init__(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))

    def fuse(self):
        conv, bn = self
        fused = fuse_bn(of_conv2d(conv), bn.running_mean, bn.running_var, bn.weight, bn.bias, 1e-5)
        return to_conv2d(fused)


class Removing(nn.Module):
    """A parent whose own ``switch_to_deploy`` merges and removes its children, which
    cannot convert once detached (OREPA's large conv): they must never be visited."""

    def __init__(self):
        super().__init__()
        self.inner = Merging("switch_to_deploy")
        self.merged = None

    def forward(self, x):
        return self.merged(x) if self.merged is not None else self.inner(x)

    def switch_to_deploy(self):
        inner = self.inner
        conv = add(of_conv2d(inner.a), of_conv2d(inner.b))
        inner.switch_to_deploy = lambda: (_ for _ in ()).throw(RuntimeError("visited"))
        self.merged = to_conv2d(conv)
        del self.inner


@pytest.mark.parametrize("hook", ["switch_to_deploy", "reparameterize", "fuse"])
def test_every_protocol_is_spoken_once_and_float64_stays_float64(hook):
    torch.manual_seed(0)
    model = nn.Sequential(Merging(hook), nn.ReLU(), Fusing(), Removing()).double()
    model = randomize_norms(model).eval()
    deployed = repnet.reparameterize(model)
    assert isinstance(deployed[2], nn.Conv2d) and not hasattr(deployed[3], "inner")
    assert deployed[0].merged is not None and not hasattr(deployed[0], "b")
    assert {p.dtype for p in deployed.parameters()} == {torch.float64}
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-12
    again = repnet.reparameterize(deployed)  # no hook runs twice
    assert torch.equal(again(x), deployed(x))


def test_a_multi_branch_module_without_a_protocol_is_named():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))
            self.point = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

        def forward(self, x):
            return torch.relu(self.dense(x) + self.point(x) + x)

    model = nn.Sequential(nn.Conv2d(3, 2, 1), Unknown())
    with pytest.warns(UserWarning, match=r"summed in 1 \(Unknown\)"):
        deployed = repnet.reparameterize(model)
    assert unmerged_branches(deployed) == ["1 (Unknown)"]
    assert unmerged_branches(repnet.reparameterize(nn.Sequential(repnet.RepBlock(2, 2)))) == []


class TiedDecoder(nn.Module):
    """A conv whose weight another module shares (a tied decoder)."""

    def __init__(self):
        super().__init__()
        self.encode, self.bn = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.decode = nn.Conv2d(3, 3, 1, bias=False)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.relu(self.bn(self.encode(x))))


class NormAndPad(nn.Module):
    """A BN whose statistics the forward also reads (DBB's ``BNAndPadLayer``): the border
    takes the value BN gives a zero."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.pad(self.bn(self.conv(x)), (1, 1, 1, 1))
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        border = (self.bn.bias - self.bn.running_mean * scale).reshape(1, -1, 1, 1)
        inside = F.pad(torch.ones_like(x[:, :1]), (1, 1, 1, 1))
        return y + (1 - inside) * border


@pytest.mark.parametrize("make", [TiedDecoder, NormAndPad])
def test_a_conv_or_bn_whose_tensors_are_read_elsewhere_is_left_alone(make):
    model = randomize_norms(make()).double().eval()
    deployed = repnet.reparameterize(model)
    assert isinstance(deployed.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    assert repnet.verify(model, deployed, x).max_rel <= 1e-12


def test_verify_refuses_outputs_of_different_shapes():
    with pytest.raises(DeployError, match=r"\(2, 3\) vs \(2, 1\)"):
        repnet.verify(lambda x: torch.zeros(2, 3), lambda x: torch.zeros(2, 1), torch.zeros(1))
    with pytest.raises(DeployError, match="structure"):
        repnet.verify(lambda x: (x, x), lambda x: (x,), torch.zeros(1))


def test_verify_never_counts_nan_as_agreement():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    broken = torch.tensor([[1.0, 0.0], [math.nan, 1.0]])
    for a, b in ((reference, broken), (broken, reference), (broken, broken)):
        result = repnet.verify(lambda x, a=a: a, lambda x, b=b: b, torch.zeros(1))
        assert math.isnan(result.max_abs) and result.max_rel == math.inf
        assert not result.max_rel <= 1e3 and result.argmax_agreement == 0.5


def test_verify_compares_tuples_and_dicts_and_only_class_scores_by_argmax():
    def model(x):
        return {"logits": x[:, :, 0, 0], "features": (x, x.mean())}

    def other(x):
        return {"logits": x[:, :, 0, 0], "features": (x + 0.25, x.mean())}

    x = torch.randn(3, 4, 5, 5)
    result = repnet.verify(model, other, x)
    assert result.max_abs == pytest.approx(0.25) and result.argmax_agreement == 1.0
    maps = repnet.verify(lambda x: x, lambda x: x, x)
    assert maps.argmax_agreement is None and "argmax" not in str(maps)
