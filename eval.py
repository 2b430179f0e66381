"""Test accuracy of a training checkpoint: ``python eval.py ckpt_path=... [data=...]``."""

from repnet.cli import evaluate

if __name__ == "__main__":
    evaluate()
