"""The cross-modal, VICReg, dense, BYOL and masked-date pre-training tasks with the real tiny U-T&T
on 8 virtual CPU devices: each one's loss falls over a few steps on a fixed batch, each logs its
health, and fine-tuning from each one's checkpoint loads exactly the subtrees the task declares.

Compile time dominates on 2 cores: one fixed-batch run per task uses the tiny SSL config unchanged,
so that the `train.run` that follows hits the persistent compilation cache.
"""
import json

import jax
import numpy as np
import pytest

from lcssl import checkpoint as ckpt_lib
from lcssl import models, sharding, train
from lcssl.data import pipeline
from tests._train_helpers import build_task, compilation_cache, saved_state, tiny_config, tiny_dataset
from tests.numerics import F32_EPS
from tests.test_train import Interrupted, random_host_batch, tamper_with_batches

OBJECTIVES = ("crossmodal", "vicreg", "dense", "byol", "masked_dates")
HEALTH = {"crossmodal": ("pos_accuracy", "aerial_embedding_std", "sits_embedding_std", "cross_loss"),
          "vicreg": ("invariance", "variance", "covariance", "embedding_std", "raw_std"),
          "dense": ("pos_accuracy", "pos_cosine", "valid_fraction", "embedding_std", "dense_loss",
                    "global_loss"),
          "byol": ("pos_cosine", "embedding_std", "target_momentum"),
          "masked_dates": ("mean_baseline_mse", "nearest_baseline_mse", "relative_mse", "hidden_dates")}
TRANSFER = {"crossmodal": ["aerial_encoder", "utae"],
            "vicreg": list(models.ENCODER_KEYS),
            "dense": list(models.ENCODER_KEYS) + ["aerial_decoder"],
            "byol": list(models.ENCODER_KEYS),
            "masked_dates": ["utae"]}
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


@pytest.fixture(scope="module")
def byol_step(data_dir):
    """BYOL's task, its fresh state on 8 devices and the state after one step."""
    card = pipeline.load_card(data_dir)
    mesh = sharding.make_mesh()
    task, ctx = build_task(tiny_config("ssl_flair2", data_dir, task="byol"), card, mesh)
    state = sharding.init_sharded(task.init, mesh, jax.random.key(0, impl=train.RNG_IMPL))
    fresh = jax.tree.map(np.asarray, state)
    batch = sharding.host_batch_to_global(random_host_batch(card, 16, with_label=False), mesh)
    new_state, _ = train.jit_train_step(task, state, mesh)(state, batch)
    return task, ctx, fresh, new_state


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


def test_finetuning_loads_exactly_the_declared_subtrees(objective_run, data_dir, tmp_path):
    name, _, workdir, _ = objective_run
    config = tiny_config("finetune_flair2", data_dir, num_steps=1, **{
        "supervised.init_from": str(workdir), "supervised.finetune_mode": "linear"})
    ft_dir = tmp_path / "ft"
    train.run(config, str(ft_dir))
    report = json.loads((ft_dir / "loaded_weights.json").read_text())
    pretrained, tuned = saved_state(workdir), saved_state(ft_dir)
    # The linear mode freezes the loaded subtrees: after a step they still hold the checkpoint's
    # parameters, exactly; every other subtree is new.
    for key in TRANSFER[name]:
        loaded = jax.tree.leaves(tuned["params"][key])
        expected = jax.tree.leaves(pretrained["params"]["backbone"][key])
        assert len(loaded) == len(expected) > 0
        for x, y in zip(loaded, expected):
            np.testing.assert_array_equal(x, y)
    assert sorted(report["new"]) == sorted(set(tuned["params"]) - set(TRANSFER[name]))
    loaded_keys = {p.split("]")[1].strip("['") for p in report["loaded"]}
    assert loaded_keys == set(TRANSFER[name])


def test_byol_target_starts_as_the_online_network_and_follows_it_by_the_ema(byol_step):
    from lcssl.tasks import byol

    task, ctx, fresh, new_state = byol_step
    target0 = fresh.task_state["target"]
    assert sorted(target0) == sorted(set(fresh.params) - {"predictor"}) == ["backbone", "projector"]
    for t, o in zip(jax.tree.leaves(target0), jax.tree.leaves(byol.target_params(fresh.params))):
        np.testing.assert_array_equal(t, o)
    # The task state is laid out on the mesh like the parameters.
    leaf = jax.tree.leaves(new_state.task_state)[0]
    assert len(leaf.sharding.device_set) == 8
    # After one update: target = target0 + (1 - tau(0)) (online_1 - target0), tau(0) = 0.996,
    # in float64; the float32 result differs by rounding of values of the weights' magnitude.
    tau = ctx.config.byol.base_momentum
    online = byol.target_params(jax.tree.map(np.asarray, new_state.params))
    moved = 0.0
    for t0, t1, o in zip(jax.tree.leaves(target0), jax.tree.leaves(new_state.task_state["target"]),
                         jax.tree.leaves(online)):
        t0, o = np.asarray(t0, np.float64), np.asarray(o, np.float64)
        want = t0 + (1 - tau) * (o - t0)
        np.testing.assert_allclose(np.asarray(t1), want, rtol=0, atol=4 * F32_EPS * max(1.0, np.abs(t0).max()))
        moved = max(moved, np.abs(o - t0).max())
    assert moved > 1e-4  # the online network did move, so the test can tell the EMA apart


@pytest.mark.parametrize("objective_run", ["byol"], indirect=True)
def test_byol_resumes_to_exactly_the_same_weights_and_target(objective_run, data_dir, tmp_path,
                                                              monkeypatch):
    _, _, workdir, _ = objective_run

    def crash(batch):
        raise Interrupted

    tamper_with_batches(monkeypatch, at_step=4, action=crash)  # dies after the step-3 checkpoint
    config = tiny_config("ssl_flair2", data_dir, task="byol")
    with pytest.raises(Interrupted):
        train.run(config, str(tmp_path))
    monkeypatch.undo()
    train.run(config, str(tmp_path))
    a, b = saved_state(workdir), saved_state(tmp_path)
    assert int(a["step"]) == int(b["step"]) == 6
    assert sorted(a["task_state"]["target"]) == ["backbone", "projector"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
