"""Test accuracy of a training checkpoint: ``python eval.py ckpt_path=... [data=...]``."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from repnet.errors import UsageError
    from repnet.evaluation import evaluate
    from repnet.training import refuse

    try:
        figures = evaluate(cfg)
    except UsageError as error:
        refuse(error)
    print("  ".join(f"{name} {value:.4f}" for name, value in figures.items()))
    return figures["test/acc"]


if __name__ == "__main__":
    main()
