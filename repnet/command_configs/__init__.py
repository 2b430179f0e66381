"""Configs of the deploy and predict commands (no config groups: ``model=`` is a value)."""
