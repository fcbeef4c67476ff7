"""Writing and reading the small files a run or a build leaves behind, safely.

Every file is written to a temporary name in the same directory, flushed to disk (fsync), then
renamed over the final name, and the directory entry is synced: after a crash or a kill the final
name holds either the old or the new content, never half of it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np


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
