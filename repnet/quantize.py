"""Int8 post-training quantization: ONNX Runtime's static QDQ quantization of an exported
model, how far the int8 model is from the float one, and a per-layer report of what int8
does to each Conv/Linear (weight SQNR, activation ranges) so a user sees which block hurts.

ONNX Runtime is imported only by :func:`quantize_onnx`; the rest needs torch alone.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from repnet.reparam import forward_hooks

Calibration = Literal["minmax", "percentile"]
CSV_NAME = "quantization.csv"
HEAD_OPS = ("Gemm", "MatMul")  # a classifier head as torch.onnx exports nn.Linear
INT8_MAX = 127  # symmetric signed int8 weights: [-127, 127], as ONNX Runtime quantizes them


# ---- calibration data ----


def equal_batches(images: Tensor, batch: int) -> list[np.ndarray]:
    """``images`` cut into batches of exactly ``batch`` (the remainder left out): ONNX
    Runtime's histogram calibrators (percentile) stack every batch and fail on a ragged one."""
    usable = len(images) // batch * batch
    if usable == 0:
        raise ValueError(f"{len(images)} calibration images do not fill one batch of {batch}")
    return [chunk.numpy() for chunk in images[:usable].float().split(batch)]


class BatchReader:
    """Feeds calibration batches to ONNX Runtime under the model's input name.

    ONNX Runtime's ``CalibrationDataReader`` accepts any class with ``get_next`` (its
    ``__subclasshook__``), so this needs no import of ONNX Runtime to be one.
    """

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.feeds = iter([{input_name: batch} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as session inputs, ``None`` after the last."""
        return next(self.feeds, None)


# ---- quantization with ONNX Runtime ----


def head_nodes(model) -> list[str]:
    """The name of the model's last Gemm/MatMul node (the classifier head), if it has one."""
    heads = [node.name for node in model.graph.node if node.op_type in HEAD_OPS]
    return heads[-1:]


def quantize_onnx(
    model: bytes,
    batches: Sequence[np.ndarray],
    per_channel: bool = True,
    calibration: Calibration = "minmax",
    float_head: bool = True,
) -> bytes:
    """``model`` (ONNX bytes) quantized by ONNX Runtime: ``quant_pre_process`` (shape
    inference, graph optimisation), then ``quantize_static`` in the QDQ format with signed
    int8 weights (per output channel, or one scale per tensor) and activations, whose ranges
    are calibrated on ``batches`` (equal in size) by min/max or by percentile. With
    ``float_head`` the final Gemm/MatMul stays in float. Works in a temporary folder."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="repnet-int8-") as folder:
        source, prepared, quantized = (Path(folder) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        source.write_bytes(model)
        quant_pre_process(str(source), str(prepared))
        graph = onnx.load(str(prepared))
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
            quantize_static(
                str(prepared),
                str(quantized),
                BatchReader(graph.graph.input[0].name, batches),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=head_nodes(graph) if float_head else [],
                calibrate_method=methods[calibration],
            )
        return quantized.read_bytes()


def run_in_batches(run: Callable[[Tensor], Tensor], images: Tensor, batch: int | None) -> Tensor:
    """``run`` on ``images``, whole (``batch=None``) or in batches of exactly ``batch`` (a
    graph exported for a fixed batch), the last one padded by repeating its first image."""
    if batch is None:
        return run(images)
    outputs = []
    for chunk in images.split(batch):
        padding = chunk[:1].expand(batch - len(chunk), *chunk.shape[1:])
        outputs.append(run(torch.cat([chunk, padding]))[: len(chunk)])
    return torch.cat(outputs)


# ---- int8 against float ----


@dataclass(frozen=True)
class Int8Accuracy:
    """The int8 model against the float one on labelled images: accuracies, the drop in
    points, top-1 agreement and the absolute logit error."""

    images: int
    float_accuracy: float
    int8_accuracy: float
    argmax_agreement: float
    max_logit_error: float
    mean_logit_error: float

    @property
    def drop(self) -> float:
        """Accuracy points lost (negative: int8 got more right)."""
        return 100 * (self.float_accuracy - self.int8_accuracy)

    def __str__(self) -> str:
        return (
            f"int8 accuracy {self.int8_accuracy:.2%} vs float {self.float_accuracy:.2%} "
            f"(drop {self.drop:.2f} points) on {self.images} real validation images, argmax "
            f"agreement {self.argmax_agreement:.2%}, logit error max {self.max_logit_error:.3g} "
            f"mean {self.mean_logit_error:.3g}"
        )


def compare(float_logits: Tensor, int8_logits: Tensor, labels: Tensor) -> Int8Accuracy:
    """How ``int8_logits`` do against ``float_logits`` on the same labelled images."""
    error = (float_logits - int8_logits).abs()
    predicted, predicted_int8 = float_logits.argmax(1), int8_logits.argmax(1)
    return Int8Accuracy(
        images=len(labels),
        float_accuracy=(predicted == labels).double().mean().item(),
        int8_accuracy=(predicted_int8 == labels).double().mean().item(),
        argmax_agreement=(predicted == predicted_int8).double().mean().item(),
        max_logit_error=error.max().item(),
        mean_logit_error=error.mean().item(),
    )


# ---- per-layer report ----


def fake_quantize(weight: Tensor, per_channel: bool) -> Tensor:
    """``weight`` rounded to symmetric int8 and back: scale ``max|w|/127`` per output channel
    (dim 0) or for the whole tensor."""
    rows = weight.detach().double().reshape(len(weight) if per_channel else 1, -1)
    scale = rows.abs().amax(1, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = (rows / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale
    return quantized.reshape(weight.shape)


def sqnr_db(weight: Tensor, per_channel: bool) -> float:
    """Signal-to-quantization-noise ratio of symmetric int8 ``weight``, in dB:
    ``10·log10(‖w‖² / ‖w − q(w)‖²)``; ``inf`` where int8 holds it exactly."""
    signal = weight.detach().double()
    noise = (signal - fake_quantize(signal, per_channel)).square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal.square().sum().item() / noise)


@dataclass(frozen=True)
class LayerQuantization:
    """One Conv/Linear: its weight's int8 SQNR both ways and the ranges of what it took in
    and gave out on the calibration images (NaN where it never ran)."""

    layer: str
    kind: str
    weight_shape: str
    sqnr_per_channel_db: float
    sqnr_per_tensor_db: float
    input_min: float
    input_max: float
    output_min: float
    output_max: float


def _ranges(model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Tensor]) -> dict:
    """Running min/max of every layer's input and output over ``batches`` (forward hooks)."""
    seen: dict[str, list[float]] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0]
            new = (x.min().item(), x.max().item(), output.min().item(), output.max().item())
            old = seen.get(name, new)
            seen[name] = [(min, max)[i % 2](a, b) for i, (a, b) in enumerate(zip(old, new))]

        return record

    with forward_hooks(layers, hook), torch.no_grad():
        for batch in batches:
            model(batch)
    return seen


def layer_report(model: nn.Module, batches: Sequence[Tensor]) -> list[LayerQuantization]:
    """Every Conv/Linear of ``model`` (in eval mode): weight SQNR per channel and per
    tensor, and activation ranges seen running ``batches``."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear)
    }
    ranges = _ranges(model, layers, batches)
    return [
        LayerQuantization(
            name,
            type(module).__name__,
            "x".join(map(str, module.weight.shape)),
            sqnr_db(module.weight, per_channel=True),
            sqnr_db(module.weight, per_channel=False),
            *ranges.get(name, [math.nan] * 4),
        )
        for name, module in layers.items()
    ]


def report_csv(rows: Sequence[LayerQuantization]) -> bytes:
    """The per-layer report as CSV, one row per layer, numbers to 4 significant digits."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([f.name for f in fields(LayerQuantization)])
    for row in rows:
        writer.writerow([f"{v:.4g}" if isinstance(v, float) else v for v in astuple(row)])
    return text.getvalue().encode()


def worst_layers(rows: Sequence[LayerQuantization], per_channel: bool, count: int = 3) -> str:
    """A line naming the ``count`` layers of lowest weight SQNR in the mode used."""
    key = "sqnr_per_channel_db" if per_channel else "sqnr_per_tensor_db"
    worst = sorted(rows, key=lambda row: getattr(row, key))[:count]
    named = ", ".join(f"{row.layer} {getattr(row, key):.1f} dB" for row in worst)
    mode = "per-channel" if per_channel else "per-tensor"
    return f"lowest {mode} int8 weight SQNR: {named} (every layer: {CSV_NAME})"
