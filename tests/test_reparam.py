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
