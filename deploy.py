"""Convert a training checkpoint to its verified deploy form: ``python deploy.py ckpt_path=...``."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="deploy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from repnet.config import plain
    from repnet.deployment import deploy
    from repnet.errors import UsageError

    try:
        report = deploy(**plain(cfg))
    except UsageError as error:
        print(f"deploy.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    for name, result in report.checks.items():
        print(f"verified on {name}: {result}")
    for note in report.notes:
        print(note)
    print(report.table())
    print(f"written to {report.out_dir}")


if __name__ == "__main__":
    main()
