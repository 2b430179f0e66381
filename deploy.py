"""Convert a training checkpoint to its verified deploy form: ``python deploy.py ckpt_path=...``."""

from repnet.cli import deploy

if __name__ == "__main__":
    deploy()
