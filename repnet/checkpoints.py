"""Reading weights from anywhere, safely, and writing files whole or not at all.

One way to load (``weights_only=True``: a checkpoint never runs code) and one way
to write (into a staging folder, renamed into place only when everything worked).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from repnet.errors import CheckpointError, DeployError

# Wrappers that prefix every key: LightningModule attribute, DDP, torch.compile.
PREFIXES = ("model.", "module.", "_orig_mod.")


@dataclass(frozen=True)
class Checkpoint:
    """Weights with their wrapper prefixes removed, and the hyper-parameters stored beside them."""

    state_dict: dict[str, Tensor]
    hyper_parameters: dict[str, Any] | None


def strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``model.``, ``module.`` and ``_orig_mod.`` wherever every key starts with one."""
    while state_dict:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a pickle protocol note on damaged bytes
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line), None)
        if culprit is not None:
            raise CheckpointError(
                f"refusing {path}: it holds Python objects that would run code when "
                f"unpickled, and checkpoints are only loaded as plain weights ({culprit})"
            ) from None
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler" in line), -1)
        detail = lines[marker + 1] if 0 <= marker < len(lines) - 1 else lines[-1]
        raise CheckpointError(
            f"{path} is corrupt or not a plain-weights checkpoint; it was refused unread ({detail})"
        ) from None
    except Exception as error:  # torch.load fails in many ways on damaged bytes
        detail = str(error).splitlines()[0].split(". ")[0] if str(error) else ""
        reason = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        raise CheckpointError(f"{path} is corrupt or truncated ({reason})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A Lightning ``.ckpt``, a plain ``state_dict`` ``.pt``/``.pth`` or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    content = _read(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        state, hyper_parameters = content["state_dict"], content.get("hyper_parameters")
    else:
        state, hyper_parameters = content, None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict (a mapping of names to tensors)")
    return Checkpoint(strip_prefixes(state), hyper_parameters)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def staged(out_dir: str | Path, owned: Iterable[str] = ()) -> Iterator[Path]:
    """Write into a staging folder; on success every file is renamed into ``out_dir``.

    Files named in ``owned`` that this run did not write are removed, so ``out_dir``
    never mixes outputs of two runs. On failure the staging folder goes, and so do
    the folders this made.
    """
    out_dir = Path(out_dir)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    staging, committed = None, False
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
        except OSError as error:
            raise DeployError(f"cannot write into {out_dir}: {error.strerror or error}") from None
        yield staging
        mode = 0o666 & ~_umask()
        written = {item.name for item in staging.iterdir()}
        for item in staging.iterdir():
            item.chmod(mode)
            os.replace(item, out_dir / item.name)
        for name in set(owned) - written:
            (out_dir / name).unlink(missing_ok=True)
        committed = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not committed:
            for folder in created:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
