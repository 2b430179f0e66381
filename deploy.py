"""Convert a training checkpoint to its verified deploy form: ``python deploy.py ckpt_path=...``."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="configs", config_name="deploy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from omegaconf.errors import MissingMandatoryValue

    from repnet.deployment import deploy
    from repnet.errors import UsageError

    try:
        report = deploy(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except MissingMandatoryValue as error:
        print(
            f"deploy.py: error: {error.full_key} is required (deploy.py {error.full_key}=...)",
            file=sys.stderr,
        )
        sys.exit(1)
    except UsageError as error:
        print(f"deploy.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    for name, check in report.checks.items():
        print(f"verified on {name}: {check}")
    for note in report.notes:
        print(note)
    print(report.table())
    print(f"written to {report.out_dir}")


if __name__ == "__main__":
    main()
