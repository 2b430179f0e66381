"""The Hydra configs of repnet-train and repnet-eval (train.yaml, eval.yaml and their groups)."""
