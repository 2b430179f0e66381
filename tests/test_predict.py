"""predict: top-k labels of real image files from a deploy folder, its ONNX file and a
checkpoint; the README's onnxruntime + numpy + Pillow example gives the same labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, compose, run_script
from PIL import Image
from sklearn.datasets import load_digits

from repnet.deployment import deploy
from repnet.errors import UsageError
from repnet.predict import predict
from repnet.training import train


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    """A digits run trained for a few epochs and deployed with its ONNX export."""
    run = tmp_path_factory.mktemp("run")
    train(compose(["trainer.max_epochs=3", "callbacks.progress_bar=null", "logger=csv"]), run)
    deploy(run / "checkpoints" / "last.ckpt", export=["onnx"], latency_seconds=0)
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[int]]:
    """60 digits as 8-bit PNGs (ink intensity ``x/16`` as ``v/255``) in class folders, one
    upscaled 3x, one in RGB; and a file that is no image."""
    digits = load_digits()
    folder = tmp_path_factory.mktemp("images")
    labels = []
    for i in range(60):
        (folder / str(digits.target[i])).mkdir(exist_ok=True)
        image = Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8))
        if i == 0:
            image = image.resize((24, 24), Image.BILINEAR)
        if i == 1:
            image = image.convert("RGB")
        image.save(folder / str(digits.target[i]) / f"{i:02d}.png")
        labels.append(int(digits.target[i]))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder, labels


def test_deploy_folder_onnx_file_and_checkpoint_predict_alike(deployed, images):
    folder, labels = images
    forms = [deployed / "deploy", deployed / "deploy" / "model.onnx"]
    forms.append(deployed / "checkpoints" / "last.ckpt")
    results = [predict(form, str(folder), top_k=3) for form in forms]
    assert all(len(rows) == 60 for rows in results)  # the broken file is skipped
    for rows in results[1:]:
        for row, reference in zip(rows, results[0]):
            assert row["image"] == reference["image"]
            assert [t["label"] for t in row["top"]] == [t["label"] for t in reference["top"]]
            for ours, theirs in zip(row["top"], reference["top"]):
                assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-4)
    truth = {f"{i:02d}.png": str(label) for i, label in enumerate(labels)}
    right = [row["top"][0]["label"] == truth[Path(row["image"]).name] for row in results[0]]
    assert sum(right) / len(right) >= 0.85  # the same accuracy as on the dataset's tensors
    assert all(len(row["top"]) == 3 for row in results[0])
    assert all(row["top"][0]["probability"] >= row["top"][1]["probability"] for row in results[0])


def test_the_readme_example_needs_only_onnxruntime_numpy_and_pillow(deployed, images):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Predicting", 1)[1]
    example = section.split("```python", 1)[1].split("```", 1)[0]
    assert "repnet" not in example
    namespace: dict = {}
    exec(example, namespace)
    folder, _ = images
    paths = sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")
    expected = {row["image"]: row["top"] for row in predict(deployed / "deploy", str(folder))}
    for path in paths:
        top = namespace["top_labels"](str(deployed / "deploy"), str(path), k=3)
        assert [label for label, _ in top] == [t["label"] for t in expected[str(path)][:3]]
        assert top[0][1] == pytest.approx(expected[str(path)][0]["probability"], abs=1e-4)


def test_the_command_writes_csv_and_json_lines_and_names_each_unreadable_image(
    deployed, images, tmp_path
):
    folder, _ = images
    model = f"model={deployed / 'deploy'}"
    result = run_script(
        "predict.py", model, f"inputs={folder}", "top_k=2", f"output={tmp_path / 'p.csv'}"
    )
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["predict"]
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    with (tmp_path / "p.csv").open() as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["image", "label_1", "probability_1", "label_2", "probability_2"]
    assert len(rows) == 61
    result = run_script(
        "predict.py", model, f"inputs={folder}/3/*.png", f"output={tmp_path / 'p.jsonl'}"
    )
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines and all(Path(line["image"]).parent.name == "3" for line in lines)
    assert all(len(line["top"]) == 5 for line in lines)
    printed = run_script("predict.py", model, f"inputs={folder}/0/00.png", "top_k=1")
    top = predict(deployed / "deploy", str(folder / "0" / "00.png"), top_k=1)[0]["top"][0]
    expected = f"{folder / '0' / '00.png'}  {top['label']} {top['probability']:.3f}"
    assert printed.returncode == 0 and printed.stdout.splitlines() == [expected]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "nowhere"}, "model: no deploy folder or file at nowhere"),
        ({"inputs": "no/such/*.png"}, "inputs: no image files at no/such/"),
        ({"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
        ({"format": "xml"}, "format: Input should be 'csv' or 'jsonl'"),
    ],
)
def test_bad_options_are_one_clear_error(deployed, images, options, message):
    given = {"model": deployed / "deploy", "inputs": str(images[0]), **options}
    with pytest.raises(UsageError, match=message):
        predict(**given)


def test_the_command_refuses_a_bad_option_in_one_line_and_writes_nothing(deployed, tmp_path):
    out = tmp_path / "p.csv"
    result = run_script(
        "predict.py", f"model={deployed / 'deploy'}", "inputs=nowhere/*.png", f"output={out}"
    )
    assert result.returncode == 1 and not out.exists()
    message = "predict.py: error: inputs: no image files at nowhere/*.png"
    assert result.stderr.strip().splitlines() == [message]
