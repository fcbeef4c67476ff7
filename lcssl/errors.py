"""Errors a user can fix: a missing dataset, a wrong flag value, an unreadable file, a checkpoint
that does not fit, a damaged shard, a full disk, a training that diverged. Every error class of
lcssl derives from `UserError` and lives here; the command-line entry points print the message
alone and exit 2 through one function (`lcssl.cli.user_errors`); every other exception is a bug and
keeps its traceback.

`UserError` subclasses ValueError, so callers (and tests) that catch ValueError keep working;
`MissingInputError` is also a FileNotFoundError for the same reason.
"""


class UserError(ValueError):
    """The message names the file or flag, what is wrong and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist."""


class ShardError(UserError):
    """A shard that is missing, damaged or differs from what its dataset card records (the message
    names the shard, and the record when one is corrupt)."""


class ReportError(UserError):
    """A run folder or predict output that `python -m lcssl.report` cannot read."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, permission): the message names the
    folder; the checkpoints already complete stay usable."""


class NonFiniteError(UserError, FloatingPointError):
    """The loss, a gradient or the state became NaN or inf: nothing non-finite is saved, and the
    message names the last good checkpoint (or says there is none) and what to change."""


class SourceError(UserError):
    """The raw dataset as a whole cannot be read (missing folder, malformed manifest or centroid
    table): `data_prep build` stops with this one-line message, which names the file."""


class MissingSource(SourceError, FileNotFoundError):
    """A folder or file the layout requires is missing."""


class BuildError(UserError):
    """`data_prep build` cannot go on (strict mode, a conflicting earlier build, a failing shard)."""
