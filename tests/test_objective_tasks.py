"""The cross-modal, VICReg and dense pre-training tasks with the real tiny U-T&T on 8 virtual CPU
devices: each one's loss falls over a few steps on a fixed batch, each logs its health, and
fine-tuning from each one's checkpoint loads exactly the subtrees the task declares.

Compile time dominates on 2 cores: one fixed-batch run per task uses the tiny SSL config unchanged,
so that the `train.run` that follows hits the persistent compilation cache; fine-tuning is checked
by its warm start and one step in-process (the whole fine-tuning command runs in tests/test_e2e.py).
"""
import jax
import numpy as np
import pytest

from lcssl import checkpoint as ckpt_lib
from lcssl import models, sharding, train
from lcssl.data import pipeline
from tests._train_helpers import build_task, compilation_cache, saved_state, tiny_config, tiny_dataset
from tests.test_train import random_host_batch

OBJECTIVES = ("crossmodal", "vicreg", "dense")
HEALTH = {"crossmodal": ("pos_accuracy", "aerial_embedding_std", "sits_embedding_std", "cross_loss"),
          "vicreg": ("invariance", "variance", "covariance", "embedding_std", "raw_std"),
          "dense": ("pos_accuracy", "pos_cosine", "valid_fraction", "embedding_std", "dense_loss",
                    "global_loss")}
TRANSFER = {"crossmodal": ["aerial_encoder", "utae"],
            "vicreg": list(models.ENCODER_KEYS),
            "dense": list(models.ENCODER_KEYS) + ["aerial_decoder"]}
STEPS = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    compilation_cache(tmp_path_factory)
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module", params=OBJECTIVES)
def objective_run(request, data_dir, tmp_path_factory):
    """Per task: the losses of STEPS updates on one fixed batch, then a tiny pre-training run."""
    name = request.param
    card = pipeline.load_card(data_dir)
    mesh = sharding.make_mesh()
    config = tiny_config("ssl_flair2", data_dir, task=name)
    task, _ = build_task(config, card, mesh)
    state = sharding.init_sharded(task.init, mesh, jax.random.key(0, impl=train.RNG_IMPL))
    step = train.jit_train_step(task, state, mesh)
    batch = sharding.host_batch_to_global(random_host_batch(card, 16, with_label=False), mesh)
    history = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.compute().items()})
    workdir = tmp_path_factory.mktemp(f"{name}_run")
    results = train.run(config, str(workdir))
    return name, history, workdir, results


def test_loss_falls_and_health_is_logged(objective_run):
    name, history, _, _ = objective_run
    losses = np.array([h["loss"] for h in history])
    assert np.all(np.isfinite(losses)), losses
    # Fresh augmentations every step make each loss noisy; its trend over 8 steps is not.
    assert losses[-3:].mean() < losses[:3].mean(), losses
    for key in HEALTH[name]:
        assert all(np.isfinite(h[key]) for h in history), key


def test_run_checkpoints_declare_the_transfer_and_probe(objective_run):
    name, _, workdir, results = objective_run
    assert results["step"] == 6
    assert ckpt_lib.read_input_spec(str(workdir))["transfer"] == {"prefix": "backbone",
                                                                  "keys": TRANSFER[name]}
    assert 0 <= results["probe"]["accuracy"] <= 1


def test_finetuning_loads_exactly_the_declared_subtrees(objective_run, data_dir):
    name, _, workdir, _ = objective_run
    card = pipeline.load_card(data_dir)
    mesh = sharding.make_mesh()
    config = tiny_config("finetune_flair2", data_dir, init_from=str(workdir), finetune_mode="linear")
    task, _ = build_task(config, card, mesh)
    state = sharding.init_sharded(task.init, mesh, jax.random.key(0, impl=train.RNG_IMPL))
    state, report = task.warm_start(state)  # what train.run does on a fresh fine-tuning workdir
    batch = sharding.host_batch_to_global(random_host_batch(card, 16, with_label=True), mesh)
    state, _ = train.jit_train_step(task, state, mesh)(state, batch)
    tuned, pretrained = jax.tree.map(np.asarray, state.params), saved_state(workdir)
    # The linear mode freezes the loaded subtrees: after a step they still hold the checkpoint's
    # parameters, exactly; every other subtree is new.
    for key in TRANSFER[name]:
        loaded = jax.tree.leaves(tuned[key])
        expected = jax.tree.leaves(pretrained["params"]["backbone"][key])
        assert len(loaded) == len(expected) > 0
        for x, y in zip(loaded, expected):
            np.testing.assert_array_equal(x, y)
    assert sorted(report["new"]) == sorted(set(tuned) - set(TRANSFER[name]))
    loaded_keys = {p.split("]")[1].strip("['") for p in report["loaded"]}
    assert loaded_keys == set(TRANSFER[name])
