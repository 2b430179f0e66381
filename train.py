"""Train a re-parameterizable model: ``python train.py block=dbb data=cifar10 ...``."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from repnet.errors import UsageError
    from repnet.training import RunRecords, train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    records = RunRecords(run_dir, hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log")
    try:
        train(cfg, run_dir)
    except UsageError as error:
        records.forget()
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
