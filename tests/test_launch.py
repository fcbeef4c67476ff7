"""launch.sh with bash, in dry-run mode (LCSSL_DRY_RUN=1 prints the command it would run): relative
paths resolve from the caller's directory, and a coordinator or process id without a process
count is refused instead of running one process alone."""
import os
import subprocess

import pytest

from tests._train_helpers import ROOT

LAUNCH = str(ROOT / "launch.sh")
MULTI = ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "SLURM_NTASKS")


def launch(*args, cwd, **env):
    base = {k: v for k, v in os.environ.items() if k not in MULTI}
    return subprocess.run(["bash", LAUNCH, *args], cwd=cwd, capture_output=True, text=True,
                          env={**base, "LCSSL_DRY_RUN": "1", **env}, timeout=60)


def test_relative_paths_resolve_from_the_callers_directory(tmp_path):
    (tmp_path / "mine.py").write_text("")
    proc = launch("--config=mine.py:tiny", "--workdir=runs/a", "--config.data_dir", "data/x",
                  "--config.supervised.init_from=/abs/ssl", "--config.supervised.init_encoder_from=w/r34.safetensors",
                  "--config.batch_size=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    assert args[1:4] == ["-m", "lcssl.main", "--multiprocess=off"]
    assert args[4:] == [f"--config={tmp_path}/mine.py:tiny", f"--workdir={tmp_path}/runs/a",
                        f"--config.data_dir={tmp_path}/data/x", "--config.supervised.init_from=/abs/ssl",
                        f"--config.supervised.init_encoder_from={tmp_path}/w/r34.safetensors", "--config.batch_size=4"]


def test_a_config_only_in_the_repository_is_found_there(tmp_path):
    proc = launch("--config=configs/ssl_hameln.py", "--workdir=gs://bucket/run", cwd=tmp_path)
    assert proc.stdout.split()[4:] == [f"--config={ROOT}/configs/ssl_hameln.py",
                                       "--workdir=gs://bucket/run"]


@pytest.mark.parametrize("env, args", [
    ({"COORDINATOR_ADDRESS": "node0:1234"}, []),
    ({"PROCESS_ID": "1"}, []),
    ({}, ["--coordinator=node0:1234", "--process-id=0"]),
])
def test_a_coordinator_or_process_id_without_a_process_count_is_refused(tmp_path, env, args):
    proc = launch(*args, "--workdir=run", cwd=tmp_path, **env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "NUM_PROCESSES is not" in proc.stderr and "--num-processes" in proc.stderr


def test_all_three_start_the_distributed_run(tmp_path):
    proc = launch("--workdir=run", cwd=tmp_path, COORDINATOR_ADDRESS="node0:1234",
                  NUM_PROCESSES="2", PROCESS_ID="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[3:6] == ["--coordinator_address=node0:1234", "--num_processes=2",
                                        "--process_id=1"]
