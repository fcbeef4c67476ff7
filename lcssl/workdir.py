"""Guards around a run's workdir, called by lcssl.train.run:

    lock = workdir.lock(path)                    # one run at a time in a workdir (process 0)
    workdir.check_resume(checkpoints, step, spec)  # before restoring: same data, model, input
    workdir.write_config(path, config, start_step) # config.json once; config.resume-<step>.json
    workdir.check_finite(state, step, checkpoints) # before every save, best/ included
    lock.release()

The lock is a file `<workdir>/run.lock` holding the host, pid and start time of the run. Another
run on the same host whose process is gone left a stale lock: it is named in a warning and taken
over. A live run, or a lock from another host (whose processes cannot be checked from here),
refuses with a message naming it. (Remote workdirs, gs://..., are refused by lcssl.main.)
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lcssl import files
from lcssl.errors import UserError
from lcssl.files import _alive, _process_start  # noqa: F401 -- the lock's helpers, tested here

LOCK_NAME = "run.lock"
# Model fields that change how the step computes, not the parameters it trains: a resume may
# change them (e.g. remat to fit a smaller device).
COMPUTE_ONLY_MODEL_FIELDS = ("dtype", "remat")


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


# --- Resume only onto the same data and model ------------------------------------------------------

def _differences(saved: Any, now: Any, prefix: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(now, Mapping):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(k), now.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)):
        saved, now = list(saved), list(now)
    return [] if saved == now else [prefix]


def resume_differences(saved_spec: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    """What differs between the input spec of a checkpoint and the one of this run, as
    'field: checkpoint X, now Y' lines (compute-only model fields and spec_version excepted)."""
    lines = []
    for field in _differences(saved_spec, spec, ""):
        if field == "spec_version" or field in {f"model.{k}" for k in COMPUTE_ONLY_MODEL_FIELDS}:
            continue
        if field == "card_sha256" and saved_spec.get("card_sha256") is None:
            continue  # a checkpoint from before card hashes were stored: the other fields decide
        node_saved, node_now = saved_spec, spec
        for key in field.split("."):
            node_saved = node_saved.get(key) if isinstance(node_saved, Mapping) else None
            node_now = node_now.get(key) if isinstance(node_now, Mapping) else None
        if field == "card_sha256":
            lines.append("dataset card (dataset_card.json: splits, shards, statistics or build "
                         "options): another content than the checkpoint's")
        else:
            lines.append(f"{field}: checkpoint {_short(node_saved)}, now {_short(node_now)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(checkpoints, step: int, spec: Mapping[str, Any], data_dir: str = "") -> None:
    """Refuses (UserError) to resume from `step` when the stored input spec (input contract, model
    config, dataset card hash) differs from this run's. Runs before the state is restored, so a
    model change is named here instead of failing in Orbax with a bare shape error."""
    from lcssl import checkpoint as ckpt_lib

    saved = ckpt_lib.read_input_spec(checkpoints.directory, step)
    lines = resume_differences(saved, spec)
    if lines:
        raise UserError(
            f"Cannot resume {checkpoints.directory} (step {step}): this run's data or model differ "
            f"from the checkpoint's{f' (--config.data_dir={data_dir})' if data_dir else ''}:\n  "
            + "\n  ".join(lines)
            + "\nResume with the original dataset and --config.model.* (see config.json beside "
              "the checkpoints), or start a new --workdir (fine-tune from this one with "
              "--config.init_from).")


# --- Nothing non-finite is saved ----------------------------------------------------------------

@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_finite(state, step: int, checkpoints) -> None:
    """Raises FloatingPointError before a save when a parameter or batch statistic is NaN / inf.
    The loss check (train._stop_if_not_finite) sees the loss of the state *before* the last update,
    so this check of the state itself is what keeps a non-finite state off the disk."""
    from lcssl.sharding import to_host

    if bool(to_host(_all_finite((state.params, state.batch_stats)))):
        return
    checkpoints.wait()
    raise FloatingPointError(
        f"Training stopped at step {step}: the parameters or batch statistics became NaN or inf, "
        f"so this state is not saved. The last good checkpoint (step {checkpoints.latest_step()}) in "
        f"{checkpoints.directory} is intact; rerun the same command to resume from it, after "
        "lowering optimizer.learning_rate, adding warm-up (schedule.warmup_epochs) or using "
        "dtype=float32.")
