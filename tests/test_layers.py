"""The model layer stands alone: ``import repnet`` loads torch, not the training stack."""

import subprocess
import sys


def test_import_repnet_loads_no_training_framework():
    code = (
        "import sys, repnet; block = repnet.RepBlock(4, 4); "
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'hydra', 'omegaconf', "
        "'sklearn', 'torchvision', 'torchmetrics') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_branch_registered_outside_the_package_is_usable_by_name():
    import torch

    import repnet
    from repnet.branches import BRANCHES, Branch, KernelOp, Stage, learnable_conv

    @repnet.register_branch("test_1x1_1x1")
    def build(geo, norm):
        """Two 1x1 convs in a row, each with its norm."""
        padding = geo.padding_for((1, 1), "test_1x1_1x1")
        first = learnable_conv(
            geo.in_channels, geo.out_channels, (1, 1), geo.stride, padding, (1, 1), geo.groups
        )
        second = learnable_conv(
            geo.out_channels, geo.out_channels, (1, 1), (1, 1), (0, 0), (1, 1), geo.groups
        )
        out = geo.out_channels
        return Branch(Stage(first, norm(out)), Stage(second, norm(out)))

    try:
        block = repnet.RepBlock(
            4, 6, 5, stride=2, groups=2, branches=["kxk", "test_1x1_1x1"], act=None
        )
        assert isinstance(block.branches["test_1x1_1x1"][0].op, KernelOp)
        x = torch.randn(2, 4, 9, 7)
        expected = block.eval()(x)
        block.switch_to_deploy()
        assert torch.allclose(block(x), expected, atol=1e-5)
    finally:
        del BRANCHES["test_1x1_1x1"]
