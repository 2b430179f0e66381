"""repnet: structural re-parameterization for PyTorch."""

from repnet import kernels, models
from repnet.block import PRESETS, RepBlock
from repnet.deployment import load_deployed
from repnet.reparam import Verification, reparameterize, verify

__all__ = [
    "PRESETS",
    "RepBlock",
    "Verification",
    "kernels",
    "load_deployed",
    "models",
    "reparameterize",
    "verify",
]
