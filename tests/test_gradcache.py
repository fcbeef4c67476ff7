"""GradCache equals the full-batch gradient; exact accumulation of weighted-mean losses.

Only the summation order differs: compared in float64, to 1e-9 of each array's scale
(tests/numerics.py).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lcssl import gradcache, losses, sharding
from lcssl.data.schema import IGNORE_LABEL
from tests import numerics

RTOL, ATOL = 1e-5, 1e-6  # float32 against float64 references
BATCH, HALF = 64, 32  # 32 pairs: rows [0, 32) are view 1, rows [32, 64) view 2


class Encoder(nn.Module):
    """Per-sample MLP: no batch norm, so chunking must not change anything."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(8)(jnp.tanh(nn.Dense(16)(x)))


ENCODER = Encoder()


def embed_fn(params, x):
    z = ENCODER.apply(params, x)
    return z, {"z_mean": jnp.mean(z)}


def loss_fn(z):
    return losses.nt_xent(z[:HALF], z[HALF:], 0.2), {"z_norm": jnp.mean(jnp.linalg.norm(z, axis=-1))}


def full_batch(params, x):
    def total(p):
        z, aux = embed_fn(p, x)
        loss, metrics = loss_fn(z)
        return loss, (metrics, aux)

    (loss, (metrics, aux)), grads = jax.value_and_grad(total, has_aux=True)(params)
    return (loss, metrics, aux), grads


def setup():
    """Float64 params and inputs (the tests run in x64 mode)."""
    x = np.random.default_rng(0).normal(size=(BATCH, 5))
    return numerics.as_float64(ENCODER.init(jax.random.key(1), x)), x


def test_gradcache_equals_full_batch_on_one_device(x64):
    params, x = setup()
    want = jax.jit(full_batch)(params, x)
    for num_chunks in (1, 8):
        got = jax.jit(functools.partial(gradcache.grad_cached_value_and_grad, embed_fn,
                                        loss_fn=loss_fn, num_chunks=num_chunks))(params, x)
        numerics.assert_trees_close(got, want, f"{num_chunks} chunks: ")


def test_gradcache_on_8_devices_equals_one_device(x64):
    params, x = setup()
    want = jax.jit(full_batch)(params, x)
    mesh = sharding.make_mesh()
    x_sharded = jax.device_put(x, sharding.data_sharding(mesh))
    params_replicated = jax.device_put(params, sharding.replicated(mesh))
    step = jax.jit(functools.partial(gradcache.grad_cached_value_and_grad, embed_fn, loss_fn=loss_fn,
                                     num_chunks=4, mesh=mesh))
    got = step(params_replicated, x_sharded)
    numerics.assert_trees_close(got, want, "8 devices, 4 chunks: ")


def test_chunks_take_a_slice_of_every_shard():
    mesh = sharding.make_mesh()
    x = jax.device_put(np.arange(BATCH, dtype=np.int32), sharding.data_sharding(mesh))
    chunks = jax.jit(lambda v: gradcache.split_chunks(v, 4, mesh))(x)
    assert chunks.shape == (4, 16)
    assert chunks.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 2)
    # Device d holds rows [8d, 8d + 8); chunk c takes rows 8d + 2c, 8d + 2c + 1 from each device.
    expected = np.stack([np.concatenate([np.arange(8 * d + 2 * c, 8 * d + 2 * c + 2) for d in range(8)])
                         for c in range(4)])
    np.testing.assert_array_equal(np.asarray(chunks), expected)
    for shard in chunks.addressable_shards:
        d = shard.index[1].start // 2
        assert set(np.asarray(shard.data).ravel()) <= set(range(8 * d, 8 * d + 8))
    merged = jax.jit(lambda v: gradcache.merge_chunks(v, mesh))(chunks)
    np.testing.assert_array_equal(np.asarray(merged), np.arange(BATCH))
    with pytest.raises(ValueError, match=r"batch \(64\).*8 x 3 = 24"):
        gradcache.split_chunks(np.zeros((BATCH, 2)), 3, mesh)


class BNEncoder(nn.Module):
    """Dense -> batch norm -> Dense: each sample's embedding depends on the batch's statistics."""

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=False, momentum=0.0)(nn.Dense(16)(x))
        return nn.Dense(8)(jnp.tanh(h))


def test_gradcache_with_batch_norm_is_the_exact_gradient_of_per_chunk_statistics():
    """With batch norm, GradCache returns the gradient of the chunked objective (each chunk
    normalized by its own statistics), exactly; the full-batch gradient is another one. Running
    averages: the chunks' mean of means is the batch mean, their mean of variances is below the
    batch variance (by the variance of the chunk means)."""
    model = BNEncoder()
    x = np.random.default_rng(5).normal(size=(BATCH, 5)).astype(np.float32)
    variables = model.init(jax.random.key(3), x)
    num_chunks = 4

    def embed(params, chunk):
        z, mutated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, chunk,
                                 mutable=["batch_stats"])
        return z, mutated["batch_stats"]

    def chunked_objective(params):  # plain autodiff through per-chunk batch norm
        z, _ = jax.lax.map(lambda c: embed(params, c), x.reshape(num_chunks, -1, 5))
        return loss_fn(z.reshape(BATCH, -1))[0]

    (loss, _, stats), grads = jax.jit(functools.partial(
        gradcache.grad_cached_value_and_grad, embed, loss_fn=loss_fn,
        num_chunks=num_chunks))(variables["params"], x)
    want_loss, want_grads = jax.jit(jax.value_and_grad(chunked_objective))(variables["params"])
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
                 grads, want_grads)

    full_loss, full_grads = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(embed(p, x)[0])[0]))(variables["params"])
    full, cached = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)])
                    for t in (full_grads, grads))
    assert abs(float(loss) - float(full_loss)) > 1e-3  # not the full-batch objective
    assert np.linalg.norm(cached - full) > 0.05 * np.linalg.norm(full)

    # momentum 0: the running averages are the step's statistics; float64 reference.
    params = variables["params"]
    h = np.asarray(x, np.float64) @ np.asarray(params["Dense_0"]["kernel"], np.float64) \
        + np.asarray(params["Dense_0"]["bias"], np.float64)
    chunks = h.reshape(num_chunks, -1, h.shape[-1])
    bn = stats["BatchNorm_0"]
    np.testing.assert_allclose(bn["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn["var"], chunks.var(1).mean(0), rtol=1e-4, atol=1e-6)
    assert np.all(bn["var"] < h.var(0))


# -- accumulate_gradients ------------------------------------------------------------------------

K = 4
CLASS_WEIGHTS = np.array([0.5, 1.0, 2.0, 3.0], np.float32)


class PixelHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(K)(x)


HEAD = PixelHead()


def ce_loss(params, batch):
    logits = HEAD.apply(params, batch["features"])
    loss, weight = losses.weighted_cross_entropy(logits, batch["label"], CLASS_WEIGHTS)
    return loss, (weight, {"logit_mean": jnp.mean(logits)})


def pixel_batch(all_ignored_rows=()):
    rng = np.random.default_rng(4)
    features = rng.normal(size=(16, 3, 3, 6))  # float64 in x64 mode, else float32
    label = rng.integers(0, K, size=(16, 3, 3)).astype(np.int32)
    label[:4][rng.random((4, 3, 3)) < 0.8] = IGNORE_LABEL  # first microbatch mostly unlabelled
    label[list(all_ignored_rows)] = IGNORE_LABEL
    return {"features": features, "label": label}


def test_accumulate_gradients_equals_full_batch_weighted_ce(x64):
    batch = pixel_batch()
    params = numerics.as_float64(HEAD.init(jax.random.key(2), batch["features"]))
    loss_and_grad = jax.value_and_grad(ce_loss, has_aux=True)
    (want_loss, (want_weight, want_aux)), want_grads = loss_and_grad(params, batch)
    accumulate = jax.jit(functools.partial(gradcache.accumulate_gradients, loss_and_grad, num_microbatches=4))
    (loss, weight, aux), grads = accumulate(params, batch)
    numerics.assert_trees_close((loss, weight, aux, grads), (want_loss, want_weight, want_aux, want_grads),
                                "4 micro-batches: ")

    # The plain mean of microbatch losses is not the full-batch loss here (unequal pixel weights).
    per_micro = [ce_loss(params, jax.tree.map(lambda v: v[i * 4:(i + 1) * 4], batch))[0] for i in range(4)]
    assert abs(float(np.mean(per_micro)) - float(want_loss)) > 1e-3

    mesh = sharding.make_mesh()
    sharded = jax.device_put(batch, sharding.data_sharding(mesh))
    on_mesh = jax.jit(functools.partial(gradcache.accumulate_gradients, loss_and_grad,
                                        num_microbatches=2, mesh=mesh))
    (loss8, _, _), grads8 = on_mesh(jax.device_put(params, sharding.replicated(mesh)), sharded)
    numerics.assert_trees_close((loss8, grads8), (want_loss, want_grads), "8 devices, 2 micro-batches: ")


def test_accumulate_gradients_with_no_labelled_pixel_is_zero_not_nan():
    batch = pixel_batch(all_ignored_rows=range(16))
    params = HEAD.init(jax.random.key(2), batch["features"])
    loss_and_grad = jax.value_and_grad(ce_loss, has_aux=True)
    (loss, weight, _), grads = gradcache.accumulate_gradients(loss_and_grad, params, batch, 4)
    assert float(loss) == 0.0 and float(weight) == 0.0
    assert all(bool(jnp.all(g == 0.0)) for g in jax.tree.leaves(grads))
