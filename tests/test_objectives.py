"""The pre-training objectives beyond SimCLR: cross-modal InfoNCE, VICReg, dense InfoNCE, and
their health metrics (lcssl/losses.py).

Tolerances: float32 losses against float64 numpy references written from the papers' definitions,
rtol 1e-5 (each loss is a mean of O(1 / T) terms; float32 rounding of the sums is ~1e-7 relative per
operation, over a few hundred terms). Naive vs blockwise and 1 vs k devices differ only in the order
of sums: compared in float64, to 1e-9 of each array's scale (tests/numerics.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl import losses, sharding
from tests import numerics

RTOL, ATOL = 1e-5, 1e-6
DEVICE_COUNTS = (1, 2, 4, 8)


def normalize(z):
    z = np.asarray(z, np.float64)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def logsumexp(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def on_devices(fn, arrays, k):
    """jit(fn)(*arrays) with every array's leading axis sharded over k devices; fn may take the mesh."""
    mesh = sharding.make_mesh(devices=jax.devices()[:k])
    placed = [jax.device_put(x, sharding.data_sharding(mesh)) for x in arrays]
    assert len(placed[0].sharding.device_set) == k
    return jax.jit(lambda *a: fn(mesh, *a))(*placed)


def random_pair(n, d, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return ((rng.normal(size=(n, d)) * scale).astype(np.float32),
            (rng.normal(size=(n, d)) * scale).astype(np.float32))


# -- cross-modal InfoNCE ----------------------------------------------------------------------------

def numpy_cross_modal(a, s, temperature, zones=None):
    """Float64, from the definition: row i's positive is the other modality's row i; with zones [N],
    its negatives are only the other modality's rows of its zone (DARLING)."""
    logits = normalize(a) @ normalize(s).T / temperature
    n = len(a)
    zones = np.zeros(n, int) if zones is None else np.asarray(zones)
    a_to_s = np.mean([logsumexp(logits[i, zones == zones[i]], 0) - logits[i, i] for i in range(n)])
    s_to_a = np.mean([logsumexp(logits[zones == zones[j], j], 0) - logits[j, j] for j in range(n)])
    return (a_to_s + s_to_a) / 2


def test_cross_modal_matches_float64_reference_and_closed_form():
    a, s = random_pair(6, 5)
    both = jax.jit(lambda a, s, t: (losses.cross_modal_info_nce(a, s, t),
                                    losses.cross_modal_info_nce_blockwise(a, s, t, 4)))
    for temperature in (0.07, 0.5):
        for got in both(a, s, temperature):
            np.testing.assert_allclose(got, numpy_cross_modal(a, s, temperature), rtol=RTOL)
    # Aligned orthogonal places: each anchor has its positive at cosine 1 and N - 1 negatives at 0.
    n, temperature = 4, 0.2
    z = np.eye(n, 6, dtype=np.float32) * np.array([[1.0], [3.0], [0.5], [2.0]], np.float32)
    np.testing.assert_allclose(losses.cross_modal_info_nce(z, 2 * z, temperature),
                               np.log(1 + (n - 1) * np.exp(-1 / temperature)), rtol=RTOL)


def test_cross_modal_is_not_symmetric_in_the_samples_it_pairs():
    # Swapping the series of two places changes which pairs are positive, so the loss.
    a, s = random_pair(8, 6, seed=1)
    s = s + 2 * a  # correlated modalities, as after some training
    swapped = s.copy()
    swapped[[0, 5]] = s[[5, 0]]
    value = float(losses.cross_modal_info_nce(a, s, 0.1))
    value_swapped = float(losses.cross_modal_info_nce(a, swapped, 0.1))
    np.testing.assert_allclose(value_swapped, numpy_cross_modal(a, swapped, 0.1), rtol=RTOL)
    assert value_swapped > value + 0.1


@pytest.mark.parametrize("n,block_size", [(5, 2), (12, 16)])  # 2 divides no 5; one tile > N
def test_cross_modal_blockwise_equals_naive_value_and_gradients(x64, n, block_size):
    a, s = numerics.as_float64(random_pair(n, 7, seed=n))
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(a, s)  # noqa: E731
    naive = grad(lambda u, v: losses.cross_modal_info_nce(u, v, 0.1))
    blockwise = grad(lambda u, v: losses.cross_modal_info_nce_blockwise(u, v, 0.1, block_size))
    numerics.assert_trees_close(blockwise, naive, "blockwise vs naive: ")


def test_cross_modal_loss_and_gradients_identical_on_1_2_4_8_devices(x64):
    # 16 places: on 8 devices each holds 2, and the positives of device 0's aerial rows are device
    # 0's series rows; every other row of the 16 is a negative.
    a, s = numerics.as_float64(random_pair(16, 6, seed=3))
    s = s + a
    want = numpy_cross_modal(a, s, 0.2)

    def both(mesh, a, s):  # blockwise by shard_map: each device its own rows' tiles; 3 divides nothing
        naive = jax.value_and_grad(lambda u, v: losses.cross_modal_info_nce(u, v, 0.2), argnums=(0, 1))
        blockwise = jax.value_and_grad(lambda u, v: losses.cross_modal_info_nce_blockwise(
            u, v, 0.2, 3, mesh=mesh), argnums=(0, 1))
        return naive(a, s), blockwise(a, s)

    reference = on_devices(both, (a, s), 1)[0]
    np.testing.assert_allclose(reference[0], want, rtol=RTOL)
    for k in DEVICE_COUNTS:
        naive, blockwise = on_devices(both, (a, s), k)
        numerics.assert_trees_close(naive, reference, f"naive on {k} devices: ")
        numerics.assert_trees_close(blockwise, reference, f"blockwise on {k} devices: ")
    with pytest.raises(ValueError, match=r"batch \(12\).*data devices \(8\)"):
        losses.cross_modal_info_nce_blockwise(a[:12], s[:12], 0.2, 4, mesh=sharding.make_mesh())


def test_cross_modal_positives_pair_the_right_samples_across_devices():
    # Each place's series is its aerial embedding: the right pairing ranks every positive first.
    # Rolling the series by one place moves each positive onto the next device's row (on 8 devices
    # with 2 rows each, half the pairs cross a device boundary): then no positive ranks first.
    a = np.random.default_rng(4).normal(size=(16, 32)).astype(np.float32)
    metrics = lambda mesh, a, s: losses.cross_modal_metrics(a, s, block_size=3)  # noqa: E731
    loss = lambda mesh, a, s: losses.cross_modal_info_nce_blockwise(a, s, 0.1, 4, mesh=mesh)  # noqa: E731
    right = on_devices(metrics, (a, a), 8)
    np.testing.assert_allclose(right["pos_accuracy"], 1.0)
    np.testing.assert_allclose(right["pos_cosine"], 1.0, rtol=RTOL)
    rolled = np.roll(a, 1, axis=0)
    wrong = on_devices(metrics, (a, rolled), 8)
    np.testing.assert_allclose(wrong["pos_accuracy"], 0.0)
    np.testing.assert_allclose(on_devices(loss, (a, rolled), 8), numpy_cross_modal(a, rolled, 0.1), rtol=RTOL)
    assert float(on_devices(loss, (a, rolled), 8)) > float(on_devices(loss, (a, a), 8)) + 1.0


ZONES = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 0, 3, 1, 1, 0, 2], np.int32)  # zone 3: one place


def test_same_zone_cross_modal_matches_float64_reference():
    a, s = random_pair(16, 3, seed=6)
    want = numpy_cross_modal(a, s, 0.2, ZONES)
    np.testing.assert_allclose(losses.cross_modal_info_nce(a, s, 0.2, zones=ZONES), want, rtol=RTOL)
    np.testing.assert_allclose(losses.cross_modal_info_nce_blockwise(a, s, 0.2, 5, zones=ZONES), want, rtol=RTOL)
    assert abs(want - numpy_cross_modal(a, s, 0.2)) > 0.1  # fewer negatives: another loss
    # pos_accuracy against the same-zone negatives only, from the definition
    sims = normalize(a) @ normalize(s).T
    wins = [all(sims[i, i] > sims[i, j] for j in range(16) if j != i and ZONES[j] == ZONES[i]) for i in range(16)]
    wins += [all(sims[j, j] > sims[i, j] for i in range(16) if i != j and ZONES[i] == ZONES[j]) for j in range(16)]
    metrics = losses.cross_modal_metrics(a, s, block_size=5, zones=ZONES)
    np.testing.assert_allclose(metrics["pos_accuracy"], np.mean(wins))
    assert float(metrics["pos_accuracy"]) > float(losses.cross_modal_metrics(a, s)["pos_accuracy"])


def test_one_zone_is_the_plain_cross_modal_loss():
    a, s = random_pair(16, 3, seed=7)
    one_zone = np.full(16, 2, np.int32)
    for fn in (losses.cross_modal_info_nce,
               lambda a, s, t, **kw: losses.cross_modal_info_nce_blockwise(a, s, t, 5, **kw)):
        np.testing.assert_allclose(fn(a, s, 0.2, zones=one_zone), fn(a, s, 0.2), rtol=1e-7)
    np.testing.assert_allclose(losses.cross_modal_metrics(a, s, 5, zones=one_zone)["pos_accuracy"],
                               losses.cross_modal_metrics(a, s, 5)["pos_accuracy"])


def test_same_zone_cross_modal_identical_on_1_2_4_8_devices(x64):
    a, s = numerics.as_float64(random_pair(16, 6, seed=8))
    s = s + a
    want = numpy_cross_modal(a, s, 0.2, ZONES)

    def both(mesh, a, s, zones):
        naive = jax.value_and_grad(lambda u, v: losses.cross_modal_info_nce(u, v, 0.2, zones=zones),
                                   argnums=(0, 1))
        blockwise = jax.value_and_grad(lambda u, v: losses.cross_modal_info_nce_blockwise(
            u, v, 0.2, 3, mesh=mesh, zones=zones), argnums=(0, 1))
        return naive(a, s), blockwise(a, s)

    reference = on_devices(both, (a, s, ZONES), 1)[0]
    np.testing.assert_allclose(reference[0], want, rtol=1e-12)
    for k in DEVICE_COUNTS:
        naive, blockwise = on_devices(both, (a, s, ZONES), k)
        numerics.assert_trees_close(naive, reference, f"naive on {k} devices: ")
        numerics.assert_trees_close(blockwise, reference, f"blockwise on {k} devices: ")


def test_crossmodal_task_masks_the_cross_and_intra_terms_by_zone():
    """crossmodal.objective_loss with negatives='same_zone' reads the views' zones: the cross term
    pairs one view's aerial with the other's series, the intra-modal terms mask like NT-Xent."""
    from lcssl.tasks import crossmodal, pretraining
    from tests.test_losses import numpy_nt_xent

    rng = np.random.default_rng(9)
    a1, a2, s1, s2 = (rng.normal(size=(16, 4)).astype(np.float32) for _ in range(4))
    out = {"aerial_projection": pretraining.interleave(a1, a2), "sits_projection": pretraining.interleave(s1, s2)}
    views = pretraining.Views(inputs={}, key=None, batch={"zone": ZONES})
    cfg = crossmodal.default_config()
    cfg.update(negatives="same_zone", aerial_weight=0.5, sits_weight=2.0, temperature=0.2)
    loss, health = crossmodal.objective_loss(out, views, None, cfg=cfg)
    cross = 0.5 * (numpy_cross_modal(a1, s2, 0.2, ZONES) + numpy_cross_modal(a2, s1, 0.2, ZONES))
    want = cross + 0.5 * numpy_nt_xent(a1, a2, 0.2, ZONES) + 2.0 * numpy_nt_xent(s1, s2, 0.2, ZONES)
    np.testing.assert_allclose(health["cross_loss"], cross, rtol=RTOL)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    cfg.negatives = "all"
    np.testing.assert_allclose(crossmodal.objective_loss(out, views, None, cfg=cfg)[0],
                               numpy_cross_modal(a1, s2, 0.2) / 2 + numpy_cross_modal(a2, s1, 0.2) / 2
                               + 0.5 * numpy_nt_xent(a1, a2, 0.2) + 2.0 * numpy_nt_xent(s1, s2, 0.2), rtol=RTOL)


def test_cross_modal_metrics_detect_collapse():
    n, d = 512, 64
    a, s = random_pair(n, d)
    spread = losses.cross_modal_metrics(a, s, block_size=128)
    np.testing.assert_allclose(spread["aerial_embedding_std"], 1 / np.sqrt(d), rtol=0.05)
    assert float(spread["pos_accuracy"]) < 0.02  # a random positive beats 511 negatives ~1/512
    collapsed = losses.cross_modal_metrics(np.ones((8, d), np.float32), np.ones((8, d), np.float32))
    np.testing.assert_allclose(collapsed["sits_embedding_std"], 0.0, atol=ATOL)
    np.testing.assert_allclose(collapsed["pos_accuracy"], 0.0)


# -- VICReg -----------------------------------------------------------------------------------------

def numpy_vicreg_terms(z1, z2):
    """Float64, following facebookresearch/vicreg main_vicreg.py on the whole (global) batch."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n, d = z1.shape
    invariance = np.mean((z1 - z2) ** 2)
    variance = cov = 0.0
    for z in (z1, z2):
        zc = z - z.mean(0)
        std = np.sqrt(zc.var(0, ddof=1) + 1e-4)
        variance += np.mean(np.maximum(0.0, 1 - std)) / 2
        c = zc.T @ zc / (n - 1)
        cov += (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)) / d
    return {"invariance": invariance, "variance": variance, "covariance": cov}


def vicreg_batch(n=16, d=8, seed=5):
    # Per-dim std ~0.5 (the variance hinge is active and 1 - std is far from 0) and correlated
    # dims (the covariance term is not ~0); shard means differ from the global mean.
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * 0.2 + np.eye(d) * 0.4
    z1 = rng.normal(size=(n, d)) @ mix + np.linspace(-1, 1, n)[:, None]
    z2 = z1 + rng.normal(size=(n, d)) * 0.3
    return z1.astype(np.float32), z2.astype(np.float32)


def test_vicreg_matches_float64_reference_with_default_weights():
    z1, z2 = vicreg_batch()
    loss, terms = losses.vicreg(z1, z2)
    want = numpy_vicreg_terms(z1, z2)
    for name in want:
        np.testing.assert_allclose(terms[name], want[name], rtol=RTOL)
    np.testing.assert_allclose(loss, 25 * want["invariance"] + 25 * want["variance"] + want["covariance"],
                               rtol=RTOL)
    assert all(float(terms[name]) > 0.01 for name in want)


def test_vicreg_terms_are_global_batch_terms_on_1_2_4_8_devices(x64):
    z1, z2 = numerics.as_float64(vicreg_batch())
    want = numpy_vicreg_terms(z1, z2)

    def value_and_grads(mesh, a, b):
        return jax.value_and_grad(lambda u, v: losses.vicreg(u, v), argnums=(0, 1), has_aux=True)(a, b)

    reference = on_devices(value_and_grads, (z1, z2), 1)
    for k in DEVICE_COUNTS:
        got = on_devices(value_and_grads, (z1, z2), k)
        (_, terms), _ = got
        for name in want:  # the terms on k devices are the one-device float64 terms of all 16 rows
            np.testing.assert_allclose(terms[name], want[name], rtol=RTOL)
        numerics.assert_trees_close(got, reference, f"{k} devices: ")
    # The per-device (2 rows each) variance term differs: the test would see a per-shard statistic.
    per_shard = np.mean([numpy_vicreg_terms(z1[i:i + 2], z2[i:i + 2])["variance"] for i in range(0, 16, 2)])
    assert abs(per_shard - want["variance"]) > 0.05


def test_vicreg_metrics_see_collapse():
    z1, z2 = vicreg_batch()
    healthy = losses.vicreg_metrics(z1, z2)
    collapsed = losses.vicreg_metrics(np.ones_like(z1), np.ones_like(z2))
    np.testing.assert_allclose(collapsed["embedding_std"], 0.0, atol=ATOL)
    np.testing.assert_allclose(collapsed["raw_std"], 0.0, atol=ATOL)
    np.testing.assert_allclose(collapsed["variance"], 1 - np.sqrt(1e-4), rtol=RTOL)  # hinge at its max
    assert float(healthy["embedding_std"]) > 0.1 and float(healthy["variance"]) < float(collapsed["variance"])
    with pytest.raises(ValueError, match="N >= 2"):
        losses.vicreg(z1[:1], z2[:1])


# -- dense InfoNCE ----------------------------------------------------------------------------------

def dense_case(b=4, hw=(3, 3), c=5, seed=6):
    """Random pixel embeddings and correspondences with some anchors outside the other view."""
    rng = np.random.default_rng(seed)
    h, w = hw
    f1 = rng.normal(size=(b, h, w, c)).astype(np.float32)
    f2 = (0.5 * rng.normal(size=(b, h, w, c)) + f1[:, ::-1]).astype(np.float32)
    match12 = rng.integers(0, h * w, size=(b, h * w)).astype(np.int32)
    match21 = rng.integers(0, h * w, size=(b, h * w)).astype(np.int32)
    valid12 = rng.random((b, h * w)) < 0.7
    valid21 = rng.random((b, h * w)) < 0.7
    return f1, f2, match12, valid12, match21, valid21


def numpy_dense(f1, f2, match12, valid12, match21, valid21, temperature):
    """Float64 from the definition: anchor (b, p) of view 1 has positive (b, match12[b, p]) of view
    2 and every other view-2 pixel of the batch as negatives; the same from view 2."""
    b, h, w, c = f1.shape
    u1, u2 = normalize(f1.reshape(b * h * w, c)), normalize(f2.reshape(b * h * w, c))
    total, count = 0.0, 0
    for q, k, match, valid in ((u1, u2, match12, valid12), (u2, u1, match21, valid21)):
        for i in range(b):
            for p in range(h * w):
                if valid[i, p]:
                    logits = q[i * h * w + p] @ k.T / temperature
                    total += logsumexp(logits, 0) - logits[i * h * w + match[i, p]]
                    count += 1
    return total / count


def test_dense_matches_float64_reference_and_blockwise_equals_naive(x64):
    case = numerics.as_float64(dense_case())
    expected = numpy_dense(*case, 0.2)
    np.testing.assert_allclose(losses.dense_info_nce(*case, 0.2), expected, rtol=RTOL)
    f1, f2, *rest = case

    @jax.jit
    def all_three(u, v):  # 36 pixels per view: block 7 divides nothing, block 64 is one padded tile
        vg = lambda f: jax.value_and_grad(f, argnums=(0, 1))(u, v)  # noqa: E731
        return [vg(lambda a, b: losses.dense_info_nce(a, b, *rest, 0.2))] + [
            vg(lambda a, b: losses.dense_info_nce_blockwise(a, b, *rest, 0.2, block)) for block in (7, 64)]

    naive, *blockwise = all_three(f1, f2)
    np.testing.assert_allclose(naive[0], expected, rtol=RTOL)
    for got in blockwise:
        numerics.assert_trees_close(got, naive, "blockwise vs naive: ")
    # No anchor with a positive: 0, not NaN.
    none = [np.zeros_like(rest[1]), np.zeros_like(rest[3])]
    np.testing.assert_allclose(losses.dense_info_nce(f1, f2, rest[0], none[0], rest[2], none[1], 0.2), 0.0)


def test_dense_loss_and_gradients_identical_on_1_2_4_8_devices(x64):
    case = numerics.as_float64(dense_case(b=8, hw=(2, 2), seed=7))

    def both(mesh, f1, f2, m12, v12, m21, v21):
        naive = jax.value_and_grad(lambda u, v: losses.dense_info_nce(u, v, m12, v12, m21, v21, 0.3),
                                   argnums=(0, 1))
        blockwise = jax.value_and_grad(lambda u, v: losses.dense_info_nce_blockwise(
            u, v, m12, v12, m21, v21, 0.3, 3, mesh=mesh), argnums=(0, 1))
        return naive(f1, f2), blockwise(f1, f2)

    reference = on_devices(both, case, 1)[0]
    np.testing.assert_allclose(reference[0], numpy_dense(*case, 0.3), rtol=RTOL)
    for k in DEVICE_COUNTS:
        naive, blockwise = on_devices(both, case, k)
        numerics.assert_trees_close(naive, reference, f"naive on {k} devices: ")
        numerics.assert_trees_close(blockwise, reference, f"blockwise on {k} devices: ")


def test_dense_metrics_on_matching_and_collapsed_pixels():
    b, h, w, c = 2, 4, 4, 16
    f1 = np.random.default_rng(8).normal(size=(b, h, w, c)).astype(np.float32)
    f2 = f1[:, :, ::-1]  # view 2 is view 1 flipped left-right
    cols = np.arange(h * w) % w
    match = np.broadcast_to(np.arange(h * w) - cols + (w - 1 - cols), (b, h * w)).astype(np.int32)
    valid = np.ones((b, h * w), bool)
    valid[:, 0] = False
    m = losses.dense_metrics(f1, f2, match, valid, match, valid)
    np.testing.assert_allclose(m["pos_accuracy"], 1.0)
    np.testing.assert_allclose(m["pos_cosine"], 1.0, rtol=RTOL)
    np.testing.assert_allclose(m["valid_fraction"], 15 / 16)
    flat = np.ones_like(f1)
    collapsed = losses.dense_metrics(flat, flat, match, valid, match, valid)
    np.testing.assert_allclose(collapsed["pos_accuracy"], 0.0)
    np.testing.assert_allclose(collapsed["embedding_std"], 0.0, atol=ATOL)


# -- BYOL -------------------------------------------------------------------------------------------

def numpy_byol(p1, p2, t1, t2):
    """Float64, Grill et al. 2020 eq. 2 symmetrised: per patch ||p/|p| - t'/|t'|||^2 both ways."""
    return np.mean(np.sum((normalize(p1) - normalize(t2)) ** 2, -1)
                   + np.sum((normalize(p2) - normalize(t1)) ** 2, -1))


def numpy_byol_grad(p, t):
    """d/dp of sum_rows ||p/|p| - t/|t|||^2 = -2 (I - u u^T) t_hat / |p|, u = p/|p|."""
    p, t = np.asarray(p, np.float64), normalize(t)
    norm = np.linalg.norm(p, axis=-1, keepdims=True)
    u = p / norm
    return -2 * (t - u * np.sum(u * t, -1, keepdims=True)) / norm


def test_byol_loss_and_gradients_match_float64_on_1_2_4_8_devices(x64):
    from lcssl.tasks import byol

    rng = np.random.default_rng(9)
    p1, p2, t1, t2 = (rng.normal(size=(16, 6)) for _ in range(4))  # float64 (x64)
    t2 = t2 + p1  # targets that agree in part with the predictions, as after some training
    want = numpy_byol(p1, p2, t1, t2)
    want_grads = (numpy_byol_grad(p1, t2) / 16, numpy_byol_grad(p2, t1) / 16,
                  np.zeros_like(t1), np.zeros_like(t2))  # no gradient reaches the target

    def value_and_grads(mesh, *arrays):
        return jax.value_and_grad(byol.byol_loss, argnums=(0, 1, 2, 3))(*arrays)

    for k in DEVICE_COUNTS:
        loss, grads = on_devices(value_and_grads, (p1, p2, t1, t2), k)
        numerics.assert_trees_close(loss, np.float64(want), f"loss on {k} devices")
        numerics.assert_trees_close(grads, want_grads, f"gradients on {k} devices")
    # Identical directions: loss 0 whatever the norms; opposite: 4 per term.
    np.testing.assert_allclose(byol.byol_loss(p1, p2, 3 * p2, 0.5 * p1), 0.0, atol=ATOL)
    np.testing.assert_allclose(byol.byol_loss(p1, p2, -p2, -p1), 8.0, rtol=RTOL)


def test_byol_target_momentum_goes_from_the_base_to_one_along_a_cosine():
    from lcssl.tasks import byol

    steps, base_momentum = 100, 0.996
    taus = np.asarray([byol.target_momentum(k, steps, base_momentum) for k in (0, 25, 50, 100, 150)])
    want = [1 - (1 - base_momentum) * (np.cos(np.pi * k / steps) + 1) / 2 for k in (0, 25, 50, 100, 100)]
    np.testing.assert_allclose(taus, want, rtol=0, atol=1e-7)  # float32 of numbers near 1
    assert taus[0] == np.float32(base_momentum) and taus[3] == 1.0


# -- Masked-date reconstruction ---------------------------------------------------------------------

def numpy_masked_dates(prediction, sits, dates, hidden, visible):
    """Float64 loops: the MSE over hidden (date, pixel, band) cells of the prediction, of each
    visible-date mean and of the visible date nearest in time."""
    errors = {"loss": [], "mean": [], "nearest": []}
    for n, t in zip(*np.nonzero(hidden)):
        seen = np.flatnonzero(visible[n])
        nearest = seen[np.argmin(np.abs(dates[n, seen] - dates[n, t]))]
        for name, guess in (("loss", prediction[n, t]), ("mean", sits[n, seen].mean(axis=0)),
                            ("nearest", sits[n, nearest])):
            errors[name].append(((guess - sits[n, t]) ** 2).ravel())
    return {name: np.concatenate(e).mean() for name, e in errors.items()}


def masked_dates_case(n=8, t=5, hw=2, c=3, seed=11):
    """A batch of n series, hidden dates chosen by hand: row i hides dates i % t and (i + 2) % t
    where valid; dates 3 and 4 are padding in the odd rows; at least one date stays visible."""
    rng = np.random.default_rng(seed)
    sits = rng.normal(size=(n, t, hw, hw, c))
    prediction = sits + rng.normal(scale=0.5, size=sits.shape)
    dates = np.sort(rng.choice(np.arange(1, 366), size=(n, t)), axis=1)
    valid = np.ones((n, t), bool)
    valid[1::2, 3:] = False
    hidden = np.zeros((n, t), bool)
    for i in range(n):
        hidden[i, [i % t, (i + 2) % t]] = True
    hidden &= valid
    return prediction, sits, dates, hidden, valid & ~hidden


def test_masked_dates_loss_of_a_hand_made_series():
    from lcssl.tasks import masked_dates

    # One pixel, one band, dates 10, 20, 40 with values 1, 2, 4; date 20 hidden, predicted as 5.
    sits = np.array([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1, 1)
    prediction = np.array([0.0, 5.0, 0.0]).reshape(1, 3, 1, 1, 1)
    dates, hidden = np.array([[10, 20, 40]]), np.array([[False, True, False]])
    loss, health = masked_dates.reconstruction_terms(prediction, sits, dates, hidden, ~hidden)
    np.testing.assert_allclose(loss, 9.0)                           # (5 - 2)^2
    np.testing.assert_allclose(health["mean_baseline_mse"], 0.25)   # ((1 + 4) / 2 - 2)^2
    np.testing.assert_allclose(health["nearest_baseline_mse"], 1.0)  # date 10: (1 - 2)^2
    np.testing.assert_allclose(health["relative_mse"], 36.0)        # 9 / min(0.25, 1)
    np.testing.assert_allclose(health["hidden_dates"], 1.0)


def test_masked_dates_loss_and_gradients_match_float64_on_1_2_4_8_devices(x64):
    from lcssl.tasks import masked_dates

    prediction, sits, dates, hidden, visible = masked_dates_case()
    want = numpy_masked_dates(prediction, sits, dates, hidden, visible)
    cells = hidden.sum() * sits[0, 0].size
    want_grad = 2 * (prediction - sits) * hidden[:, :, None, None, None] / cells

    def value_and_grads(mesh, *arrays):
        return jax.value_and_grad(masked_dates.reconstruction_terms, has_aux=True)(*arrays)

    for k in DEVICE_COUNTS:
        (loss, health), grad = on_devices(value_and_grads, (prediction, sits, dates, hidden, visible), k)
        numerics.assert_trees_close(loss, np.float64(want["loss"]), f"loss on {k} devices")
        numerics.assert_trees_close(grad, want_grad, f"gradient on {k} devices")
        numerics.assert_trees_close(
            (health["mean_baseline_mse"], health["nearest_baseline_mse"], health["hidden_dates"]),
            (np.float64(want["mean"]), np.float64(want["nearest"]), np.float64(hidden.sum(1).mean())),
            f"health on {k} devices")


def test_hidden_dates_are_valid_ones_leave_one_visible_and_follow_the_key():
    from lcssl.tasks import base, masked_dates

    rng = np.random.default_rng(4)
    valid = rng.random((16, 6)) < 0.7
    valid[0], valid[1], valid[2] = False, [True] + [False] * 5, [True, True] + [False] * 4
    n = valid.sum(1)
    draws = []
    for seed in range(4):
        key = jax.random.key(seed, impl=base.RNG_IMPL)
        hidden = np.asarray(masked_dates.hidden_dates(key, valid, 0.5))
        assert not (hidden & ~valid).any()                              # only valid dates
        assert np.all((valid & ~hidden).sum(1) >= np.minimum(n, 1))       # one stays visible
        np.testing.assert_array_equal(hidden.sum(1), np.minimum(np.floor(0.5 * n + 0.5), np.maximum(n - 1, 0)))
        # The draw depends on the key and each row's position only, not on the sharding.
        for k in DEVICE_COUNTS[1:]:
            np.testing.assert_array_equal(
                on_devices(lambda mesh, v: masked_dates.hidden_dates(key, v, 0.5), (valid,), k), hidden)
        draws.append(hidden)
    assert len({d.tobytes() for d in draws}) == len(draws)             # another key, other dates


def test_hide_dates_hides_them_from_the_encoder_and_keeps_the_targets():
    from lcssl.tasks import base, masked_dates, pretraining

    rng = np.random.default_rng(5)
    sits = jnp.asarray(rng.normal(size=(8, 6, 2, 2, 3)), jnp.float32)
    dates = jnp.tile(jnp.arange(1, 7) * 30, (8, 1))
    inputs = {"sits": sits, "dates": dates, "sits_valid": jnp.ones((8, 6), bool), "aerial": jnp.zeros(8)}
    views = pretraining.Views(inputs=inputs, key=jax.random.key(0, impl=base.RNG_IMPL), batch={})
    hidden_views = masked_dates.hide_dates(views, mask_ratio=0.5)
    hidden = np.asarray(hidden_views.targets["hidden"])
    x = hidden_views.inputs
    assert np.all(hidden.sum(1) == 3)
    np.testing.assert_array_equal(x["sits_valid"], ~hidden)
    np.testing.assert_array_equal(np.asarray(x["sits"])[hidden], 0.0)
    np.testing.assert_array_equal(np.asarray(x["sits"])[~hidden], np.asarray(sits)[~hidden])
    np.testing.assert_array_equal(x["dates"], dates)             # the head's query dates
    np.testing.assert_array_equal(hidden_views.targets["sits"], sits)
    # The two views of a patch (rows 2i, 2i + 1) hide their own dates.
    assert any((hidden[0::2] != hidden[1::2]).any(1))


@pytest.mark.slow  # about 50 s on one core: the pre-merge tier
def test_the_encoder_sees_nothing_of_a_hidden_date():
    """Another value or date at a hidden date changes neither the U-TAE's embedding nor the
    reconstruction of the other dates: the task hides the date's values, and the U-TAE ignores
    the date of an invalid entry (only the head reads it, as its query)."""
    from lcssl import models
    from lcssl.tasks import masked_dates

    cfg = masked_dates.model_config(models.tiny_config())
    model = models.build_ssl_model(cfg)
    variables = model.init(jax.random.key(0), *models.dummy_inputs(cfg, 2, 5), train=False)
    rng = np.random.default_rng(6)
    aerial, sits, dates, _ = models.dummy_inputs(cfg, 2, 5)
    sits = jnp.asarray(rng.normal(size=sits.shape), jnp.float32)
    dates = jnp.array([[20, 80, 140, 200, 260], [10, 50, 90, 130, 170]])
    visible = jnp.array([[True, False, True, True, False], [False, True, True, True, True]])
    run = jax.jit(lambda s, d: model.apply(variables, aerial, s, d, visible, train=False))
    out = run(sits, dates)
    other = run(jnp.where(visible[:, :, None, None, None], sits, 7.0), jnp.where(visible, dates, 300))
    np.testing.assert_array_equal(other["embedding"], out["embedding"])
    np.testing.assert_array_equal(np.asarray(other["date_reconstruction"])[np.asarray(visible)],
                                  np.asarray(out["date_reconstruction"])[np.asarray(visible)])
