"""Two JAX processes on localhost (2 CPU devices each) train together through the real command,
as two hosts would: `jax.distributed` from flags, per-host input shards, one global batch (NT-Xent
and batch norm over both processes' rows) and one checkpoint."""
import json
import signal
import socket
import subprocess
import time

import pytest

from tests._train_helpers import PYTHON, ROOT, cli_env, compilation_cache, tiny_dataset

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two_processes(workdir, data_dir, cache, *overrides):
    port = free_port()
    procs = []
    for process_id in range(2):
        cmd = [PYTHON, "-m", "lcssl.main", "--config=configs/ssl_flair2.py:tiny",
               f"--workdir={workdir}", f"--config.data_dir={data_dir}",
               # The SITS-only variant: what is tested here is the processes working together,
               # and its small graph compiles in a fraction of the time on 2 shared cores.
               "--config.model.variant=utae", *overrides,
               f"--coordinator_address=localhost:{port}", "--num_processes=2",
               f"--process_id={process_id}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cli_env(cache, devices=2),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def test_two_processes_train_and_checkpoint_together(tmp_path_factory, tmp_path):
    cache = compilation_cache(tmp_path_factory)
    data_dir = tiny_dataset(tmp_path_factory)
    procs = start_two_processes(tmp_path, data_dir, cache, "--config.num_steps=2",
                                "--config.checkpoint_every_steps=2", "--config.probe.every_steps=2")
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=900)
        finally:
            if p.poll() is None:
                p.kill()
        outputs.append(out)
    for process_id, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {process_id} exited {p.returncode}:\n{out[-6000:]}"
    assert "JAX process 1 of 2, 2 local / 4 global devices" in outputs[1]
    assert (tmp_path / "checkpoints" / "2").is_dir()
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["step"] == 2 and results["probe"]["num_eval"] > 0


def test_sigterm_on_one_host_stops_every_host_at_the_same_checkpoint(tmp_path_factory, tmp_path):
    """A scheduler may signal one host only: JAX's preemption service tells the others, all save the
    same step and exit cleanly, and the run resumes from there."""
    cache = compilation_cache(tmp_path_factory)
    data_dir = tiny_dataset(tmp_path_factory)
    procs = start_two_processes(tmp_path, data_dir, cache, "--config.num_steps=100000",
                                "--config.checkpoint_every_steps=100000", "--config.log_every_steps=1",
                                "--config.probe.every_steps=100000")
    outputs = ["", ""]
    try:
        # Wait until process 1 is training (it logs the first step's metrics), then signal it alone.
        deadline = time.time() + 600
        while "train/loss" not in outputs[1] and time.time() < deadline and procs[1].poll() is None:
            outputs[1] += procs[1].stdout.readline()
        assert "train/loss" in outputs[1], outputs[1][-6000:]
        procs[1].send_signal(signal.SIGTERM)
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=300)
            outputs[i] += out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for process_id, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {process_id} exited {p.returncode}:\n{out[-6000:]}"
        assert "Preempted at step" in out, out[-3000:]
    steps = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 0 < int(steps[0]) < 100000
    for out in outputs:
        assert f"Preempted at step {steps[0]};" in out
