"""Train a re-parameterizable model: ``python train.py block=dbb data=cifar10 ...``."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the best validation accuracy: the objective of a Hydra sweeper."""
    from repnet.errors import UsageError
    from repnet.training import refuse, train

    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)["best_val_acc"]
    except UsageError as error:
        refuse(error)


if __name__ == "__main__":
    main()
