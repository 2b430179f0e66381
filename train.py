"""Train a re-parameterizable model: ``python train.py block=dbb data=cifar10 ...``."""

from repnet.cli import train

if __name__ == "__main__":
    train()
