"""Errors a user can act on: the CLI prints their message as one line and exits with their code."""


class CharrnnError(Exception):
    """A runtime failure the user can fix (exit code 1): a missing file, a failed download, a bad checkpoint."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the input it quotes


class UsageError(CharrnnError):
    """A usage or configuration error (exit code 2): a bad flag, key or value."""

    exit_code = 2
