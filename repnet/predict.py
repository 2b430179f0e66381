"""Top-k labels of image files from a deploy folder, its ONNX file or a training checkpoint,
preprocessed as the model's record says (``config.json``, the ONNX metadata, the run)."""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from repnet.config import Strict, validate
from repnet.errors import DeployError, UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class PredictOptions(Strict):
    """``predict``'s options (``configs/predict.yaml``)."""

    model: Path
    inputs: str
    top_k: Annotated[int, Field(ge=1, le=1000, strict=True)] = 5
    output: Path | None = None
    format: Literal["csv", "jsonl"] | None = None
    batch_size: Annotated[int, Field(ge=1, le=4096, strict=True)] = 32


@dataclass
class Predictor:
    """Logits of a batch of inputs, and how an image file becomes one input."""

    logits: Callable[[Tensor], Tensor]
    preprocessing: dict[str, Any]

    def labels(self, count: int) -> list[str]:
        return self.preprocessing.get("label_names") or [str(i) for i in range(count)]


def open_deploy_folder(folder: Path) -> Predictor:
    from repnet.deployment import CARD_NAME, load_deployed, read_card

    model = load_deployed(folder)
    return Predictor(model, described(folder / CARD_NAME, read_card(folder / CARD_NAME)))


def open_onnx(path: Path) -> Predictor:
    """An ONNX file in ONNX Runtime; its preprocessing from its ``config`` metadata."""
    import onnx

    from repnet.deployment import card_description
    from repnet.export import load_onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf decoding errors of several kinds
        raise UsageError(f"model: {path} is not an ONNX file ({error})") from None
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    if "config" not in metadata:
        raise UsageError(f"model: {path} holds no model card in its metadata (config)")
    description = card_description(metadata["config"], path)
    return Predictor(load_onnx(path), described(path, description))


def open_checkpoint(path: Path) -> Predictor:
    """A training checkpoint (or weights beside their run's ``config.yaml``), in eval mode."""
    from repnet.checkpoints import load_checkpoint
    from repnet.deployment import describe, find_run_config, load_model

    checkpoint = load_checkpoint(path)
    description = describe(path, checkpoint.hyper_parameters, find_run_config(path, None))
    model = load_model(description[0], checkpoint.state_dict)
    return Predictor(model, described(path, description))


def described(where: Path, description: tuple) -> dict[str, Any]:
    """The preprocessing of a model's record, refused where the record has none."""
    preprocessing = description[2]
    if preprocessing is None:
        raise UsageError(
            f"{where} does not say how images are preprocessed (a run of an older repnet); "
            "retrain, or run the model on tensors you prepare yourself"
        )
    return dict(preprocessing)


def open_model(path: Path) -> Predictor:
    """A deploy folder, an ``.onnx`` file, or a checkpoint (``.ckpt``, ``.pt``, ...)."""
    if path.is_dir():
        return open_deploy_folder(path)
    if not path.is_file():
        raise UsageError(f"model: no deploy folder or file at {path}")
    return open_onnx(path) if path.suffix == ".onnx" else open_checkpoint(path)


def image_paths(pattern: str) -> list[Path]:
    """A file, the image files under a folder (recursively), or the files a glob matches."""
    path = Path(pattern)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    if not found:
        raise UsageError(f"inputs: no image files at {pattern}")
    return sorted(found)


def read_images(
    paths: list[Path], transform: Callable, batch_size: int
) -> Iterator[tuple[list[Path], Tensor]]:
    """Batches of readable images; each unreadable one is one line on stderr."""
    from PIL import Image

    batch: list[tuple[Path, Tensor]] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                batch.append((path, transform(image)))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            print(f"predict: skipped {path}: {error}", file=sys.stderr)
        if len(batch) == batch_size:
            yield [p for p, _ in batch], torch.stack([x for _, x in batch])
            batch = []
    if batch:
        yield [p for p, _ in batch], torch.stack([x for _, x in batch])


def predict(model: str | Path, inputs: str, **options: Any) -> list[dict[str, Any]]:
    """Per readable image: ``{"image", "top": [{"label", "index", "probability"}, ...]}``,
    the ``top_k`` classes by ``softmax(logits)``. ``options``: :class:`PredictOptions`."""
    settings = validate(PredictOptions, {"model": model, "inputs": inputs, **options})
    try:
        predictor = open_model(settings.model)
    except DeployError as error:
        raise UsageError(f"model: {error}") from None
    paths = image_paths(settings.inputs)
    rows = []
    from repnet.data import image_transform  # torchvision, only when images are read

    transform = image_transform(predictor.preprocessing)
    for names, images in read_images(paths, transform, settings.batch_size):
        with torch.inference_mode():
            probabilities = predictor.logits(images).softmax(1)
        labels = predictor.labels(probabilities.shape[1])
        top = probabilities.topk(min(settings.top_k, probabilities.shape[1]), dim=1)
        for name, values, indices in zip(names, top.values.tolist(), top.indices.tolist()):
            ranked = [
                {"label": labels[i], "index": i, "probability": p} for p, i in zip(values, indices)
            ]
            rows.append({"image": str(name), "top": ranked})
    return rows


def rows_text(rows: list[dict[str, Any]], kind: str) -> str:
    """CSV (``image, label_1, probability_1, ...``) or JSON lines."""
    if kind == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    text = io.StringIO()
    writer = csv.writer(text)
    k = max((len(row["top"]) for row in rows), default=0)
    writer.writerow(
        ["image", *[f"{c}_{i + 1}" for i in range(k) for c in ("label", "probability")]]
    )
    for row in rows:
        ranked = [v for top in row["top"] for v in (top["label"], f"{top['probability']:.6f}")]
        writer.writerow([row["image"], *ranked])
    return text.getvalue()


def write_rows(rows: list[dict[str, Any]], output: Path, format: str | None) -> None:
    """``output`` written whole, as ``format`` or by its suffix (``.jsonl``/``.json``: JSON
    lines, else CSV)."""
    from repnet.checkpoints import write_whole

    kind = format or ("jsonl" if output.suffix in (".jsonl", ".json") else "csv")
    write_whole(output, rows_text(rows, kind).encode())


def format_row(row: dict[str, Any]) -> str:
    ranked = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in row["top"])
    return f"{row['image']}  {ranked}"
