"""Shared pieces of the trainer tests: one tiny synthetic dataset and one compilation cache per
pytest session, the tiny configs, readers for what a run leaves in its workdir, and a tiny state
for lcssl.checkpoint.Checkpoints on its own."""
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# 32 px aerial and a 16 px Sentinel-2 crop: the smallest layout the tiny model and augmentations take
# (FLAIR-HUB's series files are 10 px as published: its build's own 8 px crop).
SYNTH_ARGS = {"flair2": ["--layout=flair2", "--num-zones=4", "--patches-per-zone=8", "--patch-size=32",
                         "--sits-size=16", "--num-dates=6", "--seed=0"],
              "flair_hub": ["--layout=flair_hub", "--num-zones=4", "--patches-per-zone=8", "--patch-size=32",
                            "--num-dates=6", "--seed=0"]}
BUILD_ARGS = {"flair2": ["--layout=flair2", "--expect-size=32", "--sits-size=16", "--no-progress"],
              "flair_hub": ["--layout=flair_hub", "--expect-size=32", "--no-progress"]}


def session_dir(tmp_path_factory, name: str) -> pathlib.Path:
    return tmp_path_factory.getbasetemp() / name


def compilation_cache(tmp_path_factory) -> str:
    """The session's persistent XLA cache (set up by tests/conftest.py for every test and every
    subprocess): in-process runs and CLI subprocesses compile the same tiny programs, and every one
    after the first is a cache hit (minutes saved on 2 cores)."""
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(session_dir(tmp_path_factory, "jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def tiny_dataset(tmp_path_factory, layout: str = "flair2") -> str:
    """`python -m data_prep synth` + `build`, once per session and layout (FLAIR #2: 33 patches)."""
    out = session_dir(tmp_path_factory, f"{layout}_tiny")
    if not (out / "dataset_card.json").exists():
        raw = session_dir(tmp_path_factory, f"{layout}_raw")
        run_cli(["-m", "data_prep", "synth", f"--out={raw}", *SYNTH_ARGS[layout]])
        run_cli(["-m", "data_prep", "build", f"--src={raw}", f"--out={out}", *BUILD_ARGS[layout]])
    return str(out)


def cli_env(cache_dir: str | None = None, devices: int = 8) -> dict:
    """The tests' environment (XLA flags of tests/conftest.py included) with `devices` CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
               PYTHONPATH=str(ROOT))
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return env


def run_cli(args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Runs `python ARGS` from the repository root; fails the test with the output on error."""
    proc = subprocess.run([PYTHON, *args], cwd=ROOT, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"`python {' '.join(args)}` exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_config(module: str, data_dir: str, **overrides):
    """configs/<module>.py:tiny on the session dataset, with overrides (dotted names allowed)."""
    import importlib

    config = importlib.import_module(f"configs.{module}").get_config("tiny")
    config.data_dir = data_dir
    for name, value in overrides.items():
        *parents, leaf = name.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def build_task(config, card, mesh=None, num_steps: int = 6):
    """(task, ctx) as train.run builds them (lcssl.tasks), with eval batches from config.data_dir."""
    from lcssl import sharding, tasks, train
    from lcssl.data import pipeline

    mesh = mesh or sharding.make_mesh()
    ctx = train.task_context(
        config, card, mesh, num_steps=num_steps, steps_per_epoch=1,
        eval_batches=lambda split: pipeline.make_eval_iterator(
            config.data_dir, split, global_batch_size=config.eval_batch_size))
    return tasks.get(config.task).build(ctx), ctx


def saved_state(workdir, step: int | None = None, folder: str = "checkpoints") -> dict:
    """The train state of a checkpoint as numpy arrays (params, batch_stats, opt_state, step, rng);
    folder='best' reads the best-by-validation checkpoint."""
    directory = pathlib.Path(workdir) / folder
    step = step if step is not None else max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    path = directory / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    # Host arrays, whatever devices wrote it: how a checkpoint is read on a CPU-only machine.
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, restore_args=as_numpy)


@flax.struct.dataclass
class TinyState:
    """The least `Checkpoints.save` takes: parameters and batch statistics (checked finite)."""
    params: dict
    batch_stats: dict


def tiny_state(value: float) -> TinyState:
    return TinyState({"w": jnp.full(3, value, jnp.float32)}, {"mean": jnp.zeros(2, jnp.float32)})
