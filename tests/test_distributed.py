"""Two JAX processes on localhost (2 CPU devices each) train together through the real command,
as two hosts would: `jax.distributed` from flags, per-host input shards, one global batch (NT-Xent
and batch norm over both processes' rows) and one checkpoint."""
import json
import socket
import subprocess

from tests._train_helpers import PYTHON, ROOT, cli_env, compilation_cache, tiny_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_checkpoint_together(tmp_path_factory, tmp_path):
    cache = compilation_cache(tmp_path_factory)
    data_dir = tiny_dataset(tmp_path_factory)
    port = free_port()
    procs = []
    for process_id in range(2):
        cmd = [PYTHON, "-m", "lcssl.main", "--config=configs/ssl_flair2.py:tiny",
               f"--workdir={tmp_path}", f"--config.data_dir={data_dir}", "--config.num_steps=2",
               "--config.checkpoint_every_steps=2", "--config.ssl.probe_every_steps=2",
               # The SITS-only variant: what is tested here is the processes working together,
               # and its small graph compiles in a fraction of the time on 2 shared cores.
               "--config.model.name=utae",
               f"--coordinator_address=localhost:{port}", "--num_processes=2",
               f"--process_id={process_id}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cli_env(cache, devices=2),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
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
