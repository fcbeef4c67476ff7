"""Writing and reading the small files a run or a build leaves behind, safely, and the lock that
keeps a second process out of a folder a run or a build writes to.

Every file is written to a temporary name in the same directory, flushed to disk (fsync), then
renamed over the final name, and the directory entry is synced: after a crash or a kill the final
name holds either the old or the new content, never half of it.
"""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import re
import socket
import time
from typing import Any

import numpy as np
from absl import logging

from lcssl.errors import UserError


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a filesystem that cannot open directories; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary name + fsync + rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, file size limit: name the file being written
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _json_default(x):
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, pathlib.PurePath):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def to_json(obj: Any, sort_keys: bool = True) -> str:
    """The one JSON text format of lcssl files: indented, numpy scalars and arrays as numbers."""
    return json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n"


def write_json(path, obj: Any, sort_keys: bool = True) -> None:
    """Atomic JSON write: the file is either the old or the new version."""
    atomic_write_bytes(path, to_json(obj, sort_keys).encode())


def read_json(path, what: str = "file") -> Any:
    """The parsed JSON of `path`; a missing, unreadable or malformed file raises ValueError /
    FileNotFoundError naming the file and what it is (`what`, e.g. "dataset card")."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read this {what}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: this {what} is not valid JSON ({e})") from None


# --- One process at a time in a folder ------------------------------------------------------------

def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a reused pid from the run that locked."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return start is None or _process_start(pid) in (None, start)


class FolderLock:
    """A lock file `<folder>/<name>` holding the host, pid and start time of the process that owns
    the folder (a training run its workdir, a build its --out). Another holder on this host whose
    process is gone left a stale lock: it is named in a warning and taken over; a live holder, or one
    on another host (whose processes cannot be checked from here), refuses with a UserError naming
    it. `release()` removes the file (only if it is still this process's); so does exiting."""

    def __init__(self, folder: str, name: str, *, flag: str, what: str, clash: str):
        self.path = os.path.join(folder, name)
        self.flag, self.what, self.clash = flag, what, clash
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "pid_start": _process_start(os.getpid()),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(to_json(self.owner))
        return True

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or damaged: treated as another host's, never taken silently

    def acquire(self) -> "FolderLock":
        for _ in range(3):  # a lock released or taken over between our calls: look again
            if self._create():
                self.held = True
                atexit.register(self.release)  # also when the run ends in an exception
                return self
            holder = self._holder()
            if holder is None:
                continue
            same_host = holder.get("host") == self.owner["host"]
            pid = holder.get("pid")
            ours = same_host and pid == self.owner["pid"]  # an earlier run of this process
            if same_host and isinstance(pid, int) and (ours or not _alive(pid, holder.get("pid_start"))):
                if not ours:
                    logging.warning("%s: stale lock of process %d on %s (started %s), which is no "
                                    "longer running; taking it over.", self.path, pid,
                                    holder.get("host"), holder.get("started"))
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            if not holder:
                who = f"cannot be read, so its {self.what} cannot be checked"
            elif same_host:
                who = (f"names process {pid} on {holder.get('host')} (started "
                       f"{holder.get('started')}), which is still running")
            else:
                who = (f"names process {pid} on {holder.get('host')} (started "
                       f"{holder.get('started')}), which may still be running (another host: its "
                       "process cannot be checked from here)")
            raise UserError(
                f"{self.flag}={os.path.dirname(self.path)} is in use: {self.path} {who}. {self.clash}. "
                f"Wait for it, use another {self.flag}, or delete {self.path} if no {self.what} uses it.")
        raise UserError(f"{self.path}: could not take the lock (other {self.what}s keep taking it); "
                        f"make sure only one {self.what} uses this {self.flag}.")

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == self.owner["pid"]:
            os.remove(self.path)
        self.held = False


# A URL-style path: scheme://... (gs://, s3://, hdfs://, file://, ...).
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_remote(value, flag: str) -> None:
    """UserError naming `flag` when `value` is a URL-style path (gs://bucket/run, s3://...): lcssl and
    data_prep read and write local (or mounted) folders through os/pathlib, where such a path would
    become a local folder named 'gs:' (docs/DESIGN.md, "Remote paths")."""
    if value is not None and _REMOTE.match(str(value)):
        scheme = str(value).split("://", 1)[0]
        raise UserError(f"{flag}={value}: remote paths ({scheme}://) are not supported; use a local or mounted "
                        "folder (docs/DESIGN.md, 'Remote paths')")

