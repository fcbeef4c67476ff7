"""lcssl/workdir.py: one run per workdir (stale locks taken over, live ones refused), the config of
every start kept; and the guards of lcssl.checkpoint.Checkpoints: resume refused onto other data or
another model, no save of a non-finite state.
The calls from train.run are exercised in tests/test_train.py."""
import json
import socket
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from lcssl import checkpoint as ckpt_lib
from lcssl import models, workdir
from lcssl.errors import NonFiniteError, UserError


def write_lock(path, **holder):
    (path / workdir.LOCK_NAME).write_text(json.dumps(holder))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_in_the_same_workdir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, host=socket.gethostname(), pid=holder.pid,
                   pid_start=workdir._process_start(holder.pid), started="2026-01-01T00:00:00")
        with pytest.raises(UserError, match=rf"--workdir={tmp_path} is in use: .*process "
                                            rf"{holder.pid} on {socket.gethostname()}.*still running"):
            workdir.lock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_named_and_taken_over_and_release_removes_it(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, host=socket.gethostname(), pid=pid, pid_start="1", started="earlier")
    lock = workdir.lock(str(tmp_path))
    assert f"stale lock of process {pid}" in caplog.text
    assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())["pid"] == lock.owner["pid"]
    lock.release()
    assert not (tmp_path / workdir.LOCK_NAME).exists()


def test_a_reused_pid_does_not_keep_a_stale_lock_alive(tmp_path):
    # The pid runs (this test process), but it started at another time than the locking run.
    import os
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), pid_start="0", started="x")
    workdir.lock(str(tmp_path)).release()


def test_a_lock_from_another_host_is_refused(tmp_path):
    write_lock(tmp_path, host="node-elsewhere", pid=dead_pid(), started="x")
    with pytest.raises(UserError, match="node-elsewhere.*another host.*delete"):
        workdir.lock(str(tmp_path))


def test_the_first_config_stays_and_each_resume_writes_its_own(tmp_path):
    config = ml_collections.ConfigDict({"batch_size": 16})
    assert workdir.write_config(str(tmp_path), config, 0).endswith("/config.json")
    config.batch_size = 32
    assert workdir.write_config(str(tmp_path), config, 300).endswith("/config.resume-300.json")
    assert json.loads((tmp_path / "config.json").read_text()) == {"batch_size": 16}
    assert json.loads((tmp_path / "config.resume-300.json").read_text()) == {"batch_size": 32}


def card(**changes):
    c = {"format_version": 1, "layout": "flair2", "classes": ["a", "b"], "ignore_label": 255,
         "splits": {"train": {"num_examples": 15, "files": ["train-00000-of-00001.tfrecord"]}},
         "aerial": {"bands": ["R", "G", "B"], "size": 32, "gsd_m": 1.6, "mean": [1, 2, 3],
                    "std": [1, 1, 1]},
         "sits": {"bands": ["B2"], "size": 16, "gsd_m": 10.0, "max_dates": 6, "date_encoding": "doy",
                  "mean": [5], "std": [2]}}
    c.update(changes)
    return c


def spec(card_=None, **model_changes):
    model = models.tiny_config().to_dict()
    model.update(model_changes)
    return ckpt_lib.input_spec(card_ or card(), model)


def test_resume_differences_name_the_model_field_and_the_dataset():
    saved = spec()
    assert ckpt_lib.resume_differences(saved, spec()) == []
    assert ckpt_lib.resume_differences(saved, spec(widths=(8, 16, 16, 64))) == [
        "model.widths: checkpoint [8, 16, 16, 32], now [8, 16, 16, 64]"]
    rebuilt = card(splits={"train": {"num_examples": 14, "files": ["train-00000-of-00001.tfrecord"]}})
    assert ckpt_lib.resume_differences(saved, spec(rebuilt)) == [
        "dataset card (dataset_card.json: splits, shards, statistics or build options): another "
        "content than the checkpoint's"]
    restandardised = card(aerial={**card()["aerial"], "mean": [1, 2, 4]})
    assert ckpt_lib.resume_differences(saved, spec(restandardised))[0].startswith(
        "aerial.mean: checkpoint [1, 2, 3], now [1, 2, 4]")


def test_compute_only_model_fields_may_change_on_resume():
    assert ckpt_lib.resume_differences(spec(), spec(dtype="bfloat16", remat="blocks")) == []


def test_a_checkpoint_without_a_card_hash_is_judged_by_the_other_fields():
    old = {k: v for k, v in spec().items() if k != "card_sha256"}
    assert ckpt_lib.resume_differences(old, spec()) == []


class State:
    def __init__(self, params, batch_stats):
        self.params, self.batch_stats = params, batch_stats


def test_check_finite_passes_a_finite_state_and_stops_before_saving_a_nan(tmp_path):
    ckpts = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"))
    ckpts.check_finite(State({"w": jnp.ones(3)}, {"mean": jnp.zeros(2)}), 4)
    for bad in (State({"w": jnp.array([1.0, jnp.nan])}, {}),
                State({"w": jnp.ones(3)}, {"var": jnp.array([jnp.inf])})):
        with pytest.raises(NonFiniteError, match=r"at step 5.*NaN or inf.*No checkpoint was saved yet "
                                                 rf"\({tmp_path}/checkpoints is empty\)"):
            ckpts.check_finite(bad, 5)
        with pytest.raises(NonFiniteError):  # and so no save of it
            ckpts.save(5, bad, {}, {})
    assert ckpts.all_steps() == []
    ckpts.close()


def test_an_unreadable_lock_is_refused_not_taken(tmp_path):
    (tmp_path / workdir.LOCK_NAME).write_text('{"host": ')
    with pytest.raises(UserError, match="cannot be read.*delete"):
        workdir.lock(str(tmp_path))


def test_a_numbered_step_folder_without_a_checkpoint_is_named(tmp_path, capsys):
    from lcssl import cli

    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    with pytest.raises(UserError, match=rf"{tmp_path}/checkpoints/7: this numbered step folder is empty.*Move "
                                        rf"it out of {tmp_path}/checkpoints"):
        ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"))  # what a resume opens
    (tmp_path / "checkpoints" / "7" / "state").mkdir()
    with pytest.raises(UserError, match=r"checkpoints/7: this numbered step folder lacks input_spec"):
        ckpt_lib.read_input_spec(str(tmp_path))  # what fine-tuning and predict read
    with pytest.raises(SystemExit):
        cli.user_errors(ckpt_lib.load_encoder)(str(tmp_path), ["aerial"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
