"""NT-Xent (naive, blockwise, sharded), contrastive diagnostics and weighted cross-entropy.

Tolerances: float32 against float64 numpy, rtol 1e-5; blockwise vs naive and 1 vs k devices differ
only by summation order: compared in float64, to 1e-9 of each array's scale (tests/numerics.py).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl import losses, sharding
from lcssl.data.schema import IGNORE_LABEL
from tests import numerics

RTOL, ATOL = 1e-5, 1e-6
contrastive_metrics = jax.jit(losses.contrastive_metrics, static_argnames="block_size")


def numpy_nt_xent(z1, z2, temperature, zones=None):
    """Float64 reference written from the SimCLR paper's definition, one anchor at a time; with
    zones [N], the denominator keeps only the rows of the anchor's zone (DARLING)."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    zone = np.zeros(n2, int) if zones is None else np.concatenate([zones, zones])
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        # 2N - 1 denominator terms; with zones, the positive and the anchor's zone's negatives
        others = [k for k in range(n2) if k != i and zone[k] == zone[i]]
        sims = np.array([z[i] @ z[k] for k in others]) / temperature
        total += -(z[i] @ z[pos] / temperature) + np.log(np.sum(np.exp(sims)))
    return total / n2


def random_views(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def test_nt_xent_matches_float64_reference():
    z1, z2 = random_views(6, 5)
    for temperature in (0.1, 0.5):
        expected = numpy_nt_xent(z1, z2, temperature)
        np.testing.assert_allclose(losses.nt_xent(z1, z2, temperature), expected, rtol=RTOL)
        np.testing.assert_allclose(losses.nt_xent_blockwise(z1, z2, temperature, 4), expected, rtol=RTOL)


def test_nt_xent_identical_views_orthogonal_others_has_closed_form():
    # Each anchor: positive cosine 1, the 2N - 2 negatives cosine 0, so
    # loss = -log(e^{1/T} / (e^{1/T} + (2N - 2))) = log(1 + (2N - 2) e^{-1/T}).
    n, temperature = 3, 0.5
    z = np.eye(n, 4, dtype=np.float32) * np.array([[1.0], [2.0], [0.5]], np.float32)  # norms irrelevant
    expected = np.log(1 + (2 * n - 2) * np.exp(-1 / temperature))
    np.testing.assert_allclose(losses.nt_xent(z, z, temperature), expected, rtol=RTOL)
    np.testing.assert_allclose(losses.nt_xent_blockwise(z, z, temperature, 2), expected, rtol=RTOL)


@pytest.mark.parametrize("n,block_size", [(5, 4), (8, 16), (12, 8)])  # 2N = 10 is not a multiple of 4
def test_blockwise_equals_naive_value_and_gradients(x64, n, block_size):
    z1, z2 = numerics.as_float64(random_views(n, 7, seed=n))

    @jax.jit
    def both(a, b):
        naive = jax.value_and_grad(lambda u, v: losses.nt_xent(u, v, 0.1), argnums=(0, 1))(a, b)
        blockwise = jax.value_and_grad(
            lambda u, v: losses.nt_xent_blockwise(u, v, 0.1, block_size), argnums=(0, 1))(a, b)
        return naive, blockwise

    naive, blockwise = both(z1, z2)
    numerics.assert_trees_close(blockwise, naive, "blockwise vs naive: ")


def test_blockwise_rejects_nonpositive_block():
    z1, z2 = random_views(4, 3)
    with pytest.raises(ValueError, match="block_size"):
        losses.nt_xent_blockwise(z1, z2, 0.1, 0)


def test_bf16_embeddings_give_finite_float32_loss_at_low_temperature():
    z1, z2 = random_views(32, 16)
    # Nearly collapsed embeddings push every logit towards 1/T = 20: exp overflows bf16 arithmetic.
    z1 = (z1 * 0.01 + 3.0).astype(jnp.bfloat16)
    z2 = (z2 * 0.01 + 3.0).astype(jnp.bfloat16)
    expected = numpy_nt_xent(np.asarray(z1, np.float32), np.asarray(z2, np.float32), 0.05)
    for fn in (losses.nt_xent, lambda a, b, t: losses.nt_xent_blockwise(a, b, t, 16)):
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)), static_argnums=2)(z1, z2, 0.05)
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, expected, rtol=1e-4)
        assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)


def test_contrastive_metrics_detect_alignment_and_collapse():
    z = np.eye(4, 8, dtype=np.float32)
    aligned = contrastive_metrics(z, z, 0.1, block_size=3)
    np.testing.assert_allclose(aligned["pos_accuracy"], 1.0)
    np.testing.assert_allclose(aligned["pos_cosine"], 1.0, rtol=RTOL)
    np.testing.assert_allclose(aligned["neg_cosine"], 0.0, atol=ATOL)

    collapsed = np.ones((4, 8), np.float32)
    bad = contrastive_metrics(collapsed, collapsed, 0.1)
    np.testing.assert_allclose(bad["pos_accuracy"], 0.0)  # positive only ties the negatives
    np.testing.assert_allclose(bad["embedding_std"], 0.0, atol=ATOL)

    d = 64
    z1, z2 = random_views(512, d)
    spread = contrastive_metrics(z1, z2, 0.1, block_size=256)
    np.testing.assert_allclose(spread["embedding_std"], 1 / np.sqrt(d), rtol=0.05)
    # A random positive wins against 1022 random negatives about 1 time in 1023.
    assert float(spread["pos_accuracy"]) < 0.02
    zn = np.concatenate([z1, z2]) / np.linalg.norm(np.concatenate([z1, z2]), axis=1, keepdims=True)
    sims = zn @ zn.T
    neg_mask = ~np.eye(1024, dtype=bool) & ~np.roll(np.eye(1024, dtype=bool), 512, axis=1)
    np.testing.assert_allclose(spread["neg_cosine"], sims[neg_mask].mean(), atol=1e-5)


# -- same-zone negatives (DARLING) ----------------------------------------------------------------

ZONES = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 0, 3], np.int32)  # zone 3: an anchor with no negative


def numpy_pos_accuracy(z1, z2, zones):
    """Share of the 2N anchors whose positive beats every same-zone negative, from the definition."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2, zone = len(z), np.concatenate([zones, zones])
    wins = []
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        negatives = [z[i] @ z[k] for k in range(n2) if k not in (i, pos) and zone[k] == zone[i]]
        wins.append(all(z[i] @ z[pos] > s for s in negatives))
    return np.mean(wins)


def test_same_zone_nt_xent_matches_float64_reference():
    z1, z2 = random_views(12, 3, seed=5)
    expected = numpy_nt_xent(z1, z2, 0.2, ZONES)
    np.testing.assert_allclose(losses.nt_xent(z1, z2, 0.2, zones=ZONES), expected, rtol=RTOL)
    np.testing.assert_allclose(losses.nt_xent_blockwise(z1, z2, 0.2, 5, zones=ZONES), expected, rtol=RTOL)
    # Fewer negatives than the whole batch: a different loss.
    assert abs(expected - numpy_nt_xent(z1, z2, 0.2)) > 0.1
    metrics = contrastive_metrics(z1, z2, 0.2, block_size=5, zones=ZONES)
    np.testing.assert_allclose(metrics["pos_accuracy"], numpy_pos_accuracy(z1, z2, ZONES))
    assert float(metrics["pos_accuracy"]) > float(contrastive_metrics(z1, z2, 0.2)["pos_accuracy"])


def test_one_zone_is_the_plain_nt_xent():
    z1, z2 = random_views(12, 3, seed=6)
    one_zone = np.full(12, 7, np.int32)
    for fn in (losses.nt_xent, lambda a, b, t, **kw: losses.nt_xent_blockwise(a, b, t, 5, **kw)):
        np.testing.assert_allclose(fn(z1, z2, 0.2, zones=one_zone), fn(z1, z2, 0.2), rtol=1e-7)
    for k, v in contrastive_metrics(z1, z2, 0.2, block_size=5, zones=one_zone).items():
        np.testing.assert_allclose(v, contrastive_metrics(z1, z2, 0.2, block_size=5)[k], rtol=1e-7, err_msg=k)


def test_same_zone_blockwise_equals_naive_value_and_gradients(x64):
    z1, z2 = numerics.as_float64(random_views(12, 7, seed=7))
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(z1, z2)  # noqa: E731
    naive = grad(lambda u, v: losses.nt_xent(u, v, 0.1, zones=ZONES))
    np.testing.assert_allclose(naive[0], numpy_nt_xent(z1, z2, 0.1, ZONES), rtol=1e-12)
    blockwise = grad(lambda u, v: losses.nt_xent_blockwise(u, v, 0.1, 5, zones=ZONES))
    numerics.assert_trees_close(blockwise, naive, "blockwise vs naive: ")


def test_zones_must_be_one_per_pair():
    z1, z2 = random_views(4, 3)
    with pytest.raises(ValueError, match=r"zones must be \[N\] = \(4,\)"):
        losses.nt_xent(z1, z2, 0.1, zones=np.zeros(8, np.int32))


class TinyEncoder(nn.Module):
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, param_dtype=self.param_dtype)(x)


def test_loss_and_gradients_identical_on_1_2_4_8_devices(x64):
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(16, 5)), rng.normal(size=(16, 5))  # float64
    encoder = TinyEncoder(param_dtype=jnp.float64)
    params = encoder.init(jax.random.key(0), x1)

    def param_loss(p, a, b):
        return losses.nt_xent(encoder.apply(p, a), encoder.apply(p, b), 0.2)

    def param_loss_blockwise(p, a, b, mesh=None):
        return losses.nt_xent_blockwise(encoder.apply(p, a), encoder.apply(p, b), 0.2, 3, mesh=mesh)

    z1, z2 = encoder.apply(params, x1), encoder.apply(params, x2)
    # Global reference: every anchor against all 2N - 2 = 30 negatives of the global batch.
    np.testing.assert_allclose(param_loss(params, x1, x2), numpy_nt_xent(z1, z2, 0.2), rtol=RTOL)

    def embedding_and_param_grads(u, v, p, a, b):
        by_embedding = jax.value_and_grad(lambda u, v: losses.nt_xent(u, v, 0.2), argnums=(0, 1))(u, v)
        return by_embedding, jax.value_and_grad(param_loss)(p, a, b)

    results = {}
    for k in (1, 2, 4, 8):
        mesh = sharding.make_mesh(devices=jax.devices()[:k])
        put = lambda x: jax.device_put(x, sharding.data_sharding(mesh))
        p = jax.device_put(params, sharding.replicated(mesh))
        a, b = put(x1), put(x2)
        assert len(a.sharding.device_set) == k
        results[k] = jax.jit(embedding_and_param_grads)(put(z1), put(z2), p, a, b)
    for k in (2, 4, 8):
        numerics.assert_trees_close(results[k], results[1], f"{k} devices vs 1: ")
    # Blockwise on the 8-device mesh (GSPMD, and shard_map with each device on its own anchors;
    # block 3 does not divide the 4 local rows) agrees with the naive loss on one device.
    for mesh_arg in (None, mesh):
        blockwise = jax.jit(jax.value_and_grad(param_loss_blockwise), static_argnums=3)(p, a, b, mesh_arg)
        numerics.assert_trees_close(blockwise, results[1][1], "blockwise vs naive: ")
    with pytest.raises(ValueError, match=r"pairs \(12\).*data devices \(8\)"):
        losses.nt_xent_blockwise(z1[:12], z2[:12], 0.2, 4, mesh=mesh)


def test_same_zone_loss_and_gradients_identical_on_1_2_4_8_devices(x64):
    # 16 patches of 3 zones, in runs that straddle the devices' rows (2 per device on 8): an
    # anchor's same-zone negatives sit on its own and on other devices.
    rng = np.random.default_rng(8)
    x1, x2 = rng.normal(size=(16, 5)), rng.normal(size=(16, 5))  # float64
    zones = np.array([0, 0, 0, 1, 1, 2, 0, 2, 2, 2, 1, 0, 1, 1, 0, 2], np.int32)
    encoder = TinyEncoder(param_dtype=jnp.float64)
    params = encoder.init(jax.random.key(0), x1)

    def param_loss(p, a, b, zones, mesh=None, blockwise=False):
        u, v = encoder.apply(p, a), encoder.apply(p, b)
        if blockwise:
            return losses.nt_xent_blockwise(u, v, 0.2, 3, mesh=mesh, zones=zones)
        return losses.nt_xent(u, v, 0.2, zones=zones)

    z1, z2 = encoder.apply(params, x1), encoder.apply(params, x2)
    np.testing.assert_allclose(param_loss(params, x1, x2, zones), numpy_nt_xent(z1, z2, 0.2, zones), rtol=1e-12)
    results = {}
    for k in (1, 2, 4, 8):
        mesh = sharding.make_mesh(devices=jax.devices()[:k])
        put = lambda x: jax.device_put(x, sharding.data_sharding(mesh))  # noqa: E731
        p = jax.device_put(params, sharding.replicated(mesh))
        args = (p, put(x1), put(x2), put(zones))
        results[k] = jax.jit(jax.value_and_grad(param_loss))(*args)
        blockwise = jax.jit(jax.value_and_grad(param_loss), static_argnums=(4, 5))(*args, mesh, True)
        numerics.assert_trees_close(blockwise, results[1], f"blockwise on {k} devices vs naive on 1: ")
    for k in (2, 4, 8):
        numerics.assert_trees_close(results[k], results[1], f"{k} devices vs 1: ")


# -- weighted cross-entropy ----------------------------------------------------------------------

def numpy_weighted_ce(logits, labels, weights):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    num = den = 0.0
    for idx in np.ndindex(labels.shape):
        if labels[idx] == IGNORE_LABEL:
            continue
        w = 1.0 if weights is None else weights[labels[idx]]
        num += -w * logp[idx + (labels[idx],)]
        den += w
    return num / den, den


def ce_case(seed=0, shape=(2, 3, 4), k=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (k,)).astype(np.float32) * 3
    labels = rng.integers(0, k, size=shape).astype(np.int32)
    labels[rng.random(shape) < 0.3] = IGNORE_LABEL
    weights = rng.uniform(0.2, 3.0, size=k).astype(np.float32)
    return logits, labels, weights


def test_weighted_ce_matches_numpy_reference():
    logits, labels, weights = ce_case()
    for w in (weights, None):
        loss, weight_sum = losses.weighted_cross_entropy(logits, labels, w)
        want_loss, want_sum = numpy_weighted_ce(logits, labels, w)
        np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
        np.testing.assert_allclose(weight_sum, want_sum, rtol=RTOL)
    # bf16 logits are promoted: same result as their float32 values.
    loss_bf16, _ = losses.weighted_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels, weights)
    want, _ = numpy_weighted_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), labels, weights)
    np.testing.assert_allclose(loss_bf16, want, rtol=RTOL)


def test_ignored_pixels_change_nothing():
    logits, labels, weights = ce_case(seed=1)
    loss_fn = jax.value_and_grad(lambda l: losses.weighted_cross_entropy(l, labels, weights)[0])
    base, grads = loss_fn(logits)
    ignored = labels == IGNORE_LABEL
    assert ignored.any()
    scrambled = np.where(ignored[..., None], 100.0 * np.random.default_rng(2).normal(size=logits.shape),
                         logits).astype(np.float32)
    np.testing.assert_allclose(loss_fn(scrambled)[0], base, rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(grads)[ignored], 0.0)
    # Appending a fully ignored patch leaves loss and weight sum unchanged.
    more_logits = np.concatenate([logits, logits[:1]])
    more_labels = np.concatenate([labels, np.full_like(labels[:1], IGNORE_LABEL)])
    loss, weight_sum = losses.weighted_cross_entropy(more_logits, more_labels, weights)
    np.testing.assert_allclose(loss, base, rtol=RTOL)
    np.testing.assert_allclose(weight_sum, losses.weighted_cross_entropy(logits, labels, weights)[1])


def test_all_ignored_gives_zero_loss_and_finite_zero_gradient():
    logits, _, weights = ce_case()
    labels = np.full(logits.shape[:-1], IGNORE_LABEL, np.int32)
    loss, weight_sum = losses.weighted_cross_entropy(logits, labels, weights)
    grads = jax.grad(lambda l: losses.weighted_cross_entropy(l, labels, weights)[0])(logits)
    assert float(loss) == 0.0 and float(weight_sum) == 0.0
    assert bool(jnp.all(grads == 0.0))
