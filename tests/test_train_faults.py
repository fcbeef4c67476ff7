"""A training stopped at any point of a save resumes to the uninterrupted result; a full disk, a
diverging run and a damaged shard stop it with one line naming the file and what to do.

The supervised tiny run evaluates at steps 4 and 6 (best/ by val mIoU) and checkpoints at 2, 4 and
6: at step 4 it saves best/4, then checkpoints/4. A kill is stood in for by an exception raised at
that point (in the trainer's thread, or in Orbax's background thread that commits a save)."""
import errno
import json
import logging
import shutil
import signal
import struct
import subprocess
import textwrap

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import async_path

from lcssl import checkpoint as ckpt_lib
from lcssl import files, train
from lcssl.data import pipeline
from lcssl.errors import CheckpointWriteError, NonFiniteError, ShardError, UserError
from tests._train_helpers import (PYTHON, ROOT, cli_env, compilation_cache, saved_state, tiny_config,
                                  tiny_dataset, tiny_state)


class Killed(Exception):
    """Stands in for a kill -9 at that point."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    compilation_cache(tmp_path_factory)
    return tiny_dataset(tmp_path_factory)


def sup_config(data_dir, **overrides):
    # SITS-only variant without dropout: the smallest supervised programs to compile.
    return tiny_config("sup_flair2", data_dir, **{
        "num_steps": 6, "eval_every_steps": 4, "log_every_steps": 100, "checkpoint_every_steps": 2,
        "model.variant": "utae", "model.ltae_dropout": 0.0, "model.attn_dropout": 0.0, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sup_uninterrupted")
    return workdir, train.run(sup_config(data_dir), str(workdir))


def steps(folder) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def kill_commit_of(monkeypatch, folder: str, step: int, error: BaseException):
    """Orbax writes a step under a temporary name and renames it at the end (in a background
    thread): `error` there leaves `<folder>/<step>` written but never committed."""
    real = async_path.rename

    async def rename(src, dst):
        if dst.parent.name == folder and dst.name == str(step):
            raise error
        return await real(src, dst)

    monkeypatch.setattr(async_path, "rename", rename)


def kill_between_best_and_checkpoint(monkeypatch, step: int):
    real = ckpt_lib.Checkpoints.save

    def save(self, at_step, *args, **kwargs):
        if self.directory.endswith("checkpoints") and at_step == step:
            raise Killed
        return real(self, at_step, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save)


def assert_same_run(uninterrupted, workdir, resumed):
    reference_dir, reference = uninterrupted
    assert steps(workdir / "checkpoints") == steps(reference_dir / "checkpoints")
    assert steps(workdir / "best") == steps(reference_dir / "best") == [resumed["best_step"]]
    for folder in ("checkpoints", "best"):
        a, b = saved_state(reference_dir, folder=folder), saved_state(workdir, folder=folder)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)  # same programs on the same devices: bit-identical
    def as_written(results):  # as eval_results.json holds them, for a run in another process
        return {k: v for k, v in json.loads(files.to_json(results)).items() if k not in ("workdir", "timing")}

    assert as_written(resumed) == as_written(reference)


@pytest.mark.parametrize("kill_at", [pytest.param("between best/4 and checkpoints/4", marks=pytest.mark.slow),
                                     pytest.param("inside best/4", marks=pytest.mark.slow),
                                     pytest.param("inside checkpoints/4", marks=pytest.mark.slow)])
def test_a_run_killed_at_any_point_of_a_save_resumes_to_the_uninterrupted_result(
        data_dir, uninterrupted, tmp_path, monkeypatch, kill_at):
    if kill_at.startswith("between"):
        kill_between_best_and_checkpoint(monkeypatch, 4)
    else:
        kill_commit_of(monkeypatch, kill_at.split()[1].split("/")[0], 4, Killed())
    with pytest.raises(Killed):
        train.run(sup_config(data_dir), str(tmp_path))
    monkeypatch.undo()
    # What the kill left: checkpoints/4 never complete; best/4 complete unless killed inside it.
    assert steps(tmp_path / "checkpoints") == [2]
    assert steps(tmp_path / "best") == ([] if kill_at == "inside best/4" else [4])

    resumed = train.run(sup_config(data_dir), str(tmp_path))  # the same command again
    assert_same_run(uninterrupted, tmp_path, resumed)
    assert not [p.name for p in tmp_path.glob("*/*orbax-checkpoint-tmp*")]  # swept on resume


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["checkpoints", "best"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_rerun_ends_identical(
        data_dir, uninterrupted, tmp_path, monkeypatch, caplog, folder):
    """best/4 is saved before checkpoints/4, so on a real full disk it is the first to fail; either
    way the message names checkpoints/' complete steps, where the rerun resumes."""
    kill_commit_of(monkeypatch, folder, 4, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointWriteError) as e:
        train.run(sup_config(data_dir), str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    assert not [r for r in caplog.records if r.exc_info]  # Orbax's logged copies of the traceback
    assert message.startswith(f"{tmp_path / folder / '4'}: cannot write this checkpoint: the disk is full")
    there = "" if folder == "checkpoints" else f" in {tmp_path / 'checkpoints'}"
    assert f"The complete checkpoints{there} (2) are intact" in message and "resumes from step 2" in message
    monkeypatch.undo()
    assert_same_run(uninterrupted, tmp_path, train.run(sup_config(data_dir), str(tmp_path)))


def save(checkpoints, step: int, **metrics) -> None:
    checkpoints.save(step, tiny_state(step), {}, {"next_step": step}, metrics=metrics or None,
                     force=True)


def test_a_full_disk_at_best_names_the_step_a_rerun_resumes_from(tmp_path, monkeypatch):
    """As the trainer at step 4: best/4 first (it fails), checkpoints/4 never started. best/ has no
    complete step, checkpoints/2 is intact, and the rerun resumes from it."""
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"))
    best = ckpt_lib.Checkpoints(str(tmp_path / "best"), keep=1, best_metric="val_miou",
                                resumes_from=checkpoints)
    save(checkpoints, 2)
    kill_commit_of(monkeypatch, "best", 4, OSError(errno.ENOSPC, "No space left on device"))
    save(best, 4, val_miou=0.5)
    with pytest.raises(CheckpointWriteError) as e:
        best.wait()
    assert str(e.value) == (
        f"{tmp_path}/best/4: cannot write this checkpoint: the disk is full. The complete checkpoints "
        f"in {tmp_path}/checkpoints (2) are intact; free space (or use a --workdir on another disk) "
        "and re-run the same command: it resumes from step 2.")
    best.close()
    checkpoints.close()


def test_a_checkpoint_is_logged_once_it_is_on_disk_never_before_a_save_that_fails(
        tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"))
    save(checkpoints, 2)
    checkpoints.wait()
    kill_commit_of(monkeypatch, "checkpoints", 4, OSError(errno.ENOSPC, "No space left on device"))
    save(checkpoints, 4)
    with pytest.raises(CheckpointWriteError, match="checkpoints/4: cannot write"):
        checkpoints.wait()
    checkpoints.close()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Checkpoint step")]
    assert logged == [f"Checkpoint step 2 -> {tmp_path}/checkpoints/2"]


# Steps 2, 4 and 6 with keep=2: saving 6 retires step 2, and the process is killed (SIGKILL) while
# the folders of step 2 are being removed, wherever that happens.
KILLED_WHILE_AN_OLD_STEP_IS_REMOVED = textwrap.dedent("""
    import os, signal, sys
    from lcssl import checkpoint
    from tests._train_helpers import tiny_state

    checkpoints = checkpoint.Checkpoints(sys.argv[1], keep=2)
    for step in (2, 4):
        checkpoints.save(step, tiny_state(step), {}, {"next_step": step})
    checkpoints.wait()
    real_rmdir = os.rmdir

    def rmdir(path, *args, **kwargs):
        if os.path.basename(path) == "input_spec":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmdir(path, *args, **kwargs)

    os.rmdir = rmdir
    checkpoints.save(6, tiny_state(6), {}, {"next_step": 6})
    checkpoints.wait()
""")


def test_a_kill_9_while_an_old_step_is_removed_leaves_no_half_deleted_step_and_the_rerun_resumes(
        tmp_path):
    """Orbax used to remove a retired step in place: killed then, it left a numbered folder without
    its input_spec that every rerun refused until it was moved by hand."""
    folder = tmp_path / "checkpoints"
    killed = subprocess.run([PYTHON, "-c", KILLED_WHILE_AN_OLD_STEP_IS_REMOVED, str(folder)], cwd=ROOT,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert steps(folder) == [4, 6]
    checkpoints = ckpt_lib.Checkpoints(str(folder), keep=2)  # what the rerun opens
    assert checkpoints.latest_step() == 6
    state, _, progress = checkpoints.restore(6, tiny_state(0))
    np.testing.assert_array_equal(state.params["w"], tiny_state(6).params["w"])
    assert progress["next_step"] == 6
    assert not (folder / ckpt_lib.RETIRED).exists()  # the removal the kill cut short, finished
    checkpoints.close()


def test_orbax_s_own_report_of_a_full_disk_is_named_too():
    """TensorStore's write error reaches the caller as a ValueError text, not an OSError."""
    orbax_error = ValueError("RESOURCE_EXHAUSTED: Error writing local file "
                             "\"/w/checkpoints/4.orbax-checkpoint-tmp-1/state/d/0\": [OS error: No space "
                             "left on device]")
    assert ckpt_lib._disk_problem(RuntimeError("wrapped")) is None
    try:
        try:
            raise orbax_error
        except ValueError as cause:
            raise RuntimeError("a save failed") from cause
    except RuntimeError as e:
        assert ckpt_lib._disk_problem(e) == "the disk is full"


@pytest.mark.parametrize("checkpoint_every_steps", [pytest.param(2, marks=pytest.mark.slow), 100])
def test_a_learning_rate_that_diverges_is_a_user_error_naming_the_last_good_checkpoint_or_none(
        data_dir, tmp_path, checkpoint_every_steps):
    """--config.optimizer.learning_rate=1e6: finite through the warm-up's first steps, then NaN."""
    config = sup_config(data_dir, **{"optimizer.learning_rate": 1e6,
                                     "checkpoint_every_steps": checkpoint_every_steps})
    with pytest.raises(NonFiniteError) as e:
        train.run(config, str(tmp_path))
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    if checkpoint_every_steps == 2:
        assert "The last good checkpoint (step 2)" in message and "rerun the same command" in message
        assert steps(tmp_path / "checkpoints") == [2]
    else:
        assert f"No checkpoint was saved yet ({tmp_path / 'checkpoints'} is empty)" in message
        assert "step None" not in message and steps(tmp_path / "checkpoints") == []
    assert "lowering optimizer.learning_rate" in message
    assert steps(tmp_path / "best") == []  # evaluation (step 4) never saw a finite state to save


def flip_a_data_byte_of_record(shard, record: int):
    raw, at = bytearray(shard.read_bytes()), 0
    for _ in range(record):
        at += 16 + struct.unpack("<Q", raw[at:at + 8])[0]
    raw[at + 12 + 100] ^= 0x01  # past the 12-byte length header: the size stays, the data CRC fails
    shard.write_bytes(bytes(raw))


def copy_of_dataset(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    return data, json.loads((data / "dataset_card.json").read_text())


@pytest.mark.slow
def test_a_damaged_validation_record_is_named_and_the_steps_trained_are_kept(
        data_dir, uninterrupted, tmp_path, monkeypatch):
    data, card = copy_of_dataset(data_dir, tmp_path)
    shard = data / card["splits"]["val"]["files"][0]
    intact = shard.read_bytes()
    flip_a_data_byte_of_record(shard, 1)
    with pytest.raises(ShardError) as e:  # met by the evaluation before step 1: nothing to keep yet
        train.run(sup_config(str(data)), str(tmp_path / "run0"))
    assert str(e.value).startswith(f"{shard}: corrupt record 1 (counting from 0; its data fails its CRC), "
                                   "met while reading split 'val'. `python -m data_prep verify")
    assert steps(tmp_path / "run0" / "checkpoints") == []

    shard.write_bytes(intact)  # damaged after the step-0 evaluation read it: met at step 4's
    real, calls = pipeline.make_eval_iterator, []

    def damaged_after_the_first_evaluation(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            flip_a_data_byte_of_record(shard, 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "make_eval_iterator", damaged_after_the_first_evaluation)
    workdir = tmp_path / "run"
    with pytest.raises(ShardError, match=rf"^{shard}: corrupt record 1 "):
        train.run(sup_config(str(data)), str(workdir))
    assert steps(workdir / "checkpoints") == [2, 4]  # step 4 saved before its evaluation failed
    monkeypatch.undo()
    shard.write_bytes(intact)  # as re-running the build does
    resumed = train.run(sup_config(str(data)), str(workdir))  # evaluates step 4 first, then goes on
    assert_same_run(uninterrupted, workdir, resumed)


@pytest.mark.slow
def test_a_damaged_training_record_is_named_and_the_steps_trained_are_kept(
        data_dir, uninterrupted, tmp_path, monkeypatch):
    data, card = copy_of_dataset(data_dir, tmp_path)
    shard = data / card["splits"]["train"]["files"][0]
    flip_a_data_byte_of_record(shard, 2)
    with pytest.raises(ShardError, match=rf"^{shard}: corrupt record 2 \(counting from 0; its data fails "
                                         r"its CRC\), met while reading split 'train'"):
        train.run(sup_config(str(data)), str(tmp_path / "run"))

    real = pipeline.make_train_iterator  # a record damaged later, met at step 3: steps 1-3 are kept

    def damaged_at_step_3(*args, start_step=0, **kwargs):
        for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
            if step == 3:
                raise ShardError(f"{shard}: corrupt record 2")
            yield batch

    monkeypatch.setattr(pipeline, "make_train_iterator", damaged_at_step_3)
    with pytest.raises(ShardError):
        train.run(sup_config(data_dir), str(tmp_path / "run3"))
    assert steps(tmp_path / "run3" / "checkpoints") == [2, 3]
    monkeypatch.undo()
    train.run(sup_config(data_dir), str(tmp_path / "run3"))
    reference_dir, _ = uninterrupted
    for x, y in zip(jax.tree.leaves(saved_state(reference_dir)), jax.tree.leaves(saved_state(tmp_path / "run3"))):
        np.testing.assert_array_equal(x, y)


# A real kill -9 of `python -m lcssl.main` at each point of the step-4 saves; the same command then
# resumes. The hook below is the only difference from the plain command.
KILL_HOOK = """
import errno, os, runpy, signal, sys
from lcssl import checkpoint
from orbax.checkpoint._src.path import async_path

where, step = sys.argv.pop(1), sys.argv.pop(1)
real_rename, real_save = async_path.rename, checkpoint.Checkpoints.save

async def rename(src, dst):  # Orbax's commit of a step written under a temporary name
    if where == f"inside {dst.parent.name}/{dst.name}":
        os.kill(os.getpid(), signal.SIGKILL)
    if where == f"full disk at {dst.parent.name}/{dst.name}":
        raise OSError(errno.ENOSPC, "No space left on device")
    return await real_rename(src, dst)

def save(self, at, *args, **kwargs):
    if where == "between" and self.directory.endswith("checkpoints") and str(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(self, at, *args, **kwargs)

async_path.rename, checkpoint.Checkpoints.save = rename, save
sys.argv[0] = "lcssl.main"
runpy.run_module("lcssl.main", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["between", "inside best/4", "inside checkpoints/4"])
def test_kill_9_at_any_point_of_a_save_then_the_same_command_ends_as_the_uninterrupted_run(
        data_dir, uninterrupted, tmp_path, where):
    import subprocess

    from tests._train_helpers import PYTHON, ROOT, cli_env, run_cli

    command = ["--config=configs/sup_flair2.py:tiny", f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
               "--config.num_steps=6", "--config.eval_every_steps=4", "--config.log_every_steps=100",
               "--config.checkpoint_every_steps=2", "--config.model.variant=utae",
               "--config.model.ltae_dropout=0.0", "--config.model.attn_dropout=0.0"]
    killed = subprocess.run([PYTHON, "-c", KILL_HOOK, where, "4", *command], cwd=ROOT, env=cli_env(),
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert steps(tmp_path / "checkpoints") == [2]
    assert steps(tmp_path / "best") == ([] if where == "inside best/4" else [4])
    run_cli(["-m", "lcssl.main", *command])  # the same command, as often as needed: here once
    assert_same_run(uninterrupted, tmp_path, json.loads((tmp_path / "eval_results.json").read_text()))


@pytest.mark.slow
def test_the_command_on_a_full_disk_prints_one_line_and_no_traceback(data_dir, tmp_path):
    import subprocess

    from tests._train_helpers import PYTHON, ROOT, cli_env

    command = ["--config=configs/sup_flair2.py:tiny", f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
               "--config.num_steps=6", "--config.eval_every_steps=4", "--config.checkpoint_every_steps=2",
               "--config.model.variant=utae", "--config.model.ltae_dropout=0.0", "--config.model.attn_dropout=0.0"]
    proc = subprocess.run([PYTHON, "-c", KILL_HOOK, "full disk at checkpoints/4", "4", *command], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path}/checkpoints/4: cannot write this checkpoint: the disk is full. The "
                      "complete checkpoints (2) are intact; free space (or use a --workdir on another disk) and "
                      "re-run the same command: it resumes from step 2."]
    assert "Traceback" not in proc.stderr and proc.stderr.count("No space left on device") == 0
