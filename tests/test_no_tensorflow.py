"""The GPU machine has no TensorFlow: the model, the losses and the tasks' step functions import
without it, and a built dataset pre-trains, fine-tunes, evaluates and predicts without it (the native
reader, lcssl/writers.py's event files); only data_prep needs it."""
import json
import subprocess
import sys

import pytest

from lcssl import report
from tests._train_helpers import ROOT, cli_env, compilation_cache, tiny_dataset

PROGRAM = """
import sys
sys.modules['tensorflow'] = None  # any `import tensorflow` now raises ImportError
import jax.numpy as jnp
from lcssl import evaluate, gradcache, losses, metrics, models, sharding, tasks, train
from lcssl.tasks import byol, pretraining, simclr, supervised
from lcssl.data import augment, normalize, pipeline, sits
assert callable(pretraining.train_step) and callable(supervised.train_step)
assert callable(simclr.build) and callable(byol.build)
print(float(losses.nt_xent(jnp.eye(4), jnp.eye(4), 0.1)))
print('ok without tensorflow')
"""


def test_models_losses_and_train_steps_import_without_tensorflow():
    proc = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=cli_env(devices=1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok without tensorflow" in proc.stdout


# Runs a module as `python -m MODULE ARGS` with TensorFlow (and tensorflow_datasets) unimportable,
# then says whether any TensorFlow module was loaded after all.
HIDDEN = """
import atexit, runpy, sys
for name in ('tensorflow', 'tensorflow_datasets'):
    sys.modules[name] = None  # any `import tensorflow...` now raises ImportError
atexit.register(lambda: print('tensorflow modules loaded:',
                              sorted(m for m, v in sys.modules.items() if m.startswith('tensorflow') and v)))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def run_without_tensorflow(module, args, env):
    proc = subprocess.run([sys.executable, "-c", HIDDEN, module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "tensorflow modules loaded: []" in proc.stdout, proc.stdout[-2000:]
    return proc


@pytest.mark.slow
def test_pretrain_finetune_evaluate_and_predict_without_tensorflow(tmp_path_factory, tmp_path):
    env = cli_env(compilation_cache(tmp_path_factory))
    data_dir = tiny_dataset(tmp_path_factory)  # built where TensorFlow is (data_prep writes with it)
    ssl_dir, ft_dir = tmp_path / "ssl", tmp_path / "finetune"

    ssl = run_without_tensorflow("lcssl.main", ["--config=configs/ssl_flair2.py:tiny", f"--workdir={ssl_dir}",
                                                f"--config.data_dir={data_dir}"], env)
    assert "TensorFlow is not installed: reading the shards with the native reader" in ssl.stderr
    assert (ssl_dir / "checkpoints" / "6").is_dir()
    # The event files are written without TensorFlow and read back by the report.
    scalars = report.read_scalars(str(ssl_dir))
    assert [s for s, _ in scalars["train/loss"]] == [2, 3, 4, 6]  # every 2 steps and at checkpoints
    assert "probe/accuracy" in scalars and "steps_per_sec" in scalars

    finetune = ["--config=configs/finetune_flair2.py:tiny", f"--workdir={ft_dir}",
                f"--config.data_dir={data_dir}", f"--config.supervised.init_from={ssl_dir}", "--config.input=native"]
    run_without_tensorflow("lcssl.main", finetune, env)
    results = json.loads((ft_dir / "eval_results.json").read_text())
    assert len(results["test"]["iou"]) == 13 and 0.0 <= results["test"]["miou"] <= 1.0
    assert sum(map(sum, results["test"]["confusion_matrix"])) == results["test"]["num_pixels"] > 0
    again = run_without_tensorflow("lcssl.main", finetune, env)  # resumes, same scores
    assert "Resumed from" in again.stderr
    assert json.loads((ft_dir / "eval_results.json").read_text())["test"] == results["test"]

    maps = tmp_path / "maps"
    run_without_tensorflow("lcssl.predict", [f"--checkpoint={ft_dir}", f"--records={data_dir}", "--split=test",
                                             f"--out={maps}", "--no-progress"], env)
    summary = json.loads((maps / "summary.json").read_text())
    assert summary["scores"]["confusion_matrix"] == results["test"]["confusion_matrix"]
