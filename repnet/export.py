"""Exports of a deployed model: each serialized to bytes (the caller writes the file) and
loaded back from its file, so what is checked and timed is what was written."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repnet.errors import DeployError
from repnet.kernels import Conv, Window, of_conv2d, one_pixel
from repnet.quantize import Calibration, quantize_onnx
from repnet.reparam import eval_mode, forward_hooks

Runner = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Format:
    """An export: its file name, its bytes for a model and an example batch (``True``: the
    batch axis dynamic), and a runner loaded back from the file. A ``lossy`` export (int8)
    is not held to the float tolerance: deploy checks its accuracy instead, and its
    ``serialize`` takes keywords (calibration data, settings)."""

    filename: str
    serialize: Callable[..., bytes]
    load: Callable[[Path], Runner]
    lossy: bool = False


def _shapes(dynamic_batch: bool) -> tuple[dict[int, torch.export.Dim]] | None:
    """A dynamic batch axis (traced with an example batch of 2 or more), or all shapes fixed."""
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None


class PixelProduct(nn.Module):
    """A conv that gives a single pixel, as one matrix product over the batch:
    ``y = K·vec(x[..., rows, cols]) + b`` as ``[N, O, 1, 1]`` (:func:`repnet.kernels.one_pixel`)."""

    def __init__(self, pixel: Conv, window: Window):
        super().__init__()
        self.weight = nn.Parameter(pixel.weight.detach().flatten(1))
        self.bias = nn.Parameter(pixel.bias.detach())
        self.rows, self.cols = window

    def forward(self, x: Tensor) -> Tensor:
        window = x[:, :, self.rows, self.cols]
        return F.linear(window.flatten(1), self.weight, self.bias)[..., None, None]


def _one_pixel_inputs(model: nn.Module, convs: dict[str, nn.Conv2d], example: Tensor) -> dict:
    """The input size of each of ``convs`` that gives a single pixel from one input size at
    every call of ``model(example)``, run in eval mode (no statistics updated)."""
    calls: dict[str, set] = {}  # the input size of each call; None: not a batch to one pixel

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            one = inputs[0].dim() == 4 and output.shape[-2:] == (1, 1)
            calls.setdefault(name, set()).add(tuple(inputs[0].shape[-2:]) if one else None)

        return hook

    with forward_hooks(convs, record), torch.no_grad(), eval_mode(model):
        model(example)
    return {name: size for name, (size, *more) in calls.items() if size and not more}


def one_pixel_convs_as_products(model: nn.Module, example: Tensor) -> nn.Module:
    """``model``, or a copy where every ``nn.Conv2d`` (dense, zero-padded, not a subclass)
    that gives a single pixel on ``example`` is a :class:`PixelProduct`: ONNX Runtime runs
    a conv image by image, so such a conv (the last stage of a small-input model, e.g.
    RepVGG's 1280 channels on a 2x2 map) is a matrix-vector product per image, where one
    Gemm takes the whole batch."""
    convs = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Conv2d
        and name
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    }
    products = {}
    for name, size in _one_pixel_inputs(model, convs, example).items():
        pixel, window = one_pixel(of_conv2d(convs[name]), size)
        if pixel.weight.numel():  # a pixel that reads only padding stays a conv
            products[name] = PixelProduct(pixel, window)
    if not products:
        return model
    model = copy.deepcopy(model)
    for name, product in products.items():
        model.set_submodule(name, product)
    return model


def onnx_bytes(model: nn.Module, example: Tensor, dynamic_batch: bool) -> bytes:
    """ONNX through ``torch.onnx`` (the ``torch.export`` exporter), convs that give a
    single pixel at the example's size as matrix products (:func:`one_pixel_convs_as_products`)."""
    try:
        import onnxruntime  # noqa: F401  (the runner needs it: refuse before exporting)
    except ImportError:
        raise DeployError(
            "export 'onnx' needs the export extra: pip install -e '.[export]'"
        ) from None
    program = torch.onnx.export(
        one_pixel_convs_as_products(model, example),
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


def onnx_int8_bytes(
    model: nn.Module,
    example: Tensor,
    dynamic_batch: bool,
    *,
    calibration: Sequence[np.ndarray],
    per_channel: bool = True,
    method: Calibration = "minmax",
) -> bytes:
    """The ONNX export quantized to static int8 QDQ by ONNX Runtime, calibrated on
    ``calibration`` (equal batches of real images): :func:`repnet.quantize.quantize_onnx`."""
    fp32 = onnx_bytes(model, example, dynamic_batch)
    return quantize_onnx(fp32, calibration, per_channel=per_channel, calibration=method)


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
    "onnx_int8": Format("model_int8.onnx", onnx_int8_bytes, load_onnx, lossy=True),
}


def onnx_with_metadata(model: bytes, metadata: dict[str, str]) -> bytes:
    """An ONNX model's bytes with ``metadata`` added to its ``metadata_props``."""
    import onnx

    proto = onnx.load_from_string(model)
    onnx.helper.set_model_props(
        proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata}
    )
    return proto.SerializeToString()
