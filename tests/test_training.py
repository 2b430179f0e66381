"""Training from configs with a real Lightning trainer: presets, resume, TensorBoard, DDP."""

from __future__ import annotations

import csv
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, QUICK, ROOT, RecordStart, compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.utilities.model_summary import ModelSummary
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.flop_counter import FlopCounterMode

from repnet.config import check_train_config
from repnet.data import FakeDataModule
from repnet.errors import UsageError
from repnet.schedules import warmup_cosine
from repnet.training import build_module, train

GROUPS = {
    group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    for group in (
        "data",
        "model",
        "block",
        "optim",
        "trainer",
        "callbacks",
        "logger",
        "experiment",
        "debug",
    )
}


def set_up(datamodule):
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options]
)
def test_every_config_composes_and_instantiates(group, option, tmp_path):
    overrides = (
        [f"{group}={option}", f"data.root={tmp_path}"]
        if option == "imagefolder"
        else [f"{group}={option}"]
    )
    if option == "imagefolder":
        for split in ("train", "val"):
            (tmp_path / split / "cat").mkdir(parents=True)
    if group == "trainer" and option in ("gpu", "ddp"):  # instantiable here only on the CPU
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1"]
    cfg = compose(overrides)
    config = check_train_config(cfg)
    datamodule = instantiate(cfg.data)
    if group in ("model", "block", "experiment"):
        if cfg.data.get("download"):  # CIFAR is not here: generated images of its shape
            datamodule = FakeDataModule(datamodule.num_classes, 3, 32)
        datamodule.setup("fit")
        build_module(config, datamodule)
    instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    for callback in (cfg.callbacks or {}).values():
        if callback is not None:
            instantiate(callback)
    for logger in (cfg.logger or {}).values():
        if option in ("wandb", "mlflow"):  # optional packages: their loggers need them
            pytest.importorskip(option)
        instantiate(logger, save_dir=str(tmp_path))


def test_the_slurm_launcher_config_composes_and_takes_its_node_count_from_the_trainer():
    cfg = compose(["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.timeout_min == 1440
    assert cfg.hydra.launcher.nodes == 1  # the default trainer has no num_nodes
    ddp = compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=3"], True)
    assert ddp.hydra.launcher.nodes == 3


@pytest.mark.parametrize("preset", sorted(GROUPS["block"]))
def test_every_preset_trains_for_a_few_batches(preset, tmp_path):
    summary = train(compose([f"block={preset}", *QUICK, "logger=csv"]), tmp_path)
    assert summary["max_abs_diff"] < 1e-3
    assert summary["argmax_agreement"] == 1.0
    assert Path(summary["last_checkpoint"]).is_file()


def test_the_model_summary_counts_flops_per_image_and_leaves_training_mode_on():
    cfg = compose()
    module = build_module(check_train_config(cfg), set_up(instantiate(cfg.data)))
    assert module.example_input_array.shape == (1, 1, 8, 8)
    summary = ModelSummary(module, max_depth=1)  # runs the example through the model
    assert all(m.training for m in module.modules())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module.model.eval()(module.example_input_array)
    assert summary.total_flops == counter.get_total_flops() > 0


def test_dict_valued_trainer_options_reach_lightning_as_dicts(tmp_path):
    summary = train(compose([*QUICK, "+trainer.max_time={hours:1}", "logger=csv"]), tmp_path)
    assert summary["argmax_agreement"] == 1.0


def test_a_set_example_input_is_kept():
    cfg = compose()
    module = build_module(check_train_config(cfg), set_up(instantiate(cfg.data)))
    module.example_input_array = torch.zeros(4, 1, 8, 8)
    assert module.example_input_array.shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    ("overrides", "tolerance"),
    [
        (["trainer.precision=bf16-true"], 0.1),
        (["block=dynamic", "+logger.tensorboard.log_graph=true"], 1e-4),
    ],
)
def test_options_that_touch_the_example_input_train_and_deploy(tmp_path, overrides, tolerance):
    """The summary's example image follows a ``bf16-true`` model's dtype, the final check
    feeds it bf16 images, and a dynamic model traces for TensorBoard's graph."""
    summary = train(compose([*QUICK, *overrides]), tmp_path)
    assert summary["max_rel_diff"] < tolerance and summary["argmax_agreement"] > 0.9


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default config (full blocks on digits) for three epochs."""
    run_dir = tmp_path_factory.mktemp("default-run")
    cfg = compose(["trainer.max_epochs=3", "callbacks.progress_bar=null"])
    return run_dir, train(cfg, run_dir)


def test_the_default_run_learns_and_deploys_exactly(default_run):
    run_dir, summary = default_run
    assert summary["best_val_acc"] > 0.8  # chance is 0.1
    assert summary["deploy_val_acc"] == summary["final_val_acc"] > 0.8  # the same predictions
    assert summary["max_abs_diff"] < 1e-4 and summary["argmax_agreement"] == 1.0
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.block.branches == "full" and saved.model.name == "tiny"
    assert saved.architecture.num_classes == 10 and list(saved.input_size) == [1, 8, 8]


def test_checkpoints_load_with_weights_only(default_run):
    run_dir, _ = default_run
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert checkpoint["hyper_parameters"]["architecture"]["block"]["branches"] == "full"
        assert checkpoint["hyper_parameters"]["input_size"] == [1, 8, 8]
        assert any(key.startswith("model.") for key in checkpoint["state_dict"])


def test_tensorboard_events_hold_the_curves_and_the_reparameterization_view(default_run):
    run_dir, _ = default_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/acc", "val/loss", "val/acc", "hp/best_val_acc"}
    expected |= {"deploy/max_abs_diff", "deploy/val_acc", "lr-SGD/decay"}
    expected |= {f"branches/{name}" for name in ("kxk", "1xk", "kx1", "1x1", "identity")}
    assert expected <= scalars
    assert len(events.Scalars("val/acc")) == 4  # three epochs, then the final validation
    assert 0.8 < events.Scalars("val/acc")[-1].value <= 1.0
    assert all(e.value < 1e-4 for e in events.Scalars("deploy/max_abs_diff"))
    shares = [events.Scalars(f"branches/{n}")[-1].value for n in ("kxk", "1xk", "kx1", "1x1")]
    assert all(0.0 < share < 1.0 for share in shares)
    assert {"branch_share/kxk", "branch_share/identity"} <= set(events.Tags()["histograms"])
    blocks = {tag.split("/")[1] for tag in scalars if tag.startswith("blocks/")}
    assert blocks == {"stages.0.0", "stages.1.0", "stages.1.1", "stages.2.0", "stages.2.1"}
    assert {
        f"blocks/stages.1.1/{name}" for name in ("kxk", "1xk", "kx1", "1x1", "identity")
    } <= scalars
    assert {f"skeleton/{block}" for block in blocks} == set(events.Tags()["images"])
    picture = events.Images("skeleton/stages.1.1")[0]
    assert (picture.width, picture.height) == (12 * (6 * 3 + 5), 12 * 3)  # fused + 5 branches
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"])
    metric_tags = [m.name.tag for m in experiment.experiment.metric_infos]
    assert metric_tags == ["hp/best_val_acc", "hp/max_rel_diff"]
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["block/branches"].string_value == "full"
    assert hparams["model"].string_value == "tiny" and hparams["seed"].number_value == 0
    assert {"data", "batch_size", "epochs", "precision", "optimizer", "lr"} <= set(hparams)
    best = [e.value for e in events.Scalars("hp/best_val_acc")]
    accuracies = [e.value for e in events.Scalars("val/acc")]
    assert best[0] > 0.1  # a real accuracy, not a placeholder
    assert best[-1] == pytest.approx(max(accuracies))
    assert all(e.value < 1e-4 for e in events.Scalars("hp/max_rel_diff"))


def test_resume_continues_epoch_optimizer_and_schedule(tmp_path):
    steps_per_epoch = 3
    crash = "+callbacks.crash={_target_:helpers.CrashAtEpochStart,epoch:2}"
    cfg = compose(["trainer.max_epochs=4", "+trainer.limit_train_batches=3", crash, *QUICK[2:]])
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    resumed = compose(
        [
            "trainer.max_epochs=4",
            "+trainer.limit_train_batches=3",
            *QUICK[2:],
            "+callbacks.record={_target_:helpers.RecordStart}",
            f"ckpt_path={last}",
        ]
    )
    train(resumed, tmp_path / "second")
    seen = RecordStart.seen
    assert seen["epoch"] == 2 and seen["step"] == 2 * steps_per_epoch
    assert seen["optimizer_states"] > 0  # momentum buffers came back
    total = 4 * steps_per_epoch
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = warmup_cosine(optimizer, total_steps=total)
    for _ in range(2 * steps_per_epoch):
        optimizer.step()
        schedule.step()
    assert seen["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    final = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == total


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``train.py`` in a subprocess; ``helpers`` (test callbacks) importable."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )


@pytest.mark.slow
def test_ddp_sim_trains_with_two_processes(tmp_path):
    result = run_cli("trainer=ddp_sim", *QUICK, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best val acc" in result.stdout
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "GLOBAL_RANK: 1" in result.stderr + result.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 * 3


@pytest.mark.slow
def test_multirun_sweeps_block_presets_and_names_its_jobs_by_their_overrides(tmp_path):
    result = run_cli(
        "-m", "block=repvgg,acb", "trainer.max_epochs=1", *QUICK[1:], f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for preset, job in (("repvgg", tmp_path / "0"), ("acb", tmp_path / "1")):
        assert OmegaConf.load(job / "config.yaml").block.branches == preset
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((job / "results.json").read_text())["epochs"] == 1
    with open(tmp_path / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["run"] for row in rows) == ["block=acb", "block=repvgg"]
    assert all(0 <= float(row["best_val_acc"]) <= 1 for row in rows)
    assert "best_val_acc" in result.stdout and "\nblock=acb " in result.stdout


def test_missing_cifar_is_one_clear_error_line(tmp_path):
    result = run_cli(
        "data=cifar10",
        "data.download=false",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "callbacks.progress_bar=null",
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "cifar-10-batches-py" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # no config.yaml was written: the run never started


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["block.branches=nosuch"], "unknown branch preset 'nosuch'"),
        (["block.branches=[kxk,nosuch]"], "branches must be distinct names"),
        (["data=imagefolder"], "data.root is required"),
        (["data=imagefolder", "data.root=/nonexistent"], "/nonexistent/train not found"),
        (["ckpt_path=/nonexistent.ckpt"], "ckpt_path: Path does not point to a file"),
        (["optim.optimizer.lr=-1"], "optim.optimizer.lr: Input should be greater than or equal"),
        (["optim.optimizer.weight_decay=-1"], "optim.optimizer.weight_decay: Input should be"),
        (
            ["optim=adamw", "optim.optimizer.betas=[2,0.9]"],
            r"optim.optimizer.betas: .* less than 1",
        ),
        (["optim.optimizer.momentum=abc"], "optim.optimizer.momentum: Input should be a valid"),
        (["optim.optimizer.lr=nan"], "optim.optimizer.lr: Input should be a finite number"),
        (["optim=adamw", "optim.optimizer.betas=[0.9]"], "optim.optimizer.betas: Field required"),
        (["optim.optimizer.nesterov=maybe"], "optim.optimizer.nesterov: Input should be a valid"),
        (["optim.optimizer._target_=torch.optim.Adamm"], "cannot import 'torch.optim.Adamm'"),
        (["+optim.optimizer.foo=1"], "optim.optimizer.foo: Extra inputs are not permitted"),
        (["optim.backbone_lr=2"], "optim.backbone_lr: Input should be less than or equal to 1"),
        (["optim.interval=hour"], "optim.interval: Input should be 'step' or 'epoch'"),
        (["optim.scheduler.warmup=-1"], "optim.scheduler.warmup: Input should be greater"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs: Input should be a valid integer"),
        (
            ["trainer.max_epochs=-1"],
            "trainer.max_epochs: Input should be greater than or equal to 1",
        ),
        (["trainer.max_epochs=???"], r"trainer.max_epochs is required \(trainer.max_epochs=...\)"),
        (["trainer.devices=1000"], "trainer.devices: Input should be less than or equal to 64"),
        (["trainer.precision=bf17"], "trainer.precision: Input should be 64, 32 or 16; or"),
        (["+trainer.foo=1"], "trainer.foo: Extra inputs are not permitted"),
        (["data.batch_size=0"], "data.batch_size: Input should be greater than or equal to 1"),
        (["data.batch_size=abc"], "data.batch_size: Input should be a valid integer"),
        (["data.num_workers=1000"], "data.num_workers: Input should be less than or equal to 64"),
        (["+data.val_fraction=1.5"], "data.val_fraction: Input should be less than or equal"),
        (["data.image_size=100000"], "data.image_size: Input should be less than or equal"),
        (["seed=-5"], "seed: Input should be greater than or equal to 0"),
        (["seed=abc"], "seed: Input should be a valid integer"),
        (["label_smoothing=2"], "label_smoothing: Input should be less than or equal to 1"),
        (["callbacks.temperature.start=0"], "callbacks.temperature.start: Input should be greater"),
        (["+nosuch=1"], "nosuch: Extra inputs are not permitted"),
        (["paths.data_dir=${oc.env:REPNET_NO_SUCH_VARIABLE}"], "REPNET_NO_SUCH_VARIABLE"),
    ],
)
def test_a_bad_config_is_one_usage_error_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message) as raised:
        train(compose([*QUICK[2:], *overrides]), tmp_path)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options]
)
def test_every_shipped_config_passes_the_checks(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if option == "imagefolder":
        overrides.append(f"data.root={tmp_path}")
    check_train_config(compose(overrides))


def test_resuming_under_another_model_or_optimizer_names_what_differs(tmp_path):
    train(compose(["trainer.max_epochs=1", *QUICK[1:]]), tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    other = compose(["trainer.max_epochs=2", *QUICK[1:], "optim=adamw", f"ckpt_path={last}"])
    with pytest.raises(
        UsageError, match=r"optim\.optimizer\._target_: 'torch\.optim\.SGD' in the checkpoint"
    ):
        train(other, tmp_path / "second")
    wider = compose(["trainer.max_epochs=2", *QUICK[1:], "block=plain", f"ckpt_path={last}"])
    with pytest.raises(
        UsageError, match=r"architecture\.block\.branches: 'full' in the checkpoint"
    ):
        train(wider, tmp_path / "third")
    last.write_bytes(last.read_bytes()[:1000])
    same = compose(["trainer.max_epochs=2", *QUICK[1:], f"ckpt_path={last}"])
    with pytest.raises(UsageError, match="corrupt or truncated"):
        train(same, tmp_path / "fourth")


def test_train_py_reports_a_usage_error_in_one_line_and_leaves_no_run_directory(tmp_path):
    result = run_cli("ckpt_path=/nonexistent.ckpt", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "train.py: error: ckpt_path: Path does not point to a file (got '/nonexistent.ckpt')"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # Hydra had made it, with .hydra/ and train.log


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", "data.batch_size: Input should be greater than or equal to 1"),
        ("+foo=1", "foo: Extra inputs are not permitted"),
        ("data.num_workers=1000", "data.num_workers: Input should be less than or equal to 64"),
    ],
)
def test_train_py_refuses_a_bad_value_before_hydra_makes_the_run_directory(
    tmp_path, override, message
):
    result = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: {message}")
    assert not (tmp_path / "run").exists()


def test_a_users_folder_is_no_run_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("mine: true\n")
    result = run_cli(f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert "holds files and is no repnet run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt"]
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"


def test_a_refused_resume_into_its_own_run_leaves_the_run_as_it_was(tmp_path):
    run = tmp_path / "run"
    first = run_cli(*QUICK, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-2000:]
    records = {p: p.read_bytes() for p in [run / "config.yaml", *(run / ".hydra").iterdir()]}
    last = run / "checkpoints" / "last.ckpt"
    result = run_cli(*QUICK, "block=plain", f"ckpt_path={last}", f"hydra.run.dir={run}")
    assert result.returncode == 1
    assert "was trained with another config" in result.stderr.strip().splitlines()[-1]
    assert {p: p.read_bytes() for p in records} == records


def test_a_diverging_run_stops_with_one_line_and_keeps_only_finite_checkpoints(tmp_path):
    result = run_cli(
        "optim.optimizer.lr=1e30",
        "trainer.max_epochs=2",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train.py: error: training diverged: ")
    assert "at step" in last_line and "optim.optimizer.lr" in last_line
    assert "Traceback" not in result.stderr
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point())


def test_resuming_into_its_own_run_keeps_its_records_and_continues_its_curves(tmp_path):
    run = tmp_path / "run"
    crash = "+callbacks.crash={_target_:helpers.CrashAtEpochStart,epoch:1}"
    quick = ["trainer.max_epochs=2", *QUICK[1:], f"hydra.run.dir={run}"]
    crashed = run_cli(*quick, crash)
    assert crashed.returncode == 1 and "RuntimeError: killed" in crashed.stderr
    records = {p: p.read_bytes() for p in [run / "config.yaml", *(run / ".hydra").iterdir()]}
    longer = run_cli(*quick[1:], "trainer.max_epochs=3", f"ckpt_path={run}/checkpoints/last.ckpt")
    assert longer.returncode == 1 and "trainer.max_epochs: 2 in the checkpoint" in longer.stderr
    resumed = run_cli(*quick, f"ckpt_path={run}/checkpoints/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert {p: p.read_bytes() for p in records} == records
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("val/acc")]
    assert len(steps) >= 3 and steps == sorted(steps)  # one curve: epochs 1 and 2, then final
    assert steps[0] < steps[-1] == 2 * 3  # the final step of epoch 2
    assert json.loads((run / "results.json").read_text())["epochs"] == 2


def test_loggers_many_and_the_dynamic_conv_view(tmp_path):
    train(compose(["logger=many", "block=dynamic", *QUICK]), tmp_path)
    metrics = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"dynamic/temperature", "dynamic/stages.1.1/entropy"} <= set(metrics)
    assert {f"dynamic/stages.1.1/expert_{k}" for k in range(4)} <= set(metrics)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_py_reports_test_accuracy_of_a_checkpoint(default_run, tmp_path):
    run_dir, summary = default_run
    best = run_dir / "checkpoints" / "best.ckpt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={best}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = float(result.stdout.split("test/acc ")[1].split()[0])
    assert accuracy == pytest.approx(summary["best_val_acc"], abs=1e-4)  # test split = val split
    wrong = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={best}", "data=fake"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert wrong.returncode == 1 and "data has 3 channels" in wrong.stderr


@pytest.mark.slow
def test_an_optuna_search_maximises_the_accuracy_train_py_returns(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        *QUICK,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = OmegaConf.load(tmp_path / "optimization_results.yaml").best_value
    with open(tmp_path / "summary.csv") as file:
        accuracies = [float(row["best_val_acc"]) for row in csv.DictReader(file)]
    assert len(accuracies) == 2 and best == pytest.approx(max(accuracies))


def limited_file_size(limit: int):
    """A ``preexec_fn``: files over ``limit`` bytes fail with EFBIG (SIGXFSZ ignored)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_file(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *QUICK, "logger=csv", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=limited_file_size(400_000),
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train.py: error: cannot write ") and "too large" in last_line
    assert not list((tmp_path / "checkpoints").glob("*"))  # no partial or temporary file


@pytest.mark.slow
def test_killed_at_random_moments_a_run_always_leaves_a_loadable_last_checkpoint(tmp_path):
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    command = [sys.executable, str(ROOT / "train.py"), "trainer.max_epochs=6", "logger=csv"]
    command += ["callbacks.progress_bar=null", f"hydra.run.dir={run}"]
    env = {**os.environ, "TMPDIR": "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)}
    generator = random.Random(0)
    for _ in range(3):
        resume = [f"ckpt_path={last}"] if last.exists() else []
        process = subprocess.Popen(
            [*command, *resume],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(generator.uniform(6, 10))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if last.exists():
            torch.load(last, weights_only=True)  # whole, whatever the moment
    finished = subprocess.run(
        [*command, *([f"ckpt_path={last}"] if last.exists() else [])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert torch.load(last, weights_only=True)["epoch"] == 5
    assert not list(run.glob("checkpoints/.*"))  # no temporary file left behind
