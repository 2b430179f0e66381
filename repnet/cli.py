"""Command-line entries (``repnet-train``, ``repnet-eval``, ``repnet-deploy``,
``repnet-predict``; ``train.py``, ``eval.py``, ``deploy.py`` and ``predict.py`` in a checkout):
Hydra apps on the configs shipped inside the package (``configs/``: training and its groups;
``command_configs/``: deploy and predict, where ``model=`` is a value, not a group)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    """Train; returns the best validation accuracy (the objective of a Hydra sweeper)."""
    from repnet.errors import UsageError, refuse
    from repnet.training import train

    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)["best_val_acc"]
    except UsageError as error:
        refuse(error)


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> float:
    """Print a checkpoint's test loss and accuracy; returns the accuracy."""
    from repnet.errors import UsageError, refuse
    from repnet.evaluation import evaluate

    try:
        figures = evaluate(cfg)
    except UsageError as error:
        refuse(error)
    print("  ".join(f"{name} {value:.4f}" for name, value in figures.items()))
    return figures["test/acc"]


@hydra.main(config_path="command_configs", config_name="deploy", version_base="1.3")
def deploy(cfg: DictConfig) -> None:
    """Convert, verify, write and export; print the checks and the cost table."""
    from repnet.config import plain
    from repnet.deployment import deploy
    from repnet.errors import UsageError, refuse

    try:
        report = deploy(**plain(cfg))
    except UsageError as error:
        refuse(error)
    for name, result in report.checks.items():
        print(f"verified on {name}: {result}")
    for note in report.notes:
        print(note)
    print(report.table())
    print(f"written to {report.out_dir}")


@hydra.main(config_path="command_configs", config_name="predict", version_base="1.3")
def predict(cfg: DictConfig) -> None:
    """Print (or write to ``output``) the top-k labels of each image."""
    from repnet.config import plain
    from repnet.errors import UsageError, refuse
    from repnet.predict import format_row, predict, write_rows

    try:
        options = plain(cfg)
        rows = predict(**options)
    except UsageError as error:
        refuse(error)
    if options["output"] is None:
        print("\n".join(format_row(row) for row in rows))
    else:
        write_rows(rows, Path(options["output"]), options["format"])
        print(f"{len(rows)} predictions written to {options['output']}")
