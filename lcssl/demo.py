"""The whole method in a few minutes on a laptop CPU, on synthetic data:

    python -m lcssl.demo --workdir=demo

  1. `python -m data_prep synth` writes a small FLAIR #2-layout scene (aerial + Sentinel-2 + labels)
  2. `python -m data_prep build` turns it into TFRecord shards and a dataset card
  3. SimCLR pre-training with configs/ssl_flair2.py:tiny            -> DIR/ssl
  4. fine-tuning from it with configs/finetune_flair2.py:tiny       -> DIR/finetune
  5. scores of the best fine-tuned checkpoint on the test split (per-class IoU, mIoU, OA)

The numbers say the pipeline runs end to end, not how good the method is: the model is tiny and
the data synthetic. Rerunning resumes each stage from what is already in DIR.
"""
import pathlib
import subprocess
import sys

from absl import app, flags, logging

from lcssl import cli


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
    """The command's flags (defined when it runs: lcssl.main has a --workdir too)."""
    flags.DEFINE_string("workdir", "demo", "Where data, runs and results go.", flag_values=values)
    flags.DEFINE_integer("steps", 40, "Training steps of each stage.", flag_values=values)


ROOT = pathlib.Path(__file__).resolve().parents[1]
SYNTH = ["--layout=flair2", "--num-zones=4", "--patches-per-zone=8", "--patch-size=32",
         "--sits-size=16", "--num-dates=6", "--seed=0"]
BUILD = ["--layout=flair2", "--expect-size=32", "--sits-size=16", "--no-progress"]


def _data_prep(*args: str) -> None:
    print(f"$ python -m data_prep {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def main(argv):
    del argv
    cli.quiet_native_logs()  # before TensorFlow is imported, here and in data_prep's processes
    from lcssl.files import refuse_remote

    refuse_remote(flags.FLAGS.workdir, "--workdir")
    import jax

    workdir = pathlib.Path(flags.FLAGS.workdir).resolve()
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    sys.path.insert(0, str(ROOT))
    from configs import finetune_flair2, ssl_flair2
    from lcssl import evaluate, train

    raw, data = workdir / "data" / "flair2_raw", workdir / "data" / "flair2"
    if not (data / "dataset_card.json").exists():
        _data_prep("synth", f"--out={raw}", *SYNTH)
        _data_prep("build", f"--src={raw}", f"--out={data}", *BUILD)

    logging.set_verbosity(logging.WARNING)
    cli.quiet_logging(0)  # without the warnings that ask nothing of a user (Orbax's save waits)
    ssl = ssl_flair2.get_config("tiny")
    ssl.data_dir, ssl.num_steps = str(data), flags.FLAGS.steps
    print(f"SimCLR pre-training ({ssl.num_steps} steps) -> {workdir / 'ssl'}", flush=True)
    probe = train.run(ssl, str(workdir / "ssl"))["probe"]
    print(f"  online linear probe (majority class of a patch): accuracy {probe['accuracy']:.2f}, "
          f"always-the-commonest-class {probe['baseline_accuracy']:.2f} (fit on "
          f"{probe['num_train']} patches, scored on {probe['num_eval']}: too few to tell much)",
          flush=True)

    finetune = finetune_flair2.get_config("tiny")
    finetune.data_dir, finetune.num_steps = str(data), flags.FLAGS.steps
    finetune.supervised.init_from = str(workdir / "ssl")
    print(f"Fine-tuning ({finetune.num_steps} steps) -> {workdir / 'finetune'}", flush=True)
    results = train.run(finetune, str(workdir / "finetune"))
    print(evaluate.format_scores(results["test"], f"Test split, best checkpoint (step "
                                                  f"{results['best_step']}), percent:"))
    print(f"Full results: {workdir / 'finetune' / 'eval_results.json'}")


if __name__ == "__main__":
    define_flags()
    app.run(cli.user_errors(main))
