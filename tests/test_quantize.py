"""int8 export (ONNX Runtime static QDQ): deploy's checks, the per-layer report, the SQNR."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from helpers import QUICK, compose, run_script
from hypothesis import given
from hypothesis import strategies as st
from onnxruntime.quantization import CalibrationDataReader

import repnet
from repnet import quantize
from repnet.checkpoints import check_manifest
from repnet.deployment import deploy
from repnet.errors import DeployError, UsageError
from repnet.export import onnx_bytes
from repnet.models import build_model
from repnet.training import train

# Three epochs of the whole digits training split: ~97% accurate, in ~15 s on 2 cores.
TRAINED = [*QUICK, "logger=csv", "block=plain", "trainer.max_epochs=3"]
TRAINED += ["++trainer.limit_train_batches=23"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny net trained on the real digits data, long enough to be well past chance."""
    run = tmp_path_factory.mktemp("run")
    train(compose(TRAINED), run)
    return run


@pytest.fixture(scope="module")
def deployed(run_dir, tmp_path_factory):
    """The run deployed with both ONNX exports: the report and its folder."""
    out = tmp_path_factory.mktemp("deployed") / "deploy"
    report = deploy(
        run_dir / "checkpoints" / "last.ckpt", out_dir=out, export=["onnx", "onnx_int8"]
    )
    return report, out


def test_int8_export_is_small_accurate_and_in_the_report(deployed):
    report, out = deployed
    check_manifest(out, ["model_int8.onnx", "quantization.csv"])
    assert (out / "model_int8.onnx").stat().st_size <= 0.35 * (out / "model.onnx").stat().st_size
    assert report.int8.images == 4 * 64 and report.int8.float_accuracy > 0.9
    assert report.int8.drop <= 1.0  # max_int8_drop's default
    assert report.int8.argmax_agreement >= 0.95
    assert str(report.int8) in report.notes
    assert report.checks["onnx_int8 vs deploy form"].argmax_agreement == (
        report.int8.argmax_agreement
    )
    row = next(row for row in report.rows if row["form"] == "onnx_int8")
    assert row["file"] == "model_int8.onnx" and float(row["MB"]) > 0
    assert float(row["CPU ms, batch 1"]) > 0
    graph = onnx.load(str(out / "model_int8.onnx")).graph
    weights = {i.name: i for i in graph.initializer}
    producers = {node.output[0]: node for node in graph.node}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 5
    for conv in convs:  # int8 weights, dequantized in front of each conv
        weight = producers[conv.input[1]]
        assert weight.op_type == "DequantizeLinear"
        assert weights[weight.input[0]].data_type == onnx.TensorProto.INT8


def test_the_layer_report_covers_every_conv_and_linear_of_the_deploy_form(deployed):
    report, out = deployed
    with (out / "quantization.csv").open() as file:
        rows = list(csv.DictReader(file))
    layers = {
        name: m
        for name, m in repnet.load_deployed(out).named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    assert [row["layer"] for row in rows] == list(layers)
    for row in rows:
        assert float(row["sqnr_per_channel_db"]) >= float(row["sqnr_per_tensor_db"]) - 1
        assert float(row["input_min"]) <= float(row["input_max"])
        assert float(row["output_min"]) < float(row["output_max"])
    assert float(rows[1]["input_min"]) == 0  # after a ReLU
    (worst,) = [note for note in report.notes if note.startswith("lowest per-channel")]
    assert worst.count(" dB") == 3 and "quantization.csv" in worst


def test_int8_options_reach_onnx_runtime_with_a_fixed_batch(run_dir, tmp_path):
    report = deploy(
        run_dir / "checkpoints" / "last.ckpt",
        out_dir=tmp_path / "out",
        export=["onnx_int8"],
        export_batch=8,
        calibration_images=20,
        int8_calibration="percentile",
        int8_per_channel=False,
        latency_seconds=0,
    )
    assert "int8 calibrated on 16 training images (2 batches of 8, percentile)" in report.notes[1]
    assert "per-tensor weights" in report.notes[1] and report.int8.drop <= 1.0
    assert report.notes[3].startswith("lowest per-tensor")
    graph = onnx.load(str(tmp_path / "out" / "model_int8.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    scales = [i for i in graph.initializer if i.name.endswith("weight_scale")]
    assert scales and all(math.prod(scale.dims) == 1 for scale in scales)  # per tensor


def test_a_drop_over_max_int8_drop_fails_the_command_and_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        "deploy.py",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"out_dir={out}",
        "export=[onnx_int8]",
        "max_int8_drop=-1",  # int8 would have to beat float by a point
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deploy.py: error: the onnx_int8 export")
    assert "max_int8_drop=-1" in lines[0] and lines[0].endswith("nothing was written")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {}}, "calibrates on the run's training data, which is not here (no real data)"),
        ({"data": {"_target_": "os.system", "command": "true"}}, "not a plain repnet dataset"),
        ({"real_batches": 0}, "needs real_batches of 1 or more"),
    ],
)
def test_int8_is_refused_without_the_runs_own_data(run_dir, tmp_path, change, message):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    options = {"real_batches": change.pop("real_batches")} if "real_batches" in change else {}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, **change}))
    with pytest.raises(DeployError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deploy(
            run_dir / "checkpoints" / "last.ckpt",
            config=tmp_path / "config.yaml",
            out_dir=tmp_path / "out",
            export=["onnx_int8"],
            **options,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_int8_drop", float("nan"), "a finite number"),
        ("max_int8_drop", 101.0, "less than or equal to 100"),
        ("int8_calibration", "entropy", "'minmax' or 'percentile'"),
        ("int8_per_channel", "yes", "a valid boolean"),
        ("calibration_images", 0, "greater than or equal to 1"),
        ("export", ["onnx_int4"], "'onnx', 'pt2' or 'onnx_int8'"),
    ],
)
def test_bad_int8_options_are_one_usage_error(tmp_path, option, value, message):
    with pytest.raises(UsageError, match=message):
        deploy(tmp_path / "never.ckpt", **{option: value})


# ---- repnet.quantize on its own ----


@pytest.fixture(scope="module")
def tiny_onnx() -> tuple[bytes, list]:
    """An untrained tiny net's deploy form as ONNX, and calibration batches for it."""
    torch.manual_seed(0)
    model = repnet.reparameterize(build_model(name="tiny", num_classes=10, in_channels=1))
    images = torch.randn(24, 1, 8, 8)
    return onnx_bytes(model, images[:2], True), quantize.equal_batches(images, 8)


@pytest.mark.parametrize("float_head", [True, False])
def test_the_head_stays_float_only_when_asked(tiny_onnx, float_head):
    model, batches = tiny_onnx
    graph = onnx.load_from_string(quantize.quantize_onnx(model, batches, float_head=float_head))
    (head,) = [node for node in graph.graph.node if node.op_type == "Gemm"]
    float_weights = {i.name for i in graph.graph.initializer if i.data_type == 1}
    assert (head.input[1] in float_weights) is float_head
    assert quantize.head_nodes(onnx.load_from_string(model)) == [head.name]


def test_per_channel_weights_get_one_scale_per_output_channel(tiny_onnx):
    model, batches = tiny_onnx
    graph = onnx.load_from_string(quantize.quantize_onnx(model, batches, per_channel=True)).graph
    scales = {i.name: i for i in graph.initializer}
    widths = [16, 32, 32, 64, 64]
    dequantized = [node.input[1] for node in graph.node if node.op_type == "DequantizeLinear"]
    sizes = sorted(math.prod(scales[n].dims) for n in dequantized if n in scales)
    assert all(sizes.count(w) >= widths.count(w) for w in widths)


def test_calibration_batches_are_equal_and_read_as_onnx_runtime_reads_them():
    batches = quantize.equal_batches(torch.randn(70, 1, 8, 8), 32)
    assert [b.shape for b in batches] == [(32, 1, 8, 8)] * 2  # the remainder left out
    reader = quantize.BatchReader("images", batches)
    assert isinstance(reader, CalibrationDataReader)
    assert [feed["images"] is b for feed, b in zip(iter(reader.get_next, None), batches)] == [
        True,
        True,
    ]
    with pytest.raises(ValueError, match="do not fill one batch of 8"):
        quantize.equal_batches(torch.randn(5, 1, 8, 8), 8)


def test_a_fixed_batch_runner_sees_only_full_batches():
    seen = []

    def run(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x.sum((1, 2, 3))[:, None]

    x = torch.randn(11, 1, 2, 2)
    assert torch.equal(quantize.run_in_batches(run, x, 4), x.sum((1, 2, 3))[:, None])
    assert seen == [4, 4, 4]


# ---- weight SQNR ----


def test_sqnr_of_a_hand_computed_case():
    weight = torch.tensor([[127.0, 63.6]], dtype=torch.float64)  # scale 1: 63.6 → 64
    expected = 10 * math.log10((127**2 + 63.6**2) / 0.4**2)
    assert quantize.sqnr_db(weight, per_channel=False) == pytest.approx(expected, rel=1e-9)
    assert quantize.sqnr_db(torch.zeros(3, 2), per_channel=True) == math.inf


def test_one_huge_outlier_ruins_per_tensor_but_not_per_channel_sqnr():
    """Per tensor, the outlier sets every channel's step (50/127): the others keep ~3 levels;
    per channel, only its own channel pays. Uniform rounding noise predicts ~19 vs ~36 dB."""
    weight = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0))
    weight[5, 0, 1, 1] = 50.0
    per_tensor = quantize.sqnr_db(weight, per_channel=False)
    per_channel = quantize.sqnr_db(weight, per_channel=True)
    assert per_tensor < 22 and per_channel > 33


@given(
    st.lists(st.integers(-20, 20).map(lambda e: 2.0**e), min_size=1, max_size=6),
    st.integers(1, 20),
    st.integers(0, 2**16),
)
def test_weights_on_each_channels_int8_grid_are_exact_per_channel(scales, width, seed):
    """Integer levels in [-127, 127] with 127 reached in every channel, times a per-channel
    scale (a power of 2: no rounding in float), are exactly what per-channel int8 holds."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(-127, 128, (len(scales), width), generator=generator).double()
    levels[:, 0] = 127
    weight = levels * torch.tensor(scales, dtype=torch.float64)[:, None]
    assert quantize.sqnr_db(weight, per_channel=True) == math.inf
    assert torch.equal(quantize.fake_quantize(weight, per_channel=True), weight)
    assert quantize.sqnr_db(weight, per_channel=False) > 0
