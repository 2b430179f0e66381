"""Installed from a built wheel, repnet trains, evaluates, deploys and predicts from an empty
folder."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_a_built_wheel_trains_evaluates_deploys_and_predicts_from_an_empty_folder(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True
    )
    (wheel,) = wheels.glob("repnet-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, cwd=work, env=env)

    where = run(sys.executable, "-c", "import repnet; print(repnet.__file__)")
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    trained = run(str(site / "bin" / "repnet-train"), "debug=limit", "hydra.run.dir=run")
    assert trained.returncode == 0, trained.stderr[-2000:]
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["argmax_agreement"] == 1.0 and results["epochs"] == 2
    tested = run(str(site / "bin" / "repnet-eval"), "ckpt_path=run/checkpoints/last.ckpt")
    assert tested.returncode == 0 and "test/acc" in tested.stdout, tested.stderr[-2000:]
    deployed = run(str(site / "bin" / "repnet-deploy"), "ckpt_path=run/checkpoints/last.ckpt")
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    assert (work / "run" / "deploy" / "config.json").is_file()
    from PIL import Image

    Image.new("L", (8, 8), 200).save(work / "digit.png")
    predicted = run(str(site / "bin" / "repnet-predict"), "model=run/deploy", "inputs=digit.png")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert predicted.stdout.startswith("digit.png  ") and len(predicted.stdout.split()) == 11
    refused = run(str(site / "bin" / "repnet-train"), "seed=-1")
    assert refused.returncode == 1
    assert refused.stderr.startswith("repnet-train: error: seed: Input should be greater")
