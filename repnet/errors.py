"""Errors a user can fix: ``train.py`` and ``deploy.py`` print the message in one line, exit 1."""


class UsageError(Exception):
    """Input a user can fix (a path, a format, an option, a mismatch); the message says what."""
