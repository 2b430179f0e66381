"""Whole-model conversion: duck-typed blocks, graph conv→BN fusion, verification."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers import randomize_norms
from torch import nn

import repnet
from repnet.kernels import Conv, add, of_conv2d, to_conv2d


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


def test_untraceable_models_keep_their_pairs_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                return self.bn(self.conv(x))
            return x

    with pytest.warns(UserWarning, match="could not be traced"):
        deployed = repnet.reparameterize(Branchy())
    assert isinstance(deployed.bn, nn.BatchNorm2d)


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
        (nn.Conv2d(2, 3, 3, padding="same"), nn.BatchNorm2d(3), False),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(3), False),
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
