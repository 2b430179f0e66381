"""Train a re-parameterizable model: ``python train.py block=dbb data=cifar10 ...``."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from repnet.errors import UsageError
    from repnet.training import train

    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
