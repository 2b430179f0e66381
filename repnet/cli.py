"""Command-line entries (``repnet-train``, ``repnet-eval``; ``train.py`` and ``eval.py`` in a
checkout): Hydra apps on the configs shipped inside the package."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    """Train; returns the best validation accuracy (the objective of a Hydra sweeper)."""
    from repnet.errors import UsageError
    from repnet.training import refuse, train

    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)["best_val_acc"]
    except UsageError as error:
        refuse(error)


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> float:
    """Print a checkpoint's test loss and accuracy; returns the accuracy."""
    from repnet.errors import UsageError
    from repnet.evaluation import evaluate
    from repnet.training import refuse

    try:
        figures = evaluate(cfg)
    except UsageError as error:
        refuse(error)
    print("  ".join(f"{name} {value:.4f}" for name, value in figures.items()))
    return figures["test/acc"]
