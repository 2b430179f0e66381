"""Lightning checkpoints written whole: a temporary file in the destination's own folder,
fsynced, then renamed over the destination (whatever ``TMPDIR`` is)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from repnet.errors import CheckpointError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``save_checkpoint`` leaves either the old file or the new one, never a partial one;
    a failed write (a full disk) is one :class:`CheckpointError` line."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            buffer = io.BytesIO()  # torch's zip writer reports a failed write vaguely
            torch.save(checkpoint, buffer)
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as error:
            raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None
        finally:
            Path(temporary).unlink(missing_ok=True)
