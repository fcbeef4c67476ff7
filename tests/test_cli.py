"""The real command line on user errors: one message naming the flag or file and what to do, exit
status 2, no Python traceback; bugs keep theirs (lcssl/cli.py)."""
import errno
import json
import re
import subprocess

import pytest

from lcssl import cli
from lcssl.data import schema
from lcssl.errors import MissingInputError, UserError
from tests._train_helpers import PYTHON, ROOT, cli_env


def run_main(*args):
    return subprocess.run([PYTHON, "-m", "lcssl.main", *args], cwd=ROOT, env=cli_env(devices=8),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    # No dataset: the two commands that make one, for the config's layout.
    (["--config=configs/ssl_hameln.py", "--config.data_dir={tmp}/none"],
     [r"--config.data_dir={tmp}/none does not exist",
      r"python -m data_prep synth --layout=hameln --out={tmp}/none_raw",
      r"python -m data_prep build --layout=hameln --src={tmp}/none_raw --out={tmp}/none"]),
    (["--config=configs/ssl_hameln.py", "--config.simclr.temprature=0.2"],
     ["--config.simclr.temprature: the config has no field 'temprature'", 'Did you mean "temperature"']),
    (["--config=configs/nosuch.py"],
     ["--config=configs/nosuch.py: cannot load this config file", "No such file"]),
    (["--config=configs/ssl_hameln.py:ssl9"], ["Unknown config preset 'ssl9'", "ssl2"]),
    (["--config=configs/ssl_hameln.py", "--config.data_dir={tmp}/minimal", "--config.batch_size=12"],
     ["The batch_size (12) is not divisible by the number of data devices (8"]),
    (["--config=configs/ssl_hameln.py", "--config.data_dir={tmp}/broken"],
     ["--config.data_dir={tmp}/broken: {tmp}/broken/dataset_card.json: this dataset card is not "
      "valid JSON"]),
    (["--config=configs/ssl_hameln.py", "--config.data_dir={tmp}/edited"],  # a key deleted by hand
     ["--config.data_dir={tmp}/edited: {tmp}/edited/dataset_card.json: its content differs from what "
      "`data_prep build` wrote"]),
])
def test_a_user_error_is_one_message_without_a_traceback(tmp_path, args, expected):
    (tmp_path / "minimal").mkdir()  # a card that reads: the run gets as far as the mesh
    (tmp_path / "minimal" / "dataset_card.json").write_text(
        json.dumps(schema.seal_card({"format_version": schema.FORMAT_VERSION, "splits": {}})))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset_card.json").write_text('{"format_version": 2,')  # cut short
    (tmp_path / "edited").mkdir()
    card = schema.seal_card({"format_version": schema.FORMAT_VERSION, "splits": {}, "classes": ["a"]})
    del card["classes"]
    (tmp_path / "edited" / "dataset_card.json").write_text(json.dumps(card))
    proc = run_main(*(a.format(tmp=tmp_path) for a in args), f"--workdir={tmp_path}/run")
    assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr
    assert "Traceback" not in proc.stderr
    # Log lines of what ran before may precede it; the message is one `error:` line (+ its lines).
    assert sum(line.startswith("error: ") for line in proc.stderr.splitlines()) == 1
    for text in expected:
        assert text.format(tmp=tmp_path) in proc.stderr


def test_the_advice_for_an_unknown_config_field_names_files_that_exist(tmp_path):
    proc = run_main("--config=configs/ssl_hameln.py", "--config.simclr.temprature=0.2",
                    f"--workdir={tmp_path}/run")
    assert proc.returncode == cli.EXIT_USER_ERROR
    named = re.findall(r"[\w/]+\.py\b", proc.stderr.splitlines()[-1])
    assert "lcssl/configs.py" in named
    assert [path for path in named if not (ROOT / path).is_file()] == []


def test_an_old_flag_of_a_moved_field_names_its_new_flag(tmp_path):
    """Commands written before the supervised settings moved under config.supervised."""
    proc = run_main("--config=configs/finetune_hameln.py:tiny", f"--workdir={tmp_path}/run",
                    "--config.init_from=runs/ssl_hameln")
    assert proc.returncode == cli.EXIT_USER_ERROR
    assert proc.stderr.splitlines() == [
        "error: --config.init_from is now --config.supervised.init_from (supervised settings moved "
        "under config.supervised)"]
    assert not (tmp_path / "run").exists()


def test_user_errors_exit_2_with_the_message_and_bugs_keep_their_exception(capsys):
    def missing():
        raise MissingInputError("data/x: no such dataset card")

    with pytest.raises(SystemExit) as exit_info:
        cli.user_errors(missing)()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data/x: no such dataset card\n"

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.user_errors(bug)()
    assert issubclass(MissingInputError, (UserError, FileNotFoundError, ValueError))


def test_the_default_log_filter_keeps_our_lines_progress_metrics_and_warnings():
    import logging

    def record(path, level=logging.INFO, msg="m"):
        return logging.LogRecord("absl", level, path, 1, msg, None, None)

    keep = cli._QuietFilter().filter
    assert keep(record(str(ROOT / "lcssl" / "train.py")))
    assert keep(record("/site-packages/clu/platform/local.py"))             # steps/s, ETA
    assert keep(record("/site-packages/clu/metric_writers/logging_writer.py"))  # metrics
    assert keep(record("/site-packages/orbax/checkpoint/x.py", logging.WARNING))
    assert not keep(record("/site-packages/orbax/checkpoint/_src/path/atomicity.py"))
    assert not keep(record("/site-packages/clu/parameter_overview.py"))
    # Orbax timing a save that waited for the previous one: nothing to act on
    assert not keep(record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.WARNING,
                           "Waiting for previous save to complete took 1.46 seconds. If this ..."))


def test_tensorflow_native_logs_are_quieted_unless_the_user_set_them():
    env = {"TF_CPP_MIN_LOG_LEVEL": "0"}
    cli.quiet_native_logs(env)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0"}


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/train-00003-of-00009.tfrecord"),
     "/data/out/train-00003-of-00009.tfrecord: the disk is full: free space (or point the command at "
     "another disk) and re-run it"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"),
     "/data/out: permission denied: check the file's and its folder's permissions, or use another path"),
    (FileNotFoundError("/data/x: no dataset_card.json"), "/data/x: no dataset_card.json"),  # our own message
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
])
def test_errors_of_the_machine_that_name_their_file_are_one_line(capsys, error, line):
    def fails():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli.user_errors(fails)()
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err == f"error: {line}\n"


def test_a_damaged_record_met_by_tensorflow_points_at_verify_and_other_errors_keep_their_traceback():
    import tensorflow as tf

    assert "data_prep verify DATA_DIR" in cli.explain(tf.errors.DataLossError(None, None, "corrupted record at 12"))
    assert cli.explain(OSError("no file named")) == "no file named"
    assert cli.explain(OSError(errno.EBADF, "Bad file descriptor")) is None  # no file named: a bug
    assert cli.explain(RuntimeError("a bug")) is None


def test_a_remote_workdir_is_refused_naming_the_flag_and_no_local_gs_folder_appears(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "lcssl.main", f"--config={ROOT}/configs/sup_hameln.py:tiny",
                           "--workdir=gs://bucket/run"], cwd=tmp_path, env=cli_env(devices=8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == cli.EXIT_USER_ERROR and "Traceback" not in proc.stderr
    assert "error: --workdir=gs://bucket/run: remote paths (gs://) are not supported" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag", [
    (["synth", "--layout=hameln", "--out=gs://bucket/raw"], "--out=gs://bucket/raw"),
    (["build", "--layout=flair_hub", "--src=s3://bucket/FLAIR-HUB", "--out=data"], "--src=s3://bucket/FLAIR-HUB"),
    (["verify", "gs://bucket/data"], "data_dir=gs://bucket/data"),
])
def test_data_prep_refuses_remote_paths_naming_the_option(tmp_path, monkeypatch, argv, flag):
    from data_prep.__main__ import main as data_prep_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"^{flag}: remote paths"):
        data_prep_main(argv)
    assert list(tmp_path.iterdir()) == []


def test_predict_and_the_config_paths_refuse_remote_paths(tmp_path, monkeypatch, capsys):
    from lcssl.files import refuse_remote
    from lcssl.predict.__main__ import main as predict_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        predict_main(["--checkpoint=gs://bucket/run", "--records=data", "--out=maps"])
    assert e.value.code == cli.EXIT_USER_ERROR
    assert "error: --checkpoint=gs://bucket/run: remote paths (gs://)" in capsys.readouterr().err
    with pytest.raises(UserError, match="--config.supervised.init_from=hdfs://nn/run: remote paths"):
        refuse_remote("hdfs://nn/run", "--config.supervised.init_from")
    refuse_remote("runs/gs:/not-a-url", "--workdir")  # a local name with a colon is a local path
    assert list(tmp_path.iterdir()) == []
