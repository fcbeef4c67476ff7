"""Checkpoints that say what input they expect, and resume exactly on any device layout.

Layout of `<workdir>/checkpoints/<step>/` (Orbax CheckpointManager, async saves, keep N):
    state/       params, batch_stats, opt_state, step, rng (the train state as a pytree of arrays)
    input_spec/  JSON: bands and order, normalization mean/std, date encoding, max_dates, aerial
                 size and gsd, SITS size and gsd, class names, ignore value, model config, SITS
                 preprocessing (cloud filtering, monthly means)
    progress/    JSON: the data position (seed, split, global batch size, next step); the input
                 pipeline is a pure function of (seed, step), so this is all resume needs
`<workdir>/best/` holds the single checkpoint with the best validation mIoU (fine-tuning).

`Checkpoints` owns the run's saved state and guards it: `resume` refuses a checkpoint made for other
data, another model or another data order before restoring it; `save` refuses a non-finite state;
`forget_after` drops what a killed run saved past the step it resumes from (best/); a full disk or
a permission problem while saving is one `CheckpointWriteError` naming the folder and the step a
rerun resumes from. A step Orbax retires (keep N, or best/'s ranking) is first renamed, whole, into
`<directory>/.deleting/` and removed from there afterwards, so a kill while it is being removed
never leaves a half-deleted numbered step folder behind (the next run finishes the removal).

Restore builds its target from the *current* mesh (`jax.ShapeDtypeStruct` with the sharding the
trainer wants now), so a checkpoint written on 8 GPUs restores on 1 CPU and vice versa: Orbax reads
each array whole and lays it out anew.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lcssl import files
from lcssl.errors import CheckpointWriteError, MissingInputError, NonFiniteError, UserError

SPEC_VERSION = 1

# Replica-parallel saving splits every replicated array among its replicas, one small slicing
# program per array shape and device; below 4 MiB per slice that costs more than it saves (on CPU
# hosts it dominated a tiny model's save: ~2700 compiles). Large arrays still write in parallel.
@contextlib.contextmanager
def _without_orbax_warnings(*substrings: str):
    """Drops Orbax's warnings about what we ask for on purpose (they go through absl's logger)."""
    drop = lambda record: not any(s in record.getMessage() for s in substrings)
    logger = logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _drop_orbax_tracebacks(record: logging.LogRecord) -> bool:
    """Orbax logs the traceback of a failed save before it re-raises the error from `save` or
    `wait_until_finished`; the error then reaches the caller whole (a bug keeps its traceback,
    a full disk becomes one line), so the logged copy only repeated it, once per thread."""
    return not (record.exc_info and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


logging.getLogger("absl").addFilter(_drop_orbax_tracebacks)

with _without_orbax_warnings("overriding"):
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20),
        override=True)


# Where Orbax moves a step it retires (one rename, so the step folder vanishes at once); what is
# here is removed by `Checkpoints` (`_remove_retired`), again by the next run if a kill cut that short.
RETIRED = ".deleting"


def _manager(directory: str, *, keep: int | None, best_metric: str | None = None,
             read_only: bool = False, partial: bool = False) -> ocp.CheckpointManager:
    with _without_orbax_warnings("read_only=True"):  # reading is all we want
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode="max",
            keep_checkpoints_without_metrics=False if best_metric else True,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=not read_only,
            # A killed save leaves `<step>.orbax-checkpoint-tmp-*` behind; the next run sweeps it.
            cleanup_tmp_directories=not read_only,
            todelete_subdir=None if read_only else RETIRED,
        )
    # Partial reads (only the encoder of a SimCLR state) need the PyTree handler's partial_restore.
    state_handler = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
    handlers = {"state": state_handler, "input_spec": ocp.JsonCheckpointHandler(),
                "progress": ocp.JsonCheckpointHandler()}
    with _without_orbax_warnings("read only"):
        return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                     item_handlers=handlers)


class Checkpoints:
    """Periodic (or best-by-metric) checkpoints of one run under `directory`. `resumes_from`: the
    Checkpoints a rerun of the command resumes from, when not these (best/: checkpoints/); a
    failed save names its complete steps."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
                 resumes_from: Checkpoints | None = None):
        self.directory = os.path.abspath(directory)
        check_step_folders(self.directory)
        self._mngr = _manager(directory, keep=keep, best_metric=best_metric)
        self._remove_retired()  # what a run killed while removing them left
        self._resumes_from = resumes_from or self
        # (step, log line) of the save under way: the step for the message if it fails, the line
        # logged once it is on disk.
        self._saving: tuple[int, str] | None = None

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        return self._mngr.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    # --- Resume ----------------------------------------------------------------------------------

    def resume(self, target: Any, input_spec: Mapping[str, Any], progress: Mapping[str, Any],
               data_dir: str = "") -> tuple[Any, dict, int] | None:
        """(state, saved progress, step) of the latest checkpoint, or None when there is none.

        Refuses (UserError) a checkpoint whose input spec (input contract, model config, dataset
        card hash) differs from `input_spec`, before restoring it, so a model change is named here
        instead of failing in Orbax with a bare shape error; and one whose data order (`progress`
        except num_steps) differs, since the run would not continue where it stopped.
        """
        step = self.latest_step()
        if step is None:
            return None
        saved_spec = self._mngr.restore(step, args=ocp.args.Composite(
            input_spec=ocp.args.JsonRestore()))["input_spec"]
        lines = resume_differences(dict(saved_spec), input_spec)
        if lines:
            raise UserError(
                f"Cannot resume {self.directory} (step {step}): this run's data or model differ "
                f"from the checkpoint's{f' (--config.data_dir={data_dir})' if data_dir else ''}:\n  "
                + "\n  ".join(lines)
                + "\nResume with the original dataset and --config.model.* (see config.json beside "
                  "the checkpoints), or start a new --workdir (fine-tune from this one with "
                  "--config.supervised.init_from).")
        state, _, saved = self.restore(step, target)
        older = {"label_seed": 0, "input": "tfdata", "zones_per_batch": 0}  # checkpoints from before the fields: their values then
        changed = {k: (saved.get(k, older.get(k)), v) for k, v in progress.items()
                   if k != "num_steps" and saved.get(k, older.get(k)) != v}
        if changed:
            raise UserError(f"Cannot resume {self.directory} (step {step}) exactly: the data order "
                            f"depends on {changed} (checkpoint, now). Use the checkpoint's values or "
                            "a new --workdir.")
        return state, saved, step

    def forget_after(self, step: int | None) -> list[int]:
        """Deletes the steps after `step` (None: all of them) and returns them. A run killed between
        its best/ save and its checkpoint of the same step (or between a new best and the next
        checkpoint) left best/ ahead of the step it resumes from; the resumed run saves those
        steps again, identical, and Orbax refuses to save a step that exists."""
        ahead = [s for s in self.all_steps() if step is None or s > step]
        for s in ahead:
            self._mngr.delete(s)
        self._remove_retired()
        if ahead:
            logging.info("%s: removed step(s) %s saved after step %s by the run that stopped; this "
                         "run saves them again.", self.directory, ahead, step)
        self._mngr.reload()
        return ahead

    def restore(self, step: int, target: Any) -> tuple[Any, dict, dict]:
        """(state, input_spec, progress) at `step`; `target` gives each leaf's shape, dtype and
        sharding (jax.ShapeDtypeStruct) on the current mesh."""
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), input_spec=ocp.args.JsonRestore(),
            progress=ocp.args.JsonRestore()))
        return out["state"], dict(out["input_spec"]), dict(out["progress"])

    # --- Save --------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, input_spec: Mapping[str, Any], progress: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
        """Starts an async save (returns at once); `wait()` blocks until it is on disk. A state
        with a NaN / inf parameter or batch statistic is refused (`check_finite`)."""
        self.check_finite(state, step)
        self.wait()  # a failure of the previous save is reported with its own step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  input_spec=ocp.args.JsonSave(dict(input_spec)),
                                  progress=ocp.args.JsonSave(dict(progress)))
        with self._write_errors(step):
            saved = self._mngr.save(step, args=args, metrics=dict(metrics) if metrics else None,
                                    force=force)
        if saved:
            self._saving = (step, f"Checkpoint step {step} -> {os.path.join(self.directory, str(step))}"
                                  + "".join(f", {k}={v:.4g}" for k, v in (metrics or {}).items()))
        return saved

    def wait(self) -> None:
        """Blocks until the save under way is on disk (then logs it) and what it retired is gone."""
        with self._write_errors(self._saving and self._saving[0]):
            self._mngr.wait_until_finished()
        if self._saving is not None:
            logging.info("%s", self._saving[1])
            self._saving = None
        self._remove_retired()

    def _remove_retired(self) -> None:
        if jax.process_index() != 0:  # Orbax retires steps on the primary process only
            return
        retired = os.path.join(self.directory, RETIRED)
        try:
            shutil.rmtree(retired)
        except FileNotFoundError:
            pass
        except OSError as e:
            logging.warning("%s: cannot remove the checkpoints Orbax retired there (%s); delete the "
                            "folder by hand to free its space.", retired, e)

    def close(self) -> None:
        """Waits for the last save and closes. While an exception is already on its way up (the
        run stopped), an error of that last save is logged instead of hiding the first one."""
        stopping = sys.exc_info()[1]
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 -- re-raised unless another error is under way
            if stopping is None:
                raise
            if str(e) != str(stopping):
                logging.error("%s", e)
        finally:
            self._mngr.close()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- re-raised unless it is a disk problem
            self._saving = None
            problem = _disk_problem(e)
            if problem is None:
                raise
            rerun = self._resumes_from
            if rerun is not self:  # its save under way, if any, decides where a rerun resumes
                with contextlib.suppress(Exception):
                    rerun.wait()
            latest = rerun._complete_steps(exclude=step if rerun is self else None)
            where = self.directory if step is None else os.path.join(self.directory, str(step))
            there = "" if rerun is self else f" in {rerun.directory}"
            raise CheckpointWriteError(
                f"{where}: cannot write this checkpoint: {problem}. "
                + (f"The complete checkpoints{there} ({', '.join(map(str, latest))}) are intact; "
                   if latest else f"No checkpoint{there} was complete yet; ")
                + "free space (or use a --workdir on another disk) and re-run the same command: "
                + (f"it resumes from step {latest[-1]}." if latest else "it starts from step 0.")
            ) from None

    def _complete_steps(self, exclude: int | None) -> list[int]:
        """The steps on disk, `exclude` (the failed save) left out: only for a message."""
        try:
            self._mngr.reload()
            return [s for s in self.all_steps() if s != exclude]
        except Exception:  # noqa: BLE001 -- only for the message
            return []

    # --- Nothing non-finite is saved -------------------------------------------------------------

    def check_finite(self, state, step: int) -> None:
        """NonFiniteError before a save when a parameter or batch statistic is NaN / inf. The loss
        check (train._stop_if_not_finite) sees the loss of the state *before* the last update, so
        this check of the state itself is what keeps a non-finite state off the disk."""
        from lcssl.sharding import to_host

        if bool(to_host(_all_finite((state.params, state.batch_stats)))):
            return
        raise self.not_finite(f"Training stopped at step {step}: the parameters or batch "
                              "statistics became NaN or inf, so this state is not saved.",
                              "using dtype=float32")

    def not_finite(self, what: str, advice: str) -> NonFiniteError:
        """The error that stops a run gone NaN / inf: `what` happened, the last good checkpoint (or
        none), and the usual causes with `advice` among them."""
        self.wait()  # the last good checkpoint finishes writing, and nothing newer is saved
        last = self.latest_step()
        where = (f"The last good checkpoint (step {last}) in {self.directory} is intact; rerun the "
                 "same command to resume from it, after" if last is not None else
                 f"No checkpoint was saved yet ({self.directory} is empty); rerun the same command "
                 "to start again from step 0, after")
        return NonFiniteError(
            f"{what} {where} lowering optimizer.learning_rate, adding warm-up "
            f"(schedule.warmup_epochs) or {advice}.")


def _disk_problem(e: BaseException) -> str | None:
    """What is wrong when `e` (or an error it wraps) is the disk's: full, quota, read-only,
    permission. Orbax reports TensorStore's write errors as ValueError('RESOURCE_EXHAUSTED: ...
    No space left on device'), the OS's own as OSError."""
    advice = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
              errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
              errno.EFBIG: "file too large for the file size limit or the filesystem"}
    texts = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES,
             "File too large": errno.EFBIG}
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in advice:
            return advice[e.errno]
        for text, code in texts.items():
            if text in str(e):
                return advice[code]
        e = e.__cause__ or e.__context__
    return None


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# --- Resume only onto the same data and model ------------------------------------------------------

# Model fields that change how the step computes, not the parameters it trains: a resume may
# change them (e.g. remat to fit a smaller device).
COMPUTE_ONLY_MODEL_FIELDS = ("dtype", "remat")


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


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the wanted shardings: the restore target for any device layout."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


# --- The input spec: what the weights expect -------------------------------------------------------

def card_sha256(card: Mapping[str, Any]) -> str:
    """A hash of the dataset card's content (splits, files, statistics, build options): a rebuilt
    or other dataset gets another one, which resume refuses (Checkpoints.resume)."""
    return hashlib.sha256(files.to_json(card).encode()).hexdigest()


def input_spec(card: Mapping[str, Any], model_config: Mapping[str, Any]) -> dict:
    """Everything a user must reproduce to feed these weights, from the dataset card."""
    aerial, sits = card["aerial"], card["sits"]
    options = card.get("build_options", {})
    return {
        "spec_version": SPEC_VERSION,
        "card_sha256": card_sha256(card),
        "layout": card.get("layout"),
        "aerial": {k: aerial.get(k) for k in ("bands", "size", "gsd_m", "mean", "std")},
        "sits": {k: sits.get(k) for k in ("bands", "size", "gsd_m", "max_dates", "date_encoding",
                                         "mean", "std")},
        "classes": list(card.get("classes", [])),
        "ignore_label": card.get("ignore_label"),
        "model": dict(model_config),
        # How data_prep turned raw series into training ones (lcssl.data.sits.SitsOptions and the
        # cloud score threshold): prediction repeats it on new Sentinel-2 rasters.
        "sits_preprocessing": {**options.get("sits", {}),
                               "cloud_prob_threshold": options.get("cloud_prob_threshold")},
    }


def check_input_spec(spec: Mapping[str, Any], card: Mapping[str, Any], *, source: str,
                     target: str, adapt_bands: bool = False) -> list[str]:
    """Refuses (UserError, a ValueError) weights whose input differs from the dataset in band names/order, date
    encoding or resolution; returns warnings for differences that are legitimate (normalization
    statistics of another dataset: each dataset is standardised with its own, as in pre-training).

    adapt_bands: other band lists are accepted (a warning) when they share at least one band name;
    the caller then remaps the first convolution's input channels by name (lcssl.train).
    `source` names the checkpoint, `target` the dataset card, for the message.
    """
    problems, warnings = [], []
    for modality in ("aerial", "sits"):
        want, have = spec.get(modality, {}), card.get(modality, {})
        want_bands, have_bands = list(want.get("bands") or []), list(have.get("bands") or [])
        if want_bands != have_bands:
            shared = [b for b in have_bands if b in want_bands]
            if adapt_bands and shared:
                warnings.append(
                    f"{modality}.bands: checkpoint {want_bands}, dataset {have_bands}: adapted by "
                    f"name (kept {shared}, new and zero-initialised "
                    f"{[b for b in have_bands if b not in want_bands]}, dropped "
                    f"{[b for b in want_bands if b not in have_bands]})")
                continue
            problems.append(f"{modality}.bands: checkpoint expects {want.get('bands')}, "
                            f"dataset has {have.get('bands')}"
                            + ("" if shared else " (no band in common)"))
        if want.get("gsd_m") is not None and have.get("gsd_m") is not None and not np.isclose(
                float(want["gsd_m"]), float(have["gsd_m"]), rtol=1e-3):
            problems.append(f"{modality}.gsd_m: checkpoint expects {want['gsd_m']} m, "
                            f"dataset has {have['gsd_m']} m")
        for stat in ("mean", "std"):
            a, b = want.get(stat), have.get(stat)
            if a is not None and b is not None and (
                    len(a) != len(b) or not np.allclose(a, b, rtol=1e-3, atol=1e-6)):
                warnings.append(f"{modality}.{stat} differs (checkpoint {np.round(a, 3).tolist()}, "
                                f"dataset {np.round(b, 3).tolist()}); inputs are standardised "
                                "with the dataset's own statistics")
    if spec.get("sits", {}).get("date_encoding") != card.get("sits", {}).get("date_encoding"):
        problems.append(f"sits.date_encoding: checkpoint expects "
                        f"{spec.get('sits', {}).get('date_encoding')!r}, dataset has "
                        f"{card.get('sits', {}).get('date_encoding')!r}")
    if problems:
        raise UserError(
            f"The checkpoint {source} was trained on different input than the dataset {target}:\n  "
            + "\n  ".join(problems)
            + "\nRebuild the dataset with the checkpoint's bands and date encoding, or pre-train on "
              "this dataset" + ("" if adapt_bands else
                                 ", or set --config.supervised.adapt_bands=True to map bands by name") + ".")
    return warnings


def read_input_spec(directory: str, step: int | None = None) -> dict:
    """The input spec stored with the checkpoint at `step` (default: latest) under `directory`."""
    directory = resolve_checkpoint_dir(directory)
    mngr = _manager(directory, keep=None, read_only=True)
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(input_spec=ocp.args.JsonRestore()))
    return dict(out["input_spec"])


STEP_ITEMS = ("state", "input_spec")  # what every step folder Checkpoints.save writes holds (and progress)


def check_step_folders(directory: str) -> None:
    """UserError naming a numbered step folder of `directory` that holds no complete checkpoint
    (empty, or missing an item): Orbax would take it for the latest step and fail on it with a
    KeyError. Orbax writes a step under a temporary name and renames it when complete, so such a
    folder was made or cut short by something else (a copy, a hand-made folder)."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory), key=lambda n: (len(n), n)):
        step_dir = os.path.join(directory, name)
        if not (name.isdigit() and os.path.isdir(step_dir)):
            continue
        missing = [item for item in STEP_ITEMS if not os.path.isdir(os.path.join(step_dir, item))]
        if missing:
            what = "is empty" if not os.listdir(step_dir) else f"lacks {', '.join(missing)}"
            raise UserError(
                f"{step_dir}: this numbered step folder {what}, so it holds no checkpoint (not written by "
                f"a run, or a copy cut short). Move it out of {directory} (the other steps stay usable) "
                "and re-run the command.")


def resolve_checkpoint_dir(path: str) -> str:
    """A workdir or its checkpoints/ folder -> the folder with numbered steps; clear error if none,
    or if a numbered step folder holds no checkpoint (`check_step_folders`)."""
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate) and any(n.isdigit() for n in os.listdir(candidate)):
            check_step_folders(candidate)
            return os.path.abspath(candidate)
    raise MissingInputError(
        f"No checkpoint found under {path!r} (looked for numbered step folders in {path}/checkpoints "
        f"and {path}). Point --config.supervised.init_from at the workdir of a finished pre-training run.")


def load_encoder(directory: str, encoder_keys: Sequence[str], *, prefix: str | None = "backbone",
                 sharding: Any = None) -> tuple[dict, dict, dict, int]:
    """The encoder subtrees of a checkpoint: (params, batch_stats, input_spec, step).

    Reads `state.params[prefix][k]` and `state.batch_stats[prefix][k]` for k in `encoder_keys` from
    the latest step (prefix None: `state.params[k]`, a segmentation run's own model); the projector,
    decoder, optimizer state and everything else stay on disk. Arrays come back with `sharding`
    (e.g. replicated on the current mesh), by default on the host CPU.
    """
    directory = resolve_checkpoint_dir(directory)
    mngr = _manager(directory, keep=None, read_only=True, partial=True)
    step = mngr.latest_step()
    meta = mngr.item_metadata(step)["state"]

    def under(tree):
        return tree if prefix is None else tree.get(prefix, {})

    where = "params" if prefix is None else f"params['{prefix}']"
    missing = [k for k in encoder_keys if k not in under(meta["params"])]
    if missing:
        raise UserError(
            f"The checkpoint {directory} (step {step}) has no encoder subtrees {missing} under "
            f"{where} (found {sorted(under(meta['params']))}); is it a checkpoint of the same model "
            "(a pre-training run, or a segmentation run with the same --config.model.*)?")

    def pick(tree):
        sub = {k: under(tree)[k] for k in encoder_keys if k in under(tree)}
        return sub if prefix is None else {prefix: sub}

    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    wanted = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        {"params": pick(meta["params"]), "batch_stats": pick(meta.get("batch_stats", {}))})
    restore_args = jax.tree.map(
        lambda m: ocp.ArrayRestoreArgs(sharding=m.sharding, global_shape=m.shape, dtype=m.dtype), wanted)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(wanted, restore_args=restore_args, partial_restore=True),
        input_spec=ocp.args.JsonRestore()))
    params = dict(under(out["state"]["params"]))
    batch_stats = dict(under(out["state"].get("batch_stats", {})))
    logging.info("Loaded encoder %s from %s step %d", sorted(params), directory, step)
    return params, batch_stats, dict(out["input_spec"]), step


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (process 0 only): the file is either the old or the new version."""
    if jax.process_index() == 0:
        files.write_json(path, obj)


def restore_weights(path: str, *, flag: str, advice: str) -> tuple[dict, dict, str, int]:
    """(variables {'params', 'batch_stats'} as numpy, input_spec, checkpoint folder, step) of the
    run at `path` for inference: its best/ checkpoint (best validation mIoU) when it has one, else
    the latest of checkpoints/, or `path` itself as a folder of numbered steps. Only params and
    batch_stats are read (no optimizer state), on the host, whatever device layout wrote them.

    A path without a checkpoint raises MissingInputError "`flag`=`path`: ... `advice`"; a step
    folder that is empty or not an lcssl checkpoint a UserError naming it.
    """
    directory = _weights_directory(path, flag, advice)
    mngr = _manager(directory, keep=None, read_only=True, partial=True)
    step = mngr.latest_step()
    try:
        meta = mngr.item_metadata(step)["state"]
        wanted = {"params": meta["params"], "batch_stats": meta.get("batch_stats") or {}}
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(wanted, restore_args=as_numpy, partial_restore=True),
            input_spec=ocp.args.JsonRestore()))
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise _incomplete(flag, path, f"{directory}/{step}", e, advice) from None
    finally:
        mngr.close()
    variables = {"params": out["state"]["params"],
                 "batch_stats": out["state"].get("batch_stats") or {}}
    return variables, dict(out["input_spec"]), directory, step


def _incomplete(flag: str, path: str, step_dir: str, error: Exception, advice: str) -> UserError:
    return UserError(f"{flag}={path}: {step_dir} is not a complete lcssl checkpoint "
                     f"({type(error).__name__}: {str(error)[:200]}); delete that step folder or point "
                     f"{flag} at another run. {advice}")


def _weights_directory(path: str, flag: str, advice: str) -> str:
    candidates = (os.path.join(path, "best"), os.path.join(path, "checkpoints"), path)
    directory = next((os.path.abspath(c) for c in candidates if os.path.isdir(c)
                      and any(n.isdigit() for n in os.listdir(c))), None)
    if directory is None:
        raise MissingInputError(
            f"{flag}={path}: no checkpoint there (looked for numbered step folders in {path}/best, "
            f"{path}/checkpoints and {path}). {advice}")
    return directory


def read_weights_spec(path: str, *, flag: str, advice: str) -> dict:
    """The input spec of the checkpoint `restore_weights(path)` would load, without its weights:
    what inference checks its inputs against before restoring any array."""
    directory = _weights_directory(path, flag, advice)
    try:
        check_step_folders(directory)
    except UserError as e:
        raise UserError(f"{flag}={path}: {e}") from None
    mngr = _manager(directory, keep=None, read_only=True)
    try:
        step = mngr.latest_step()
        out = mngr.restore(step, args=ocp.args.Composite(input_spec=ocp.args.JsonRestore()))
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise _incomplete(flag, path, f"{directory}/{step}", e, advice) from None
    finally:
        mngr.close()
    return dict(out["input_spec"])
