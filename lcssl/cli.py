"""What every command-line entry point shares: user errors without a traceback, and quiet logs.

    app.run(cli.user_errors(main))      # absl entry point (lcssl.main)
    sys.exit(cli.user_errors(main)())   # argparse entry point

A `lcssl.errors.UserError` (missing dataset, wrong flag value, unreadable file, checkpoint that
does not fit) prints `error: <message>` on stderr and exits with status 2. So does an error of the
machine rather than of the code that `explain` can put in one line naming the file: an OSError
(disk full, permission denied, missing file, read-only filesystem), TensorFlow's data-loss / disk
errors while reading or writing shards. Any other exception is a bug and keeps its traceback.

Every module logs through absl's `logging` (one library, one line format for the trainer, the study
and predict); entry points without absl's app.run call `start_logging`. Logs at the default
verbosity (absl's `--verbosity=0`): INFO lines of lcssl and data_prep, clu's
progress (steps/s, ETA) and metric lines, and every warning or error of any library. Orbax's
per-checkpoint INFO lines (temp directories, metadata, throughput), optax's and the rest come back
with `-v 1` (`--verbosity=1`); `--verbosity=-1` keeps warnings only.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import pathlib
import sys
from typing import Callable

from lcssl.errors import UserError

EXIT_USER_ERROR = 2
_REPO = pathlib.Path(__file__).resolve().parents[1]
# Where the INFO lines a user wants come from: our code, and clu's progress / metric writers.
_OWN_DIRS = (str(_REPO / "lcssl") + os.sep, str(_REPO / "data_prep") + os.sep)
_CLU_FILES = (os.path.join("clu", "metric_writers", "logging_writer.py"),
              os.path.join("clu", "platform", "local.py"))


def quiet_native_logs(environ=os.environ) -> None:
    """Environment for TensorFlow's C++ logs; call before TensorFlow is imported (it is inherited
    by worker processes). Level 2 drops its INFO lines (cpu_feature_guard). TensorFlow only runs
    tf.data here, never its math kernels, so oneDNN's kernels are unused; turned off, they no
    longer print their notice at every import. Values already set in the environment win."""
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


# Warnings that tell a user nothing to act on: Orbax timing a save that waited for the previous
# one (the trainer waits for best/ before each checkpoint on purpose).
_NOISE = ("Waiting for previous save to complete took",)


class _QuietFilter(logging.Filter):
    """Keeps warnings and errors (but _NOISE), and INFO / DEBUG lines from lcssl, data_prep and
    clu's writers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return record.levelno > logging.WARNING or not record.getMessage().startswith(_NOISE)
        path = record.pathname or ""
        return path.startswith(_OWN_DIRS) or path.endswith(_CLU_FILES)


_FILTER = _QuietFilter()


def quiet_logging(verbosity: int) -> None:
    """Installs the default filter on absl's handler unless `verbosity` >= 1 (absl's -v)."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.removeFilter(_FILTER)
    if verbosity < 1:
        handler.addFilter(_FILTER)


def start_logging(verbosity: int = 0) -> None:
    """For an entry point without absl's app.run (argparse): absl's log lines on stderr, as under
    app.run, INFO and up, with the default filter (`quiet_logging`)."""
    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # else absl prefixes "Logging before flag parsing goes to stderr"
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    quiet_logging(verbosity)


# What to do, by errno, for an OSError that names its file.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or point the command at another disk) and re-run it",
    errno.EDQUOT: "the disk quota is used up: free space and re-run the command",
    errno.EACCES: "permission denied: check the file's and its folder's permissions, or use another path",
    errno.EPERM: "operation not permitted: check the file's and its folder's permissions, or use another path",
    errno.EROFS: "the filesystem is read-only: use a writable path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.EISDIR: "is a directory, a file was expected: check the path",
    errno.EFBIG: "file too large for the file size limit (ulimit -f) or the filesystem: use another disk",
    errno.EIO: "input/output error: the disk or network filesystem failed; check it and re-run",
}


def explain(e: BaseException) -> str | None:
    """One line for an error of the machine (not of the code) that names its file, else None."""
    if isinstance(e, OSError) and e.errno is None and e.filename is None:
        # lcssl's own FileNotFoundError("<path>: no such ...") and the like: the message names the file
        return str(e) if len(e.args) == 1 and isinstance(e.args[0], str) else None
    if isinstance(e, OSError) and (e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)):
        where = f"{e.filename}: " if e.filename is not None else ""
        if e.filename2 is not None:
            where = f"{e.filename} -> {e.filename2}: "
        return where + _OS_ADVICE.get(e.errno, e.strerror or str(e))
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    if errors is not None and isinstance(e, errors.OpError):
        text = _last_line(e.message).split(" [Op:")[0]
        if isinstance(e, errors.DataLossError):
            return (f"a TFRecord shard is damaged (TensorFlow: {text}); `python -m data_prep verify DATA_DIR` "
                    "names the shard and the record, and re-running the build that made it rewrites it")
        if isinstance(e, (errors.ResourceExhaustedError, errors.PermissionDeniedError, errors.NotFoundError)):
            return f"TensorFlow could not read or write a file: {text}"
    return None


def user_errors(main: Callable) -> Callable:
    """`main` with UserError, and the errors `explain` can name, turned into one line on stderr
    and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            _fail(str(e))
        except Exception as e:  # noqa: BLE001 -- re-raised unless explained
            line = explain(e)
            if line is None:
                raise
            _fail(line)

    return wrapped


def require_dataset(data_dir: str, layout: str, flag: str = "--config.data_dir") -> None:
    """UserError with the two commands that make a dataset when `data_dir` has no dataset card,
    or naming the card when it does not read."""
    from lcssl.data.schema import CARD_NAME
    from lcssl.files import refuse_remote

    refuse_remote(data_dir, flag)
    if os.path.isfile(os.path.join(data_dir, CARD_NAME)):
        from lcssl.data import pipeline

        try:  # unreadable, malformed or of an unknown format version: the reader names the file
            pipeline.load_card(data_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"{flag}={data_dir}: {e}. Rebuild it with `python -m data_prep build`.")
        return
    raw = f"{data_dir.rstrip('/')}_raw"
    what = "does not exist" if not os.path.exists(data_dir) else f"has no {CARD_NAME}"
    raise UserError(
        f"{flag}={data_dir} {what}: no dataset built by `python -m data_prep build` there.\n"
        f"Make one from your raw {layout} data (layout: docs/DATA.md):\n"
        f"  python -m data_prep build --layout={layout} --src=/path/to/raw --out={data_dir}\n"
        f"or a small synthetic one in the same layout (minutes on a CPU):\n"
        f"  python -m data_prep synth --layout={layout} --out={raw}\n"
        f"  python -m data_prep build --layout={layout} --src={raw} --out={data_dir} --expect-size=64\n"
        f"or point {flag} at an existing dataset.")


def _fail(message: str) -> None:
    sys.stderr.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _last_line(text: str) -> str:
    """The exception line at the end of a message that embeds a traceback (config_flags does)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else str(text)


def parse_flags(argv: list[str], moved: Callable[[str], str | None] = lambda flag: None) -> list[str]:
    """absl's flag parsing (app.run(..., flags_parser=cli.parse_flags)) with one-line errors for
    a bad flag value, an unknown --config.* field or a config file that does not load: absl and
    ml_collections report some of these with a traceback of their own. `moved(flag)` says where
    the field of an unknown override went, if it moved (lcssl.configs.moved_flag)."""
    from absl import flags
    from ml_collections.config_flags import config_flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        head = text.splitlines()[0].rstrip(":") if text else ""
        _fail(head if "Traceback" not in text else f"{head.split(': Error whilst')[0]}: "
              f"{_last_line(text)}")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        field = text.splitlines()[0].strip("'\"")
        given = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and f".{field}" in a]
        flag = given[0] if given else "a --config.* override"
        _fail(moved(flag) or f"{flag}: the config has no field {field!r}. "
              + "".join(f"{t} " for t in text.splitlines()[1:]) + "(fields and presets: the "
              "config file's docstring and lcssl/configs.py)")
    for name, flag in flags.FLAGS._flags().items():
        if isinstance(flag, config_flags._ConfigFlag) and isinstance(flag.value,
                                                                     config_flags._ErrorConfig):
            given = next((a for a in argv if a.startswith(f"--{name}=")), f"--{name}")
            _fail(f"{given}: cannot load this config file: {_last_line(flag.value._error)}")
    return rest
