"""Exports of a deployed model, each loaded back from its file so it can be checked and timed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from repnet.checkpoints import DeployError

Runner = Callable[[Tensor], Tensor]


def _shapes(dynamic_batch: bool) -> tuple[dict[int, torch.export.Dim]] | None:
    """A dynamic batch axis (traced with an example batch of 2 or more), or all shapes fixed."""
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None


def export_onnx(model: nn.Module, example: Tensor, path: Path, dynamic_batch: bool) -> Runner:
    """ONNX through ``torch.onnx``; runs back in ONNX Runtime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise DeployError(
            "export 'onnx' needs the export extra: pip install -e '.[export]'"
        ) from None
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=_shapes(dynamic_batch),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

    return run


def export_pt2(model: nn.Module, example: Tensor, path: Path, dynamic_batch: bool) -> Runner:
    """A ``torch.export`` program, saved and loaded back with ``torch.export``."""
    program = torch.export.export(model, (example,), dynamic_shapes=_shapes(dynamic_batch))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x)  # a plain callable: the loaded module refuses train()/eval()


EXPORTERS: dict[str, tuple[str, Callable[[nn.Module, Tensor, Path, bool], Runner]]] = {
    "onnx": ("model.onnx", export_onnx),
    "pt2": ("model.pt2", export_pt2),
}
