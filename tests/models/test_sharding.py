"""The model under jax.jit with the batch sharded over 8 devices equals the single-device run.

Train mode, so batch norm uses batch statistics: these must be the global-batch statistics (GSPMD
reduces over the sharded batch axis), otherwise the outputs, gradients and running stats differ.
Both runs are in float64 (tests/numerics.py): sharding changes only the order of sums, which moves
float64 results by ~1e-15 of their scale on any CPU, far inside RTOL64 = 1e-9; per-device batch
statistics (1 sample per device) would differ at the scale of the values themselves.
"""
import jax
import pytest
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcssl import models
from tests import numerics

BATCH, DATES = 8, 3


@pytest.mark.slow
def test_sharded_forward_backward_equals_single_device(x64):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 virtual CPU devices"
    cfg = models.tiny_config()
    # No dropout: the rng-free step compiles in a fraction of the time on the shared 2-core CPU.
    cfg.ltae_dropout = cfg.attn_dropout = cfg.fusion_dropout = 0.0
    cfg.dtype = "float64"
    model = models.build_model(cfg)
    variables = numerics.as_float64(jax.jit(lambda: model.init(
        jax.random.key(0, impl="rbg"), *models.dummy_inputs(cfg), train=False))())
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(BATCH, cfg.aerial_size, cfg.aerial_size, cfg.aerial_bands)),
             rng.normal(size=(BATCH, DATES, cfg.sits_size, cfg.sits_size, cfg.sits_bands)),
             rng.integers(1, 366, size=(BATCH, DATES)).astype(np.int32),
             rng.random((BATCH, DATES)) < 0.8)
    batch[3][:, 0] = True

    def step(variables, aerial, sits, dates, valid):
        def loss_fn(params):
            out, updates = model.apply({**variables, "params": params}, aerial, sits, dates, valid,
                                       train=True, mutable=["batch_stats"])
            loss = jnp.mean(out["logits"] ** 2) + jnp.mean(out["aux_logits"] ** 2)
            return loss, (out, updates)
        (loss, (out, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"])
        return loss, out, updates, grads

    single = jax.jit(step)(variables, *batch)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded_batch = [jax.device_put(x, by_batch) for x in batch]
    sharded = jax.jit(step)(jax.device_put(variables, replicated), *sharded_batch)
    assert sharded[1]["logits"].sharding.spec[0] == "data"
    for part, got, want in zip(("loss", "outputs", "batch stats", "gradients"), sharded, single):
        numerics.assert_trees_close(got, want, f"sharded vs single device, {part}: ")
