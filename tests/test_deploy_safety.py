"""deploy.py against hostile input, full disks, kills and a concurrent writer: one line and
exit 1 when refused, and the folders as they were (a deploy folder is the old whole set or
the new one, never a mix)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import ROOT, randomize_norms
from safetensors.torch import save_file

import repnet
from repnet.checkpoints import AtomicCheckpointIO, load_checkpoint, replacing
from repnet.deployment import deploy, read_yaml
from repnet.errors import CheckpointError

ARCHITECTURE = {"name": "tiny", "block": {"branches": "full"}, "num_classes": 10, "in_channels": 1}
RECORD = {"architecture": ARCHITECTURE, "input_size": [1, 8, 8]}


def model_state(architecture: dict = ARCHITECTURE) -> dict[str, torch.Tensor]:
    """A train-form model's weights with random BN statistics (no training needed)."""
    torch.manual_seed(0)
    return randomize_norms(repnet.models.build_model(**architecture)).state_dict()


def write_run(folder: Path, hyper_parameters: dict = RECORD, state: dict | None = None) -> Path:
    """A run folder as training leaves it: ``checkpoints/last.ckpt`` and ``config.yaml``."""
    (folder / "checkpoints").mkdir(parents=True)
    state = state if state is not None else model_state()
    content = {"state_dict": {f"model.{k}": v for k, v in state.items()}}
    torch.save({**content, "hyper_parameters": hyper_parameters}, folder / "checkpoints/last.ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump(hyper_parameters))
    return folder / "checkpoints" / "last.ckpt"


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, a link's target, a folder's name."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_file():
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[key] = "folder"
    return entries


def file_size_limit(limit: int | None) -> Callable[[], None] | None:
    """A child's ``ulimit -f``: writes past ``limit`` bytes fail with EFBIG (not SIGXFSZ)."""
    if limit is None:
        return None

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def cli(*args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy.py"), "latency_seconds=0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        preexec_fn=file_size_limit(limit),
    )


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("deploy.py: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# ---- the table: each case sets up its folder and says what deploy.py must answer ----


@dataclass
class Case:
    args: list[str]
    message: str
    limit: int | None = None  # a file-size limit for the child, in bytes
    folder: Path | None = None
    result: subprocess.CompletedProcess | None = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)


def deployed_once(folder: Path, name: str = "d", **options) -> Path:
    """A folder an earlier deploy wrote (Python API: fast)."""
    ckpt = write_run(folder / "run")
    deploy(ckpt, out_dir=folder / name, latency_seconds=0, **options)
    return folder / name


def into_its_own_folder(t: Path) -> Case:
    out = deployed_once(t)
    return Case([f"ckpt_path={out}/model.safetensors", f"out_dir={out}"], "an input of this")


def into_the_run(t: Path) -> Case:
    ckpt = write_run(t / "run")
    return Case([f"ckpt_path={ckpt}", f"out_dir={t / 'run'}"], "an input of this deploy")


def into_a_users_folder(t: Path) -> Case:
    ckpt = write_run(t / "run")
    (t / "mine").mkdir()
    (t / "mine" / "model.onnx").write_bytes(b"the user's own export")
    return Case([f"ckpt_path={ckpt}", f"out_dir={t / 'mine'}"], "did not write (model.onnx)")


def into_a_deploy_folder_with_a_users_file(t: Path) -> Case:
    out = deployed_once(t)
    (out / "notes.txt").write_text("mine")
    return Case([f"ckpt_path={t}/run/checkpoints/last.ckpt", f"out_dir={out}"], "(notes.txt)")


def into_the_root(t: Path) -> Case:
    return Case([f"ckpt_path={write_run(t / 'run')}", "out_dir=/"], "the file system's root")


def into_a_file(t: Path) -> Case:
    (t / "a_file").write_text("")
    args = [f"ckpt_path={write_run(t / 'run')}", f"out_dir={t / 'a_file'}"]
    return Case(args, "exists and is not a folder")


def into_a_link_of_the_user(t: Path) -> Case:
    (t / "elsewhere").mkdir()
    (t / "link").symlink_to(t / "elsewhere")
    args = [f"ckpt_path={write_run(t / 'run')}", f"out_dir={t / 'link'}"]
    return Case(args, "is a link this tool did not make")


def through_a_manifest_naming_another_folder(t: Path) -> Case:
    (t / "victim").write_text("keep me")
    (t / ".d.0123456789abcdef").mkdir()
    manifest = '{"written_by": "repnet", "files": {"../victim": {"size": 7, "sha256": "%s"}}}'
    (t / ".d.0123456789abcdef" / "manifest.json").write_text(manifest % ("0" * 64))
    (t / "d").symlink_to(".d.0123456789abcdef")
    args = [f"ckpt_path={write_run(t / 'run')}", f"out_dir={t / 'd'}"]
    return Case(args, "is not a readable manifest")


def flipped_bytes(t: Path) -> Case:
    ckpt = write_run(t / "run")
    with zipfile.ZipFile(ckpt) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(ckpt.read_bytes())
    middle = largest.header_offset + 128 + largest.file_size // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    ckpt.write_bytes(bytes(data))
    return Case([f"ckpt_path={ckpt}", f"out_dir={t / 'out'}"], "fails its checksum")


def integer_weights(t: Path) -> Case:
    write_run(t / "run")
    truncated = {k: v.to(torch.int32) for k, v in model_state().items()}
    save_file(truncated, t / "run" / "int.safetensors")
    args = [f"ckpt_path={t}/run/int.safetensors", f"out_dir={t / 'out'}"]
    return Case(args, "retyped: ")


def alias_bomb(t: Path) -> Case:
    write_run(t / "run")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]  # each level nine of the one before
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (t / "run" / "config.yaml").write_text("\n".join(lines) + "\n")
    return Case([f"ckpt_path={t}/run/checkpoints/last.ckpt", f"out_dir={t / 'out'}"], "aliases")


def huge_config(t: Path) -> Case:
    write_run(t / "run")
    (t / "run" / "config.yaml").write_text("pad: " + "x" * 2**21 + "\n")
    args = [f"ckpt_path={t}/run/checkpoints/last.ckpt", f"out_dir={t / 'out'}"]
    return Case(args, "is larger than 1048576 bytes")


def deep_config(t: Path) -> Case:
    write_run(t / "run")
    (t / "run" / "config.yaml").write_text("a: " + "[" * 200_000 + "]" * 200_000 + "\n")
    args = [f"ckpt_path={t}/run/checkpoints/last.ckpt", f"out_dir={t / 'out'}"]
    return Case(args, "is not a readable YAML config")


def recorded(
    architecture: dict, input_size: list, message: str, weights: dict = ARCHITECTURE
) -> Callable[[Path], Case]:
    """A checkpoint whose stored hyper-parameters are out of range (no run config beside it),
    holding the weights of ``weights``."""

    def setup(t: Path) -> Case:
        record = {"architecture": architecture, "input_size": input_size}
        ckpt = write_run(t / "run", record, model_state(weights))
        (t / "run" / "config.yaml").unlink()
        return Case([f"ckpt_path={ckpt}", f"out_dir={t / 'out'}"], message)

    return setup


def unresolvable_path(t: Path) -> Case:
    return Case(["ckpt_path=${oc.env:REPNET_UNSET_VARIABLE}", f"out_dir={t / 'out'}"], "ckpt_path:")


def over_the_file_size_limit(t: Path) -> Case:
    """The disk fills while the weights are written: the earlier deploy stays whole."""
    out = deployed_once(t, seed=1)
    args = [f"ckpt_path={t}/run/checkpoints/last.ckpt", f"out_dir={out}"]
    return Case(args, "File too large; nothing was written", limit=100_000)


def over_the_file_size_limit_in_the_export(t: Path) -> Case:
    """The weights fit, the pt2 export (the weights and more) does not."""
    out = deployed_once(t, seed=1)
    limit = (out / "model.safetensors").stat().st_size + 4096
    args = [f"ckpt_path={t}/run/checkpoints/last.ckpt", f"out_dir={out}", "export=[pt2]"]
    return Case(args, "File too large; nothing was written", limit=limit)


CASES: dict[str, Callable[[Path], Case]] = {
    "into_its_own_folder": into_its_own_folder,
    "into_the_run": into_the_run,
    "into_a_users_folder": into_a_users_folder,
    "into_a_deploy_folder_with_a_users_file": into_a_deploy_folder_with_a_users_file,
    "into_the_root": into_the_root,
    "into_a_file": into_a_file,
    "into_a_link_of_the_user": into_a_link_of_the_user,
    "through_a_manifest_naming_another_folder": through_a_manifest_naming_another_folder,
    "flipped_bytes": flipped_bytes,
    "integer_weights": integer_weights,
    "alias_bomb": alias_bomb,
    "huge_config": huge_config,
    "deep_config": deep_config,
    "negative_classes": recorded(
        {**ARCHITECTURE, "num_classes": -3}, [1, 8, 8], "architecture.num_classes: Input should"
    ),
    "huge_classes": recorded(
        {**ARCHITECTURE, "num_classes": 10**9}, [1, 8, 8], "less than or equal to 100000"
    ),
    "huge_input": recorded(ARCHITECTURE, [1, 10**6, 8], "input_size: Input should be less than"),
    "too_many_inputs": recorded(
        {**ARCHITECTURE, "in_channels": 64},
        [64, 4096, 4096],
        "exceed 268,435,456 numbers",
        weights={**ARCHITECTURE, "in_channels": 64},
    ),
    "unresolvable_path": unresolvable_path,
    "over_the_file_size_limit": over_the_file_size_limit,
    "over_the_file_size_limit_in_the_export": over_the_file_size_limit_in_the_export,
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Case]:
    """Every case run by ``deploy.py`` in a subprocess, three at a time."""
    cases = {}
    for name, setup in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        cases[name] = setup(folder)
        cases[name].before, cases[name].folder = snapshot(folder), folder

    def run(case: Case) -> None:
        case.result = cli(*case.args, limit=case.limit)
        case.after = snapshot(case.folder)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(run, cases.values()))
    return cases


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_and_changes_nothing(outcomes, name):
    case = outcomes[name]
    assert_refused(case.result, case.message)
    assert case.after == case.before


def test_a_folder_left_by_a_full_disk_still_loads(outcomes):
    for name in ("over_the_file_size_limit", "over_the_file_size_limit_in_the_export"):
        assert isinstance(repnet.load_deployed(outcomes[name].folder / "d"), torch.nn.Module)


# ---- concurrency, kills, leftovers ----


def deploy_command(ckpt: Path, out: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "deploy.py"),
        "latency_seconds=0",
        f"ckpt_path={ckpt}",
        f"out_dir={out}",
        *options,
    ]


def test_a_deploy_into_a_folder_being_written_is_refused(tmp_path):
    ckpt = write_run(tmp_path / "run")
    out = tmp_path / "d"
    with replacing(out):  # another deploy holds the folder
        result = cli(f"ckpt_path={ckpt}", f"out_dir={out}")
    assert_refused(result, f"another deploy is writing {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_two_deploys_at_once_one_wins_whole_or_the_second_is_refused(tmp_path):
    ckpt = write_run(tmp_path / "run")
    out = tmp_path / "d"
    processes = [
        subprocess.Popen(
            deploy_command(ckpt, out, f"seed={seed}"), stderr=subprocess.PIPE, text=True
        )
        for seed in (0, 1)
    ]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    codes = [process.returncode for process in processes]
    assert 0 in codes, errors
    for code, error in zip(codes, errors):
        assert code == 0 or f"deploy.py: error: another deploy is writing {out}" in error
    assert isinstance(repnet.load_deployed(out), torch.nn.Module)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", "d", out.resolve().name])


@pytest.mark.slow
def test_a_deploy_killed_at_any_moment_leaves_the_old_set_or_the_new(tmp_path):
    """SIGKILL during the import, the checks, the export, the swap or the tidying."""
    ckpt = write_run(tmp_path / "run")
    out = tmp_path / "d"
    command = deploy_command(ckpt, out, "export=[pt2]")
    start = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    duration, new = time.monotonic() - start, snapshot(out)
    deploy(ckpt, out_dir=out, latency_seconds=0, seed=1)
    old = snapshot(out)
    assert old != new
    moments = random.Random(0)
    for _ in range(5):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(moments.uniform(0.4, 0.9) * duration)  # mostly while writing
        process.kill()
        process.wait()
        assert snapshot(out) in (old, new)
        assert isinstance(repnet.load_deployed(out), torch.nn.Module)
        if snapshot(out) == new:
            deploy(ckpt, out_dir=out, latency_seconds=0, seed=1)
    deploy(ckpt, out_dir=out, latency_seconds=0)  # sweeps what the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", "d", out.resolve().name])


def test_sets_and_locks_left_by_killed_deploys_are_swept(tmp_path):
    ckpt = write_run(tmp_path / "run")
    stale = tmp_path / ".d.00000000000000aa"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".d.00000000000000bb.link").symlink_to(stale.name)
    (tmp_path / ".d.lock").write_text("")
    (tmp_path / ".d.backup").mkdir()  # a name of the user's: kept
    deploy(ckpt, out_dir=tmp_path / "d", latency_seconds=0)
    current = (tmp_path / "d").resolve().name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", "d", current, ".d.backup"])


def test_configs_are_read_as_data_never_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("REPNET_SECRET", "leaked")
    (tmp_path / "c.yaml").write_text("a: ${oc.env:REPNET_SECRET}\n")
    assert read_yaml(tmp_path / "c.yaml") == {"a": "${oc.env:REPNET_SECRET}"}


# ---- checkpoints written whole ----


@contextlib.contextmanager
def file_size_limit_here(limit: int) -> Iterator[None]:
    """This process's writes past ``limit`` bytes fail with EFBIG, for the block."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_checkpoints_are_written_whole_beside_their_target(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))  # not where it writes
    plugin = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.equal(load_checkpoint(path).state_dict["w"], torch.ones(3))
    previous = path.read_bytes()
    with file_size_limit_here(100_000), pytest.raises(CheckpointError, match="File too large"):
        plugin.save_checkpoint({"state_dict": {"w": torch.ones(100_000)}}, path)
    assert path.read_bytes() == previous
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_lightning_takes_the_atomic_checkpoint_io():
    trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
