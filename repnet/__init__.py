"""repnet: structural re-parameterization for PyTorch.

``import repnet`` loads the model layer only (torch): blocks, algebra, models and
conversion. Training and deployment (Lightning, Hydra, data) load when first used.

The shell beside them: ``training``/``module``/``callbacks`` (fit), ``deployment``/``export``/
``quantize`` (convert, verify, write, int8) and ``predict`` (top-k labels of image files);
``cli`` holds the four commands, their configs ship in the package (``configs/`` for
training and its groups, ``command_configs/`` for deploy and predict) so an installed wheel
runs them from any folder.
"""

from typing import Any

from repnet import kernels, models
from repnet.block import RepBlock
from repnet.branches import PRESETS, register_branch
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
    "register_branch",
    "reparameterize",
    "verify",
]


def __getattr__(name: str) -> Any:
    """``repnet.load_deployed`` without loading the deploy stack at ``import repnet``."""
    if name == "load_deployed":
        from repnet.deployment import load_deployed

        return load_deployed
    raise AttributeError(f"module 'repnet' has no attribute {name!r}")
