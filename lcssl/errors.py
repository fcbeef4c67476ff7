"""Errors a user can fix: a missing dataset, a wrong flag value, an unreadable file, a checkpoint
that does not fit. The command-line entry points (lcssl/cli.py) print their message alone and exit
non-zero; every other exception is a bug and keeps its traceback.

`UserError` subclasses ValueError, so callers (and tests) that catch ValueError keep working;
`MissingInputError` is also a FileNotFoundError for the same reason.
"""


class UserError(ValueError):
    """The message names the file or flag, what is wrong and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist."""
