"""repnet: structural re-parameterization for PyTorch."""

from repnet import kernels, models
from repnet.block import PRESETS, RepBlock
from repnet.deployment import load_deployed
from repnet.dynamic import DynamicConv2d
from repnet.reparam import Verification, reparameterize, verify

__all__ = [
    "PRESETS",
    "DynamicConv2d",
    "RepBlock",
    "Verification",
    "kernels",
    "load_deployed",
    "models",
    "reparameterize",
    "verify",
]
