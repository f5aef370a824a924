"""Errors a user can act on: the CLI prints their message as one line and exits with their code."""


class CharrnnError(Exception):
    """A runtime failure the user can fix (exit code 1): a missing file, a failed download, a bad checkpoint."""

    exit_code = 1


class UsageError(CharrnnError):
    """A usage or configuration error (exit code 2): a bad flag, key or value."""

    exit_code = 2
