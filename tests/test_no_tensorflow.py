"""The GPU machine has no TensorFlow: the model, the losses and the tasks' step functions must
import without it (only data_prep, the input pipeline and clu's writers in train.run use it)."""
import subprocess
import sys

from tests._train_helpers import ROOT, cli_env

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
