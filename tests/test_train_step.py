"""The supervised train step's loss: weighted cross-entropy of the segmentation logits plus
aux_loss_weight x that of the time-series branch (lcssl.tasks.supervised.train_step)."""
import functools

import jax
import pytest
import jax.numpy as jnp
import numpy as np
import optax

from lcssl import models
from lcssl.tasks import base, supervised
from lcssl.data import augment, normalize


@pytest.mark.slow
def test_aux_loss_enters_the_loss_with_its_weight():
    cfg = models.tiny_config()
    cfg.ltae_dropout = cfg.attn_dropout = cfg.fusion_dropout = 0.0
    model = models.build_model(cfg)
    b, t = 2, 3
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0, impl="rbg"), *models.dummy_inputs(cfg, b, t))
    rng = np.random.default_rng(0)
    batch = {"aerial": rng.integers(0, 255, (b, 32, 32, cfg.aerial_bands), dtype=np.uint8),
             "sits": rng.normal(1000, 300, (b, t, 8, 8, cfg.sits_bands)).astype(np.float32),
             "dates": np.array([[10, 100, 200]] * b, np.int32), "sits_valid": np.ones((b, t), bool),
             "label": rng.integers(0, cfg.num_classes, (b, 32, 32)).astype(np.int32)}
    stats = normalize.NormStats(
        aerial_mean=np.full(cfg.aerial_bands, 120, np.float32),
        aerial_std=np.full(cfg.aerial_bands, 50, np.float32),
        sits_mean=np.full(cfg.sits_bands, 1000, np.float32),
        sits_std=np.full(cfg.sits_bands, 300, np.float32))
    augment_cfg = augment.default_config()
    augment_cfg.flip = augment_cfg.rot90 = False
    tx = optax.sgd(0.0)
    state = base.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                            batch_stats=variables["batch_stats"],
                            opt_state=tx.init(variables["params"]),
                            rng=jax.random.key_data(jax.random.key(0, impl=base.RNG_IMPL)))

    @jax.jit
    def losses(weight):  # the weight traced: one program for both values
        _, out = supervised.train_step(
            state, batch, model=model, tx=tx, stats=stats, augment_cfg=augment_cfg,
            class_weights=None, aux_loss_weight=weight, grad_accum_steps=1, lr=lambda s: 0.0)
        return out.compute()

    without, weighted = losses(jnp.float32(0.0)), losses(jnp.float32(0.7))
    assert without["aux_ce"] > 0.1  # 13 classes at random init: about log 13
    np.testing.assert_allclose(without["loss"], without["ce"], rtol=1e-6)
    np.testing.assert_allclose(weighted["loss"], weighted["ce"] + 0.7 * weighted["aux_ce"], rtol=1e-6)
    np.testing.assert_allclose(weighted["ce"], without["ce"], rtol=1e-6)
