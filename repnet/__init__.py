"""repnet: structural re-parameterization for PyTorch."""

from repnet.block import PRESETS, RepBlock
from repnet.reparam import Verification, reparameterize, verify

__all__ = ["PRESETS", "RepBlock", "Verification", "reparameterize", "verify"]
