"""Entry point: flags -> config -> `lcssl.train.run(config, workdir)`.

    python -m lcssl.main --config=configs/ssl_hameln.py --workdir=runs/ssl_hameln
    python -m lcssl.main --config=configs/ssl_hameln.py:ssl3 --workdir=runs/ssl3 \
        --config.batch_size=512 --config.simclr.temperature=0.2

The config is locked: an override of a field that does not exist fails before anything runs (one
that moved, such as --config.init_from, names its new flag).
Rerunning the same command resumes from the latest checkpoint in --workdir. User errors (no
dataset, a checkpoint that does not fit, ...) print one message and exit 2 without a traceback;
`-v 1` adds every library's INFO lines to the default output (lcssl/cli.py).

Several processes (one per host, or one per GPU; see launch.sh): --multiprocess=auto initialises
`jax.distributed` when COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID (or SLURM's variables, or a
TPU pod's metadata) say there is more than one process; --coordinator_address, --num_processes and
--process_id set them explicitly.

Compiled programs are cached in ~/.cache/lcssl/jax (--compilation_cache; '' turns it off), so a
resumed run does not compile again.
"""
import functools
import os

from absl import app, flags, logging
from ml_collections import config_flags

from lcssl import cli, configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: configs/<name>.py[:presets]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs, checkpoints and eval_results.json go.")
_MULTIPROCESS = flags.DEFINE_enum("multiprocess", "auto", ["auto", "on", "off"],
                                  "Initialise jax.distributed: auto = when the environment says so.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/lcssl/jax",
    "Persistent XLA compilation cache, a local folder ('' = off). A restart or resume of the same "
    "program on the same devices skips compilation (85-124 s for the default model on an H100). The "
    "environment variable JAX_COMPILATION_CACHE_DIR, when set, wins.")
flags.mark_flags_as_required(["config", "workdir"])

_MULTI_ENV = ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "CLOUD_TPU_TASK_ID")


def _distributed_kwargs() -> dict | None:
    """jax.distributed.initialize arguments, or None for a single process."""
    env = os.environ
    num = _NUM_PROCESSES.value or int(env.get("NUM_PROCESSES", 0)) or None
    wanted = _MULTIPROCESS.value == "on" or (
        _MULTIPROCESS.value == "auto" and ((num or 0) > 1 or _COORDINATOR.value is not None or any(
            k in env and (k != "SLURM_NTASKS" or int(env[k]) > 1) for k in _MULTI_ENV)))
    if not wanted:
        return None
    pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env.get("PROCESS_ID")
    kwargs = {"coordinator_address": _COORDINATOR.value or env.get("COORDINATOR_ADDRESS"),
              "num_processes": num, "process_id": None if pid is None else int(pid)}
    # Unset values are left to JAX's cluster auto-detection (SLURM, TPU pods, Open MPI).
    return {k: v for k, v in kwargs.items() if v is not None}


def compilation_cache_dir(flag_value: str, environ=os.environ) -> str | None:
    """Where the persistent compilation cache goes: None when off or when JAX already reads
    JAX_COMPILATION_CACHE_DIR from the environment."""
    if environ.get("JAX_COMPILATION_CACHE_DIR") or not flag_value:
        return None
    return os.path.abspath(os.path.expanduser(flag_value))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_native_logs()
    cli.quiet_logging(flags.FLAGS.verbosity)
    config = _CONFIG.value
    from lcssl.files import refuse_remote

    for flag, value in (("--workdir", _WORKDIR.value),
                        ("--config.supervised.init_from", config.supervised.init_from),
                        ("--config.supervised.init_encoder_from", config.supervised.init_encoder_from),
                        ("--compilation_cache", _CACHE.value)):
        refuse_remote(value, flag)
    cli.require_dataset(config.data_dir, config.dataset)  # refuses a remote data_dir too
    # TensorFlow (tf.data only) must not grab GPU memory meant for JAX.
    try:
        import tensorflow as tf
        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass
    import jax

    cache = compilation_cache_dir(_CACHE.value)
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    kwargs = _distributed_kwargs()
    if kwargs is not None:
        jax.distributed.initialize(**kwargs)
    logging.info("JAX process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)

    from lcssl import train
    train.run(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(cli.user_errors(main), flags_parser=functools.partial(cli.parse_flags, moved=configs.moved_flag))
