"""Exports of a deployed model: each serialized to bytes (the caller writes the file) and
loaded back from its file, so what is checked and timed is what was written."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from repnet.errors import DeployError

Runner = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Format:
    """An export: its file name, its bytes for a model and an example batch (``True``: the
    batch axis dynamic), and a runner loaded back from the file."""

    filename: str
    serialize: Callable[[nn.Module, Tensor, bool], bytes]
    load: Callable[[Path], Runner]


def _shapes(dynamic_batch: bool) -> tuple[dict[int, torch.export.Dim]] | None:
    """A dynamic batch axis (traced with an example batch of 2 or more), or all shapes fixed."""
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None


def onnx_bytes(model: nn.Module, example: Tensor, dynamic_batch: bool) -> bytes:
    """ONNX through ``torch.onnx`` (the ``torch.export`` exporter)."""
    try:
        import onnxruntime  # noqa: F401  (the runner needs it: refuse before exporting)
    except ImportError:
        raise DeployError(
            "export 'onnx' needs the export extra: pip install -e '.[export]'"
        ) from None
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=_shapes(dynamic_batch),
        dynamo=True,
        verbose=False,
    )
    return program.model_proto.SerializeToString()


def load_onnx(path: Path) -> Runner:
    """An ONNX file run in ONNX Runtime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()  # idle threads must not spin: other forms are
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # timed beside
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def pt2_bytes(model: nn.Module, example: Tensor, dynamic_batch: bool) -> bytes:
    """A ``torch.export`` program as ``torch.export.save`` writes it."""
    program = torch.export.export(model, (example,), dynamic_shapes=_shapes(dynamic_batch))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_pt2(path: Path) -> Runner:
    """A ``.pt2`` file loaded with ``torch.export.load``."""
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x)  # a plain callable: the loaded module refuses train()/eval()


EXPORTERS: dict[str, Format] = {
    "onnx": Format("model.onnx", onnx_bytes, load_onnx),
    "pt2": Format("model.pt2", pt2_bytes, load_pt2),
}
