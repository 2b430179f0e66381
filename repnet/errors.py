"""Every error a user can cause: the CLIs print the message as one line and exit 1."""

import sys
from pathlib import Path


class UsageError(Exception):
    """Input a user can fix (a path, a format, an option, a mismatch); the message says what."""


class DeployError(UsageError):
    """Input to a conversion that a user can fix."""


class CheckpointError(DeployError):
    """A checkpoint or weights file that cannot be used."""


class DatasetUnavailableError(UsageError):
    """The dataset is not on disk and cannot be obtained automatically."""


class TrainingDivergedError(UsageError):
    """The loss became non-finite; the message names the step."""


def refuse(error: UsageError) -> None:
    """``<program>: error: <message>`` on stderr, exit code 1."""
    print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
    sys.exit(1)
