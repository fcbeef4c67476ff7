"""Guards around a run's workdir, called by lcssl.train.run:

    lock = workdir.lock(path)                    # one run at a time in a workdir (process 0)
    workdir.write_config(path, config, start_step) # config.json once; config.resume-<step>.json
    lock.release()

The checkpoints under the workdir guard themselves (lcssl.checkpoint.Checkpoints: resume onto the
same data and model, nothing non-finite saved).

The lock is a file `<workdir>/run.lock` holding the host, pid and start time of the run. Another
run on the same host whose process is gone left a stale lock: it is named in a warning and taken
over. A live run, or a lock from another host (whose processes cannot be checked from here),
refuses with a message naming it. (Remote workdirs, gs://..., are refused by lcssl.main.)
"""
from __future__ import annotations

import json
import os

import jax

from lcssl import files
from lcssl.files import _alive, _process_start  # noqa: F401 -- the lock's helpers, tested here

LOCK_NAME = "run.lock"


# --- One run at a time ----------------------------------------------------------------------------

class WorkdirLock(files.FolderLock):
    """`<workdir>/run.lock`; `release()` removes it (only if it is still this process's)."""

    def __init__(self, workdir: str):
        super().__init__(workdir, LOCK_NAME, flag="--workdir", what="run",
                         clash="Two runs in one workdir overwrite each other's checkpoints")


class _NoLock:
    held = False

    def release(self) -> None:
        pass


def lock(workdir: str):
    """Takes the workdir's lock on process 0 (the processes of one run share the workdir)."""
    if jax.process_index() != 0:
        return _NoLock()
    return WorkdirLock(workdir).acquire()


# --- The config of every start ------------------------------------------------------------------

def write_config(workdir: str, config, start_step: int) -> str:
    """config.json on a fresh start (process 0); a resume at step N writes config.resume-N.json
    beside it, so the original stays and each resume's overrides can be compared with it."""
    name = "config.json" if start_step == 0 else f"config.resume-{start_step}.json"
    path = os.path.join(workdir, name)
    if jax.process_index() == 0:
        files.write_json(path, json.loads(config.to_json_best_effort()))
    return path
