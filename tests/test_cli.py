"""The real command line on user errors: one message naming the flag or file and what to do, exit
status 2, no Python traceback; bugs keep theirs (lcssl/cli.py)."""
import errno
import importlib
import json
import re
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from lcssl import cli
from lcssl.data import schema
from lcssl.errors import MissingInputError, UserError
from lcssl.study.plan import trainer_config
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


# Every path-taking option of every entry point, given a URL: (command, its argv, the option as
# named in the one-line error). The config-file options name their --config.* override.
REMOTE_PATHS = [
    ("lcssl.main", ["--workdir=gs://bucket/run"], "--workdir=gs://bucket/run"),
    ("lcssl.main", ["--config.data_dir=gs://bucket/data"], "--config.data_dir=gs://bucket/data"),
    ("lcssl.main", ["--config.supervised.init_from=hdfs://nn/run"], "--config.supervised.init_from=hdfs://nn/run"),
    ("lcssl.main", ["--config.supervised.init_encoder_from=s3://b/resnet34.safetensors"],
     "--config.supervised.init_encoder_from=s3://b/resnet34.safetensors"),
    ("lcssl.main", ["--compilation_cache=gs://bucket/cache"], "--compilation_cache=gs://bucket/cache"),
    ("lcssl.predict", ["--checkpoint=gs://bucket/run", "--records=data", "--out=maps"],
     "--checkpoint=gs://bucket/run"),
    ("lcssl.predict", ["--checkpoint=run", "--records=gs://bucket/data", "--out=maps"],
     "--records=gs://bucket/data"),
    ("lcssl.predict", ["--checkpoint=run", "--records=data", "--out=gs://bucket/maps"], "--out=gs://bucket/maps"),
    ("lcssl.predict", ["--checkpoint=run", "--aerial=gs://bucket/mosaic.tif", "--out=map.tif"],
     "--aerial=gs://bucket/mosaic.tif"),
    ("lcssl.predict", ["--checkpoint=run", "--aerial=mosaic.tif", "--sits=gs://bucket/s2", "--out=map.tif"],
     "--sits=gs://bucket/s2"),
    *[("lcssl.study", [f"--{name}=gs://bucket/{name}"], f"--{name}=gs://bucket/{name}")
      for name in ("workdir", "results", "records")],
    ("lcssl.study", ["--config.data.data_dir=gs://bucket/data"], "--config.data.data_dir=gs://bucket/data"),
    ("lcssl.demo", ["--workdir=gs://bucket/demo"], "--workdir=gs://bucket/demo"),
    ("data_prep", ["synth", "--layout=hameln", "--out=gs://bucket/raw"], "--out=gs://bucket/raw"),
    ("data_prep", ["build", "--layout=flair_hub", "--src=s3://bucket/FLAIR-HUB", "--out=data"],
     "--src=s3://bucket/FLAIR-HUB"),
    ("data_prep", ["build", "--layout=flair2", "--src=raw", "--out=gs://bucket/data"], "--out=gs://bucket/data"),
    ("data_prep", ["verify", "gs://bucket/data"], "data_dir=gs://bucket/data"),
    ("lcssl.report", ["--workdir=gs://bucket/run", "--out=report"], "--workdir=gs://bucket/run"),
    ("lcssl.report", ["--workdir=run", "--compare=other", "--compare=gs://bucket/sup", "--out=report"],
     "--compare=gs://bucket/sup"),
    ("lcssl.report", ["--workdir=run", "--maps=gs://bucket/maps", "--out=report"], "--maps=gs://bucket/maps"),
    ("lcssl.report", ["--workdir=run", "--out=gs://bucket/report"], "--out=gs://bucket/report"),
]


COMMANDS = {"lcssl.main": "lcssl.main", "lcssl.predict": "lcssl.predict.__main__",
            "lcssl.study": "lcssl.study.__main__", "lcssl.demo": "lcssl.demo",
            "data_prep": "data_prep.__main__", "lcssl.report": "lcssl.report"}


def run_in_process(command: str, argv: list, monkeypatch) -> None:
    """`python -m COMMAND ARGV` in this process, through the command's own argument handling: the
    argparse commands' main(argv); lcssl.study's and lcssl.demo's flags defined and parsed as when
    they run; lcssl.main's flag holders set to what its flags parse to (its config with the
    --config.* overrides, as lcssl.study.plan.trainer_config builds it)."""
    module = importlib.import_module(COMMANDS[command])
    if command == "lcssl.main":
        config = trainer_config("configs/sup_hameln.py:tiny", [a for a in argv if a.startswith("--config.")])
        given = dict(a[2:].split("=", 1) for a in argv if not a.startswith("--config."))
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # main sets it (cli.quiet_native_logs)
        monkeypatch.setitem(vars(flags.FLAGS), "__flags_parsed", True)  # as after app.run's parse
        with flagsaver.flagsaver((module._CONFIG, config), (module._WORKDIR, given.get("workdir", "runs/x")),
                                 (module._CACHE, given.get("compilation_cache", ""))):
            cli.user_errors(module.main)([command])
    elif command in ("lcssl.study", "lcssl.demo"):
        required = {"lcssl.study": [f"--config={ROOT}/configs/study_synth.py:tiny", "--workdir=runs/study"]}
        argv = [command, *required.get(command, []), *argv]
        values = flags.FlagValues()
        monkeypatch.setattr(flags, "FLAGS", values)
        monkeypatch.setattr(sys, "argv", argv)  # where ml_collections finds the --config.* overrides
        module.define_flags(values)
        cli.user_errors(module.main)(cli.parse_flags(argv))
    else:
        cli.user_errors(module.main)(argv)


@pytest.mark.parametrize("command, argv, flag", REMOTE_PATHS,
                         ids=[f"{c}:{f.split('=')[0]}" for c, _, f in REMOTE_PATHS])
def test_every_path_option_of_every_command_refuses_a_remote_path_in_one_line(tmp_path, monkeypatch, capsys,
                                                                               command, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(command, argv, monkeypatch)
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    scheme = flag.split("=", 1)[1].split("://")[0]
    assert capsys.readouterr().err == (f"error: {flag}: remote paths ({scheme}://) are not supported; use a local "
                                       "or mounted folder (docs/DESIGN.md, 'Remote paths')\n")
    assert list(tmp_path.iterdir()) == []  # no local 'gs:' folder, nothing else either


def test_a_local_name_with_a_colon_is_a_local_path():
    from lcssl.files import refuse_remote

    refuse_remote("runs/gs:/not-a-url", "--workdir")
