"""deploy.py and repnet.deployment: checkpoint → verified deploy form → files, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import QUICK, compose, relative_error, run_script
from safetensors.torch import save_file

import repnet
from repnet.checkpoints import CheckpointError, DeployError, load_checkpoint, replacing
from repnet.deployment import deploy, load_model
from repnet.errors import UsageError
from repnet.export import EXPORTERS, Format
from repnet.training import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model of ``full`` blocks trained for a few batches on digits."""
    run = tmp_path_factory.mktemp("run")
    train(compose([*QUICK, "logger=csv"]), run)
    return run


def trained_model(run: Path) -> torch.nn.Module:
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    return load_model(checkpoint.hyper_parameters["architecture"], checkpoint.state_dict)


def test_deploy_writes_verified_files_that_load_back(run_dir, tmp_path):
    out = tmp_path / "deploy"
    report = deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=out, export=["onnx", "pt2"])
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "model.onnx",
        "model.pt2",
        "manifest.json",
    }
    assert set(report.checks) == {
        "random inputs",
        "real validation data",
        "onnx vs deploy form",
        "pt2 vs deploy form",
    }
    assert all(check.max_rel < 1e-5 for check in report.checks.values())
    assert [row["form"] for row in report.rows] == [
        "train form (eval)",
        "deploy form",
        "onnx",
        "pt2",
    ]
    deployed = repnet.load_deployed(out)
    assert all(m.deployed for m in deployed.modules() if isinstance(m, repnet.RepBlock))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(16, 1, 8, 8)
    result = repnet.verify(trained_model(run_dir), deployed, x)
    assert result.max_rel < 1e-5 and result.argmax_agreement == 1.0


def test_default_out_dir_is_the_runs_deploy_folder(run_dir):
    report = deploy(run_dir / "checkpoints" / "best.ckpt", latency_seconds=0)
    assert report.out_dir == run_dir / "deploy"
    assert (run_dir / "deploy" / "model.safetensors").is_file()


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_plain_state_dicts_with_wrapper_prefixes_deploy(run_dir, tmp_path, prefix, suffix):
    state = {prefix + k: v for k, v in trained_model(run_dir).state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    out = tmp_path / "out"
    report = deploy(path, config=run_dir / "config.yaml", out_dir=out, latency_seconds=0)
    assert report.checks["random inputs"].max_rel < 1e-5


def test_a_deployed_checkpoint_deploys_again_without_harm(run_dir, tmp_path):
    deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=tmp_path / "once", latency_seconds=0)
    report = deploy(tmp_path / "once" / "model.safetensors", out_dir=tmp_path / "twice")
    assert report.checks["random inputs"].max_abs == 0.0
    x = torch.randn(4, 1, 8, 8)
    once, twice = repnet.load_deployed(tmp_path / "once"), repnet.load_deployed(tmp_path / "twice")
    assert torch.equal(once(x), twice(x))


def test_a_replacement_interrupted_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "out"
    with pytest.raises(KeyboardInterrupt), replacing(out) as stage, stage() as folder:
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_tolerance_that_is_not_met_fails_and_writes_nothing(run_dir, tmp_path):
    with pytest.raises(DeployError, match="nothing was written"):
        deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=tmp_path / "out", max_rel=1e-12)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("export_batch", 0, "greater than or equal to 1"),
        *[("export_batch", v, "a valid integer") for v in ("4", 2.0, True)],
        ("max_rel", -1e-4, "greater than or equal to 0"),
        *[("max_rel", v, "a valid number") for v in ("abc", None, True)],
        ("max_rel", float("nan"), "a finite number"),
        ("random_inputs", 0, "greater than or equal to 1"),
        ("random_inputs", 10**6, "less than or equal to 1024"),
        ("real_batches", -1, "greater than or equal to 0"),
        ("latency_seconds", -1, "greater than or equal to 0"),
        ("seed", 2**64, "less than or equal to 4294967295"),
        ("export", ["tflite"], "'onnx', 'pt2' or 'onnx_int8'"),
        ("latency_runs", 3, "Extra inputs are not permitted"),
    ],
)
def test_bad_option_values_are_refused_before_any_work(run_dir, tmp_path, option, value, message):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=f"^{option}: .*{message}"):
        deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=out, **{option: value})
    assert list(tmp_path.iterdir()) == []


def test_an_out_dir_that_cannot_be_made_is_one_error_and_leaves_nothing(run_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(DeployError, match="cannot write into"):
        deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=a_file / "sub" / "deploy")
    with pytest.raises(DeployError, match="exists and is not a folder"):
        deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=a_file)
    assert [p.name for p in tmp_path.rglob("*")] == ["a_file"]


def test_a_format_named_twice_is_exported_once(run_dir, tmp_path):
    report = deploy(
        run_dir / "checkpoints" / "last.ckpt",
        out_dir=tmp_path / "deploy",
        export=["pt2", "pt2"],
        latency_seconds=0,
    )
    assert [row["form"] for row in report.rows].count("pt2") == 1


def assert_one_clear_error(result: subprocess.CompletedProcess, message: str, out: Path):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deploy.py: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_cli_deploys_a_training_checkpoint(run_dir, tmp_path):
    out = tmp_path / "deploy"
    result = run_script(
        "deploy.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"out_dir={out}"
    )
    assert result.returncode == 0, result.stderr
    assert "verified on real validation data: max abs diff" in result.stdout
    assert "deploy form" in result.stdout and "MFLOPs/image" in result.stdout
    assert (out / "model.safetensors").is_file()


def bad_file(kind: str, run_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A checkpoint that must be refused, and the words its error must contain."""
    path = tmp_path / f"{kind}.ckpt"
    good = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    if kind == "missing":
        return path, "no checkpoint at"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return path, "corrupt or truncated"
    if kind == "garbage":
        path.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
        return path, "is corrupt or not a plain-weights checkpoint"
    if kind == "other_architecture":
        other = compose(["model=cifar", "block=plain"])
        model = repnet.models.build_model(
            name=other.model.name, block="plain", num_classes=10, in_channels=1
        )
        torch.save(model.state_dict(), path)
        return path, "missing: "
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "other_architecture"])
def test_cli_bad_checkpoints_get_one_clear_error(kind, run_dir, tmp_path):
    path, message = bad_file(kind, run_dir, tmp_path)
    out = tmp_path / "out"
    result = run_script(
        "deploy.py", f"ckpt_path={path}", f"config={run_dir / 'config.yaml'}", f"out_dir={out}"
    )
    assert_one_clear_error(result, message, out)


class RunsCode:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_cli_refuses_a_checkpoint_that_would_run_code(run_dir, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": RunsCode(marker)}, path)
    out = tmp_path / "out"
    result = run_script("deploy.py", f"ckpt_path={path}", f"out_dir={out}")
    assert_one_clear_error(result, "would run code when unpickled", out)
    assert "mkdir" in result.stderr
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "export=[onnx,tflite]",
            "export: Input should be 'onnx', 'pt2' or 'onnx_int8' (got 'tflite')",
        ),
        ("max_rel=abc", "max_rel: Input should be a valid number (got 'abc')"),
        ("max_rel=-1e-4", "max_rel: Input should be greater than or equal to 0 (got -0.0001)"),
        ("+foo=1", "foo: Extra inputs are not permitted (got 1)"),
        ("config=${oc.env:REPNET_UNSET}", "config: "),
    ],
)
def test_cli_a_bad_option_is_refused_before_any_work(run_dir, tmp_path, override, message):
    out = tmp_path / "out"
    result = run_script(
        "deploy.py",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        override,
        f"out_dir={out}",
    )
    assert_one_clear_error(result, message, out)


def test_a_config_cannot_make_deploy_run_code(run_dir, tmp_path):
    """The run config is data: nested targets are not instantiated, interpolations not resolved."""
    marker = tmp_path / "code-ran"
    payload = tmp_path / "payload.pt"
    torch.save(RunsCode(marker), payload)
    config = (
        (run_dir / "config.yaml")
        .read_text()
        .replace(
            "\n  batch_size: 64",
            f"\n  batch_size:\n    _target_: torch.load\n    f: {payload}\n    weights_only: false",
            1,
        )
    )
    assert "torch.load" in config
    (tmp_path / "config.yaml").write_text(config)
    report = deploy(
        run_dir / "checkpoints" / "last.ckpt",
        config=tmp_path / "config.yaml",
        out_dir=tmp_path / "o",
    )
    assert not marker.exists()
    assert "not a plain repnet dataset" in report.notes[0]
    assert set(report.checks) == {"random inputs"}


def test_a_new_deploy_leaves_no_file_of_an_older_one(run_dir, tmp_path):
    out = tmp_path / "deploy"
    deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=out, export=["pt2"], latency_seconds=0)
    assert (out / "model.pt2").is_file()
    deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=out, latency_seconds=0)
    assert not (out / "model.pt2").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.is_symlink()] == [out.resolve().name]


# ---- proposed by the mutation audit ----


def test_the_written_model_card_describes_the_model_and_what_was_checked(run_dir, tmp_path):
    """``config.json`` in timm's hub shape: architecture, classes, preprocessing, label names;
    the same card in the safetensors metadata; no path of this machine."""
    from safetensors import safe_open

    out = tmp_path / "deploy"
    report = deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=out, latency_seconds=0)
    text = (out / "config.json").read_text()
    card = json.loads(text)
    assert card["architecture"] == "tiny" and card["num_classes"] == 10
    assert card["label_names"] == [str(digit) for digit in range(10)]
    cfg = card["pretrained_cfg"]
    assert cfg["input_size"] == [1, 8, 8] and cfg["crop_pct"] == 1.0 and len(cfg["mean"]) == 1
    assert card["model_args"]["in_channels"] == 1 and "block" in card["model_args"]
    verification = card["repnet"]["verification"]
    assert verification == {name: vars(c) for name, c in report.checks.items()}
    assert set(verification) == {"random inputs", "real validation data"}
    assert card["repnet"]["source"] == "last.ckpt" and str(tmp_path) not in text
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert json.loads(weights.metadata()["config"]) == card


def test_a_checkpoint_with_nan_weights_fails_and_writes_nothing(run_dir, tmp_path):
    """A diverged run: NaN outputs give a NaN gap, which no tolerance accepts."""
    state = trained_model(run_dir).state_dict()
    key = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(DeployError, match="nothing was written"):
        deploy(tmp_path / "diverged.pt", config=run_dir / "config.yaml", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_that_disagrees_fails_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    pt2 = EXPORTERS["pt2"]

    def off_by_one(path):
        run = pt2.load(path)
        return lambda x: run(x) + 1

    monkeypatch.setitem(EXPORTERS, "pt2", Format(pt2.filename, pt2.serialize, off_by_one))
    with pytest.raises(DeployError, match="the pt2 export differs"):
        deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=tmp_path / "out", export=["pt2"])
    assert not (tmp_path / "out").exists()


def test_a_pt2_export_is_checked_as_loaded_back_from_its_file(run_dir, tmp_path, monkeypatch):
    def damaged_save(program, f, *args, **kwargs):
        f.write(b"not a pt2 archive")

    monkeypatch.setattr(torch.export, "save", damaged_save)
    with pytest.raises(DeployError, match="export 'pt2' failed"):
        deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=tmp_path / "out", export=["pt2"])
    assert not (tmp_path / "out").exists()


def test_weights_of_another_shape_are_one_deploy_error(run_dir, tmp_path):
    architecture = load_checkpoint(run_dir / "checkpoints" / "last.ckpt").hyper_parameters[
        "architecture"
    ]
    other = repnet.models.build_model(**{**architecture, "num_classes": 3})
    torch.save(other.state_dict(), tmp_path / "w.pt")
    with pytest.raises(DeployError, match="resized: "):
        deploy(tmp_path / "w.pt", config=run_dir / "config.yaml", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


TINY = "name: tiny, num_classes: 10, in_channels: 1"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a\n- list\n", "is not a config mapping"),
        (f"architecture: {{{TINY}}}\ninput_size: [1, 8]\n", "input_size: Field required"),
        ("architecture: {name: tiny}\ninput_size: [1, 8, 8]\n", "num_classes: Field required"),
        (f"architecture: {{{TINY}, block: nope}}\ninput_size: [1, 8, 8]\n", "cannot be built"),
        (f"architecture: {{{TINY}, widht: 3}}\ninput_size: [1, 8, 8]\n", "cannot be built"),
    ],
)
def test_a_bad_run_config_is_one_deploy_error(run_dir, tmp_path, content, message):
    (tmp_path / "config.yaml").write_text(content)
    with pytest.raises(DeployError, match=message):
        deploy(
            run_dir / "checkpoints" / "last.ckpt",
            config=tmp_path / "config.yaml",
            out_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_named(run_dir, tmp_path):
    with pytest.raises(DeployError, match="no config file at"):
        deploy(run_dir / "checkpoints" / "last.ckpt", config=tmp_path / "nope.yaml")


def test_load_deployed_refuses_a_folder_without_a_whole_deploy_form(run_dir, tmp_path):
    with pytest.raises(DeployError, match=r"holds no manifest\.json"):
        repnet.load_deployed(tmp_path)
    out = tmp_path / "deploy"
    deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=out, latency_seconds=0)
    state = load_checkpoint(out / "model.safetensors").state_dict
    save_file(dict(list(state.items())[1:]), out / "model.safetensors")  # one tensor short
    with pytest.raises(DeployError, match=r"model\.safetensors does not match its manifest"):
        repnet.load_deployed(out)


def test_a_prefix_is_stripped_only_when_every_key_has_it():
    from repnet.checkpoints import strip_prefixes

    mixed = {"model.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    assert list(strip_prefixes(mixed)) == ["model.weight", "head.weight"]
    assert list(strip_prefixes({"module._orig_mod.w": torch.zeros(1)})) == ["w"]


def test_damaged_or_non_tensor_weight_files_are_checkpoint_errors(run_dir, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(trained_model(run_dir).state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_checkpoint(tmp_path / "mixed.pt")


def test_written_files_get_the_usual_permissions(run_dir, tmp_path):
    """safetensors writes 0600; published files must be readable as any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "deploy"
    deploy(run_dir / "checkpoints" / "last.ckpt", out_dir=out, latency_seconds=0)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    names = ["model.safetensors", "config.json", "manifest.json"]
    assert modes == dict.fromkeys(names, 0o666 & ~umask)
    assert out.resolve().stat().st_mode & 0o777 == 0o777 & ~umask


def exported_ops(model: torch.nn.Module, x: torch.Tensor, folder: Path) -> tuple[list, list]:
    """``model`` exported to ONNX with a dynamic batch: its ops and its initialisers' shapes,
    after checking that ONNX Runtime computes the model's function on ``x``."""
    import onnx

    (folder / "model.onnx").write_bytes(EXPORTERS["onnx"].serialize(model, x[:2], True))
    got = EXPORTERS["onnx"].load(folder / "model.onnx")(x)  # len(x) > 2: the batch is dynamic
    assert relative_error(model(x).detach(), got) < 1e-5
    graph = onnx.load(str(folder / "model.onnx")).graph
    return [node.op_type for node in graph.node], [list(t.dims) for t in graph.initializer]


def test_convs_that_give_one_pixel_are_exported_as_one_matrix_product(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, stride=2, padding=1, dilation=2),  # 3x3 -> one pixel
        torch.nn.Conv2d(6, 6, 1, groups=3),  # grouped: stays a conv
        torch.nn.Flatten(),
    ).eval()
    ops, shapes = exported_ops(model, torch.randn(5, 3, 5, 6), tmp_path)
    assert ops.count("Conv") == 2 and {"Gemm", "MatMul"} & set(ops)
    assert [6, 8] in shapes or [8, 6] in shapes  # only the centre tap reads the 3x3 map


class TwiceApplied(torch.nn.Module):
    """One conv (3x3, stride 2) on the image and on its top-left 3x3 corner."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.conv(x[:, :, :3, :3]).mean((2, 3))


@pytest.mark.parametrize("size", [6, 4], ids=["one pixel at one call", "from two sizes"])
def test_a_conv_that_gives_one_pixel_only_sometimes_stays_a_conv(size, tmp_path):
    ops, _ = exported_ops(TwiceApplied().eval(), torch.randn(4, 3, size, size), tmp_path)
    assert ops.count("Conv") == 2 and not {"Gemm", "MatMul"} & set(ops)
