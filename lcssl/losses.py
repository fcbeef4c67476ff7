"""Losses and their diagnostics: pure functions of arrays.

Contrastive (SimCLR, Chen et al. 2020): `nt_xent` builds the whole [2N, 2N] similarity matrix;
`nt_xent_blockwise` gives the same value and gradient in O(block_size^2 + N D) working memory. Under
jit, with z sharded on 'data', both see the *global* batch: every anchor has all 2N - 2 negatives from
all devices, and the gradient is that of the global loss (no per-device loss, no 1/devices factor).

Same-zone negatives (`zones`, of nt_xent[_blockwise], cross_modal_info_nce[_blockwise] and their
metrics): an anchor's negatives are only the rows of its own zone, as DARLING's in-domain negatives
(Zhang et al. 2022, "Towards Unsupervised Domain Generalization"): patches of one zone share their
acquisition (dates, clouds, radiometric gain and offset), so that nuisance cannot tell them apart and
the objective has to use the land cover. A logit between two zones is no term of the denominator;
the positive (the same patch) always stays. The loss is still the mean over all anchors of the
global batch. zones=None (every row a negative of every other) is the plain loss, computed exactly
as without the argument.

Supervised: `weighted_cross_entropy` with the ignore label skipped.

Shapes: z1, z2 [N, D] (any float dtype; maths in float32, or in float64 for float64 inputs in
jax's x64 mode, where the tests compare code paths); zones [N] int (zone index of row i, shared by
its two views or modalities); logits [..., K]; labels [...] int.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lcssl.data.schema import IGNORE_LABEL
from lcssl.sharding import DATA_AXIS

# Cosine similarity: z / max(|z|, eps), as torch.nn.functional.normalize does.
NORM_EPS = 1e-6
# Stands in for -inf on masked logits: finite, so an all-masked tile gives exp(0) = 1 instead of
# NaN in the online log-sum-exp (that term is rescaled to 0 once a real maximum arrives).
_MASKED = -1e30
# Similarities feed exp(s / T) at T ~ 0.05: a TF32 matmul (XLA may pick it for float32 on GPU)
# errs by ~1e-3 in s, i.e. ~0.02 in the logit.
_PRECISION = jax.lax.Precision.HIGHEST


def _float(x) -> jnp.dtype:
    """The dtype the maths runs in: float32 for bf16 / fp32 inputs, float64 for float64 ones."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def l2_normalize(z: jax.Array) -> jax.Array:
    """Unit rows (float32; float64 for float64 z); rows with norm below NORM_EPS are scaled by
    1 / NORM_EPS instead."""
    z = z.astype(_float(z))
    norm = jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True))
    return z / jnp.maximum(norm, NORM_EPS)


def _views(z1: jax.Array, z2: jax.Array) -> jax.Array:
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {z1.shape} and {z2.shape}.")
    return l2_normalize(jnp.concatenate([z1, z2], axis=0))  # [2N, D]


def _check_zones(zones, n: int) -> None:
    if zones is not None and zones.shape != (n,):
        raise ValueError(f"zones must be [N] = ({n},), one per pair of rows; got {zones.shape}.")


def _view_zones(zones: jax.Array, n: int) -> jax.Array:
    """zones [N] -> [2N], the zone of each row of `_views` (the two views of a patch share it)."""
    _check_zones(zones, n)
    return jnp.concatenate([zones, zones])


def _positive_logits(zn: jax.Array, temperature) -> jax.Array:
    """s(i, pos(i)) / T for the 2N anchors, pos(i) = i + N mod 2N; O(N D), no matrix."""
    n = zn.shape[0] // 2
    partner = jnp.roll(zn, n, axis=0)
    return jnp.sum(zn * partner, axis=-1) / temperature


def nt_xent(z1: jax.Array, z2: jax.Array, temperature, zones: jax.Array | None = None) -> jax.Array:
    """SimCLR NT-Xent, mean over the 2N anchors; z1[i] and z2[i] are the positive pair.

    loss_i = -log( exp(s_ip / T) / sum_{k != i} exp(s_ik / T) ), s = cosine similarity: the
    denominator has 2N - 1 terms (the positive and the 2N - 2 negatives; self excluded).
    zones [N]: same-zone negatives, the sum over k != i with zone(k) = zone(i) (both views of the
    other patches of anchor i's zone).
    """
    zn = _views(z1, z2)
    two_n = zn.shape[0]
    logits = jnp.dot(zn, zn.T, precision=_PRECISION) / temperature  # [2N, 2N] float32
    excluded = jnp.eye(two_n, dtype=bool)
    if zones is not None:
        view_zones = _view_zones(zones, z1.shape[0])
        excluded = excluded | (view_zones[:, None] != view_zones[None, :])
    logits = jnp.where(excluded, _MASKED, logits)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(lse - _positive_logits(zn, temperature))


# -- blockwise ----------------------------------------------------------------------------------
# With u = zn / sqrt(T), the logits are u u^T. The custom VJP below returns sum_i lse_i over the
# query rows it is given (self masked), tiled [block, block] against all key rows: forward keeps only
# lse per row; backward recomputes each tile, P = exp(tile - lse_row) (softmax rows), and pulls back
# d/du_query = P u_keys and d/du_keys = P^T u_query (together (P + P^T) u). The positive term and the
# normalisation are ordinary jnp, differentiated by JAX.
# On a mesh (shard_map over 'data') the queries are the device's own rows, the keys the all-gathered
# global batch; the key-side gradients of all devices are summed back onto their owners with
# psum_scatter. Each device does 1/devices of the tiles, as the naive loss under GSPMD does.


def _tile_mask(rows: jax.Array, cols: jax.Array, num_keys: int, row_zones=None, col_zones=None) -> jax.Array:
    """True where the logit is not a term: self-pairs, padding columns and, with zones, pairs of
    two zones."""
    mask = (rows[:, None] == cols[None, :]) | (cols[None, :] >= num_keys)
    return mask if row_zones is None else mask | _other_zone(row_zones, col_zones)


def _other_zone(row_zones, col_zones) -> jax.Array:
    return row_zones[:, None] != col_zones[None, :]


def _tiles(u: jax.Array, block_size: int, first_id=0):
    """[M, D] -> ([nb, block, D] zero-padded, row ids [nb, block] starting at first_id)."""
    padded = u.shape[0] + (-u.shape[0]) % block_size
    u = jnp.pad(u, ((0, padded - u.shape[0]), (0, 0)))
    nb = padded // block_size
    return u.reshape(nb, block_size, -1), (first_id + jnp.arange(padded)).reshape(nb, block_size)


def _id_tiles(ids: jax.Array | None, block_size: int) -> jax.Array | None:
    """[M] ints (zones) -> [nb, block] padded with -1 (padding rows and columns are masked anyway)."""
    if ids is None:
        return None
    padded = ids.shape[0] + (-ids.shape[0]) % block_size
    return jnp.pad(ids, (0, padded - ids.shape[0]), constant_values=-1).reshape(-1, block_size)


def _keys(u: jax.Array, axis_name):
    """The key rows (whole global batch) and the global id of this device's first query row."""
    if axis_name is None:
        return u, 0
    return (jax.lax.all_gather(u, axis_name, tiled=True),
            jax.lax.axis_index(axis_name) * u.shape[0])


def _row_lse(u: jax.Array, keys: jax.Array, first_id, block_size: int, zones=None,
             key_zones=None) -> jax.Array:
    """Per query row log-sum-exp over keys k != self of u_i . u_k (of the row's zone, with zones),
    online over key tiles."""
    num_keys = keys.shape[0]
    qb, qid = _tiles(u, block_size, first_id)
    kb, kid = _tiles(keys, block_size)

    def row_block(_, row):
        ur, ir, zr = row

        def col_block(carry, col):
            m, s = carry
            uc, ic, zc = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            t = jnp.where(_tile_mask(ir, ic, num_keys, zr, zc), _MASKED, t)
            m_new = jnp.maximum(m, jnp.max(t, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(t - m_new[:, None]), axis=1)
            return (m_new, s), None

        zeros = jnp.zeros_like(ur[:, 0])  # like ur, so that it is device-varying inside shard_map
        (m, s), _ = jax.lax.scan(col_block, (zeros + _MASKED, zeros), (kb, kid, _id_tiles(key_zones, block_size)))
        return None, m + jnp.log(s)

    _, lse = jax.lax.scan(row_block, None, (qb, qid, _id_tiles(zones, block_size)))
    return lse.reshape(-1)


# zones: [M] ints of the query rows u (None: no zone mask); an integer input, so no cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sum_lse(u: jax.Array, zones, block_size: int, axis_name) -> jax.Array:
    keys, first_id = _keys(u, axis_name)
    lse = _row_lse(u, keys, first_id, block_size, zones, _gather_zones(zones, axis_name))
    return jnp.sum(lse[: u.shape[0]])


def _sum_lse_fwd(u, zones, block_size, axis_name):
    keys, first_id = _keys(u, axis_name)
    lse = _row_lse(u, keys, first_id, block_size, zones, _gather_zones(zones, axis_name))
    return jnp.sum(lse[: u.shape[0]]), (u, zones, lse)


def _sum_lse_bwd(block_size, axis_name, residuals, g):
    u, zones, lse = residuals
    keys, first_id = _keys(u, axis_name)  # re-gathered rather than kept: O(N D) either way
    num_rows, num_keys = u.shape[0], keys.shape[0]
    qb, qid = _tiles(u, block_size, first_id)
    kb, kid = _tiles(keys, block_size)
    qz, kz = _id_tiles(zones, block_size), _id_tiles(_gather_zones(zones, axis_name), block_size)
    lse_b = lse.reshape(qb.shape[0], block_size)
    row_weight = jnp.where(jnp.arange(qid.size).reshape(qid.shape) < num_rows, g, 0.0)  # no padding

    def row_block(du_keys, row):
        ur, ir, lr, wr, zr = row

        def col_block(du_r, col):
            uc, ic, zc = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            p = jnp.where(_tile_mask(ir, ic, num_keys, zr, zc), 0.0, jnp.exp(t - lr[:, None]))
            p = p * wr[:, None]
            du_r = du_r + jnp.dot(p, uc, precision=_PRECISION)
            return du_r, jnp.dot(p.T, ur, precision=_PRECISION)

        du_r, du_k = jax.lax.scan(col_block, jnp.zeros_like(ur), (kb, kid, kz))
        return du_keys + du_k, du_r

    du_keys, du_rows = jax.lax.scan(row_block, jnp.zeros_like(kb), (qb, qid, lse_b, row_weight, qz))
    du_keys = du_keys.reshape(-1, u.shape[1])[:num_keys]
    if axis_name is not None:  # every device's P^T u_query lands on the rows' owners
        du_keys = jax.lax.psum_scatter(du_keys, axis_name, tiled=True)
    return du_rows.reshape(-1, u.shape[1])[:num_rows] + du_keys, None


_sum_lse.defvjp(_sum_lse_fwd, _sum_lse_bwd)


def _blockwise_terms(z1, z2, temperature, block_size, axis_name, zones=None):
    """sum over the given anchors of (lse_i - positive logit_i); z1[i], z2[i] on the same device."""
    zn = _views(z1, z2)
    view_zones = None if zones is None else _view_zones(zones, z1.shape[0])
    inv_sqrt_t = jax.lax.rsqrt(jnp.asarray(temperature, zn.dtype))
    sum_lse = _sum_lse(zn * inv_sqrt_t, view_zones, min(block_size, zn.shape[0]), axis_name)
    return sum_lse - jnp.sum(_positive_logits(zn, temperature))


def nt_xent_blockwise(z1: jax.Array, z2: jax.Array, temperature, block_size: int = 512,
                      mesh: jax.sharding.Mesh | None = None, zones: jax.Array | None = None) -> jax.Array:
    """`nt_xent` without the [2N, 2N] matrix: [block_size, block_size] tiles, forward and backward.

    Working memory is O(block_size^2 + N D); time is that of the naive loss plus one recomputation
    of the similarities in the backward pass (as in FlashAttention's recomputation). block_size
    need not divide 2N (the last tile is padded and masked).
    mesh: pass the training mesh when z1, z2 are sharded on 'data' so that each device computes only
    its own anchors' tiles (shard_map); without it XLA runs every tile on every device (same result).
    zones [N]: same-zone negatives, as `nt_xent`.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    two_n = 2 * z1.shape[0]
    extra = () if zones is None else (zones,)
    if mesh is None or mesh.shape[DATA_AXIS] == 1:
        return _blockwise_terms(z1, z2, temperature, block_size, None, *extra) / two_n
    if z1.shape[0] % mesh.shape[DATA_AXIS]:
        raise ValueError(f"The number of pairs ({z1.shape[0]}) is not divisible by the number of data "
                         f"devices ({mesh.shape[DATA_AXIS]}).")

    def local(a, b, t, *zones):
        # Local anchors are z1[rows] and z2[rows] of this device, so positives stay on-device; the
        # keys are gathered in device order, a permutation of the batch, which lse does not see.
        return jax.lax.psum(_blockwise_terms(a, b, t, block_size, DATA_AXIS, *zones), DATA_AXIS) / two_n

    specs = (P(DATA_AXIS), P(DATA_AXIS), P()) + (P(DATA_AXIS),) * len(extra)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(
        z1, z2, jnp.asarray(temperature, _float(z1)), *extra)


def contrastive_metrics(z1: jax.Array, z2: jax.Array, temperature, block_size: int = 512,
                        zones: jax.Array | None = None) -> dict:
    """SSL health diagnostics (no gradient), tiled like `nt_xent_blockwise`.

    pos_accuracy: fraction of the 2N anchors whose positive beats every one of its 2N - 2
        negatives (strictly; a collapsed encoder, where all similarities tie, scores 0); with
        zones, every one of the negatives the loss uses, those of the anchor's zone (an anchor
        alone in its zone wins).
    embedding_std: mean over dims of the per-dim std of the L2-normalised embeddings: about
        1/sqrt(D) when spread over the sphere, -> 0 on collapse.
    pos_cosine / neg_cosine: mean cosine similarity of positive pairs / of negative pairs (all
        pairs of two patches of the batch, zones or not).
    temperature is accepted for symmetry with the loss; rankings and cosines do not depend on it.
    """
    del temperature
    zn = jax.lax.stop_gradient(_views(z1, z2))
    two_n, _ = zn.shape
    n = two_n // 2
    block_size = min(block_size, two_n)
    pos = jnp.sum(zn * jnp.roll(zn, n, axis=0), axis=-1)  # [2N]
    ub, idx = _tiles(zn, block_size)
    zb = None if zones is None else _id_tiles(_view_zones(zones, n), block_size)

    def row_block(_, row):
        ur, ir, zr = row
        partner = (ir + n) % two_n

        def col_block(best, col):
            uc, ic, zc = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            excluded = _tile_mask(ir, ic, two_n, zr, zc) | (partner[:, None] == ic[None, :])
            return jnp.maximum(best, jnp.max(jnp.where(excluded, _MASKED, t), axis=1)), None

        best, _ = jax.lax.scan(col_block, jnp.full((block_size,), _MASKED, zn.dtype), (ub, idx, zb))
        return None, best

    _, best_negative = jax.lax.scan(row_block, None, (ub, idx, zb))
    best_negative = best_negative.reshape(-1)[:two_n]
    # Sum over all ordered pairs minus self-pairs and positive pairs, from the column sum: O(N D).
    total = jnp.sum(jnp.square(jnp.sum(zn, axis=0)))
    negative_sum = total - jnp.sum(zn * zn) - jnp.sum(pos)
    return {
        "pos_accuracy": jnp.mean((pos > best_negative).astype(jnp.float32)),
        "embedding_std": jnp.mean(jnp.std(zn, axis=0)),
        "pos_cosine": jnp.mean(pos),
        "neg_cosine": negative_sum / (two_n * (two_n - 2)),
    }


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None,
                           ignore_label: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
    """Class-weighted softmax cross-entropy over the labelled pixels.

    logits [..., K] (any float dtype; log-softmax in float32), labels [...] int in [0, K) or
    `ignore_label`, class_weights [K] or None (all 1). Returns (loss, weight_sum) with
    loss = sum(w_y * ce) / sum(w_y) over non-ignored pixels, PyTorch's weighted 'mean' convention,
    and 0 (not NaN, zero gradient) when no pixel is labelled. weight_sum lets callers combine
    microbatches exactly (see gradcache.accumulate_gradients).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + [K].")
    log_probs = jax.nn.log_softmax(logits.astype(_float(logits)), axis=-1)
    valid = labels != ignore_label
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    if class_weights is None:
        weights = valid.astype(log_probs.dtype)
    else:
        weights = jnp.where(valid, jnp.asarray(class_weights, log_probs.dtype)[safe_labels], 0.0)
    weight_sum = jnp.sum(weights)
    numerator = jnp.sum(weights * ce)
    loss = jnp.where(weight_sum > 0, numerator / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)
    return loss, weight_sum


# -- cross-modal InfoNCE, and the blockwise log-sum-exp it shares with the dense loss -------------
# Symmetric InfoNCE between two modalities (CLIP, Radford et al. 2021; for aerial + Sentinel-2 as in
# OmniSat's cross-modal term): a [N, D] aerial and s [N, D] Sentinel-2 embeddings of the same N
# places; row i of one modality has one positive (row i of the other) and N - 1 negatives (every
# other place of the global batch, in the other modality). No self-pairs: the logits are a s^T.


def _pair(a: jax.Array, s: jax.Array, what: str) -> tuple[jax.Array, jax.Array]:
    if a.shape != s.shape or a.ndim != 2:
        raise ValueError(f"{what}: both embeddings must be [N, D] of the same shape; got {a.shape} "
                         f"and {s.shape}.")
    return l2_normalize(a), l2_normalize(s)


def cross_modal_info_nce(a: jax.Array, s: jax.Array, temperature, zones: jax.Array | None = None
                         ) -> jax.Array:
    """Symmetric cross-modal InfoNCE, naive: the [N, N] logits a s^T / T in memory.

    loss = (mean_i [lse_j(a_i.s_j / T) - a_i.s_i / T] + mean_j [lse_i(a_i.s_j / T) - a_j.s_j / T]) / 2,
    cosine similarities; the mean of the aerial -> S2 and S2 -> aerial cross-entropies.
    zones [N]: same-zone negatives, each lse over the other modality's rows of the anchor's zone.
    """
    an, sn = _pair(a, s, "cross_modal_info_nce")
    _check_zones(zones, an.shape[0])
    logits = jnp.dot(an, sn.T, precision=_PRECISION) / temperature  # [N, N] float32
    if zones is not None:
        logits = jnp.where(_other_zone(zones, zones), _MASKED, logits)
    pos = jnp.sum(an * sn, axis=-1) / temperature
    lse_a = jax.nn.logsumexp(logits, axis=1)
    lse_s = jax.nn.logsumexp(logits, axis=0)
    return 0.5 * (jnp.mean(lse_a - pos) + jnp.mean(lse_s - pos))


# _sum_weighted_lse(q, k, w, zones) = sum_i w_i lse_j(q_i . k_j) over all key rows j (no self
# mask; with zones [M], those of q_i's zone: q and k are then rows of the same M places), tiled
# like _sum_lse: the backward recomputes each tile, P = w_i exp(tile - lse_i), d/dq = P k and
# d/dk = P^T q. w is a constant weight (1, or 0 for an anchor without a positive); it gets no
# gradient. On a mesh the queries (and w, zones) are the device's rows, the keys the all-gathered
# global key rows, and the key gradients are psum_scattered back onto their owners.


def _key_mask(ic, num_keys, zr, zc):
    mask = ic[None, :] >= num_keys
    return mask if zr is None else mask | _other_zone(zr, zc)


def _weighted_row_lse(q, keys, block_size, zones=None, key_zones=None):
    num_keys = keys.shape[0]
    qb, _ = _tiles(q, block_size)
    kb, kid = _tiles(keys, block_size)

    def row_block(_, row):
        ur, zr = row

        def col_block(carry, col):
            m, s = carry
            uc, ic, zc = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            t = jnp.where(_key_mask(ic, num_keys, zr, zc), _MASKED, t)
            m_new = jnp.maximum(m, jnp.max(t, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(t - m_new[:, None]), axis=1)
            return (m_new, s), None

        zeros = jnp.zeros_like(ur[:, 0])
        (m, s), _ = jax.lax.scan(col_block, (zeros + _MASKED, zeros), (kb, kid, _id_tiles(key_zones, block_size)))
        return None, m + jnp.log(s)

    _, lse = jax.lax.scan(row_block, None, (qb, _id_tiles(zones, block_size)))
    return lse.reshape(-1)


def _gather_keys(k, axis_name):
    return k if axis_name is None else jax.lax.all_gather(k, axis_name, tiled=True)


def _gather_zones(zones, axis_name):
    return None if zones is None else _gather_keys(zones, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sum_weighted_lse(q, k, w, zones, block_size, axis_name):
    lse = _weighted_row_lse(q, _gather_keys(k, axis_name), block_size, zones,
                            _gather_zones(zones, axis_name))[: q.shape[0]]
    return jnp.sum(w * lse)


def _sum_weighted_lse_fwd(q, k, w, zones, block_size, axis_name):
    lse = _weighted_row_lse(q, _gather_keys(k, axis_name), block_size, zones, _gather_zones(zones, axis_name))
    return jnp.sum(w * lse[: q.shape[0]]), (q, k, w, zones, lse)


def _sum_weighted_lse_bwd(block_size, axis_name, residuals, g):
    q, k, w, zones, lse = residuals
    keys = _gather_keys(k, axis_name)
    num_rows, num_keys = q.shape[0], keys.shape[0]
    qb, _ = _tiles(q, block_size)
    kb, kid = _tiles(keys, block_size)
    qz, kz = _id_tiles(zones, block_size), _id_tiles(_gather_zones(zones, axis_name), block_size)
    nb = qb.shape[0]
    weight = jnp.pad(w.astype(g.dtype) * g, (0, nb * block_size - num_rows)).reshape(nb, block_size)

    def row_block(dk, row):
        ur, lr, wr, zr = row

        def col_block(du_r, col):
            uc, ic, zc = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            p = jnp.where(_key_mask(ic, num_keys, zr, zc), 0.0, jnp.exp(t - lr[:, None])) * wr[:, None]
            return du_r + jnp.dot(p, uc, precision=_PRECISION), jnp.dot(p.T, ur, precision=_PRECISION)

        du_r, du_k = jax.lax.scan(col_block, jnp.zeros_like(ur), (kb, kid, kz))
        return dk + du_k, du_r

    dk, dq = jax.lax.scan(row_block, jnp.zeros_like(kb), (qb, lse.reshape(nb, block_size), weight, qz))
    dk = dk.reshape(-1, q.shape[1])[:num_keys]
    if axis_name is not None:
        dk = jax.lax.psum_scatter(dk, axis_name, tiled=True)
    return dq.reshape(-1, q.shape[1])[:num_rows], dk, jnp.zeros_like(w), None


_sum_weighted_lse.defvjp(_sum_weighted_lse_fwd, _sum_weighted_lse_bwd)


def _on_mesh(local, mesh, args, num_rows: int, what: str):
    """Runs local(*args, axis_name) on the rows of each device and psums the result; without a
    (multi-device) mesh, once on all rows. args are sharded on their leading axis, num_rows long."""
    if mesh is None or mesh.shape[DATA_AXIS] == 1:
        return local(*args, None)
    if num_rows % mesh.shape[DATA_AXIS]:
        raise ValueError(f"{what}: the batch ({num_rows}) is not divisible by the number of data "
                         f"devices ({mesh.shape[DATA_AXIS]}).")
    body = lambda *a: jax.lax.psum(local(*a, DATA_AXIS), DATA_AXIS)  # noqa: E731
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(P(DATA_AXIS) for _ in args),
                         out_specs=P())(*args)


def cross_modal_info_nce_blockwise(a: jax.Array, s: jax.Array, temperature, block_size: int = 512,
                                   mesh: jax.sharding.Mesh | None = None,
                                   zones: jax.Array | None = None) -> jax.Array:
    """`cross_modal_info_nce` without the [N, N] matrix: [block_size, block_size] tiles forward and
    backward, O(block_size^2 + N D) memory. mesh: as for `nt_xent_blockwise` (each device computes
    the tiles of its own rows; the positives a_i, s_i sit on the same device). zones [N]: same-zone
    negatives, as `cross_modal_info_nce`."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    n = a.shape[0]
    _check_zones(zones, n)
    inv_sqrt_t = jax.lax.rsqrt(jnp.asarray(temperature, _float(a)))

    def local(a, s, *rest):
        *zones, axis_name = rest
        zones = zones[0] if zones else None
        an, sn = _pair(a, s, "cross_modal_info_nce_blockwise")
        ua, us = an * inv_sqrt_t, sn * inv_sqrt_t
        ones = jnp.ones(ua.shape[0], ua.dtype)
        block = min(block_size, n)
        lse = (_sum_weighted_lse(ua, us, ones, zones, block, axis_name)
               + _sum_weighted_lse(us, ua, ones, zones, block, axis_name))
        return lse - 2 * jnp.sum(ua * us)

    args = (a, s) if zones is None else (a, s, zones)
    return _on_mesh(local, mesh, args, n, "cross_modal_info_nce_blockwise") / (2 * n)


def _best_other(q: jax.Array, keys: jax.Array, positive: jax.Array, block_size: int,
                zones: jax.Array | None = None) -> jax.Array:
    """max_{j != positive_i} q_i . k_j per query row (over the keys of q_i's zone, with zones [M]
    of the M places that q and keys both hold), tiled over [block, block]; [Mq]."""
    num_rows, num_keys = q.shape[0], keys.shape[0]
    qb, _ = _tiles(q, block_size)
    pos = jnp.pad(positive, (0, qb.shape[0] * block_size - num_rows)).reshape(qb.shape[0], block_size)
    kb, kid = _tiles(keys, block_size)
    zb = _id_tiles(zones, block_size)

    def row_block(_, row):
        ur, pr, zr = row

        def col_block(best, col):
            uc, ic, zc = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            excluded = _key_mask(ic, num_keys, zr, zc) | (ic[None, :] == pr[:, None])
            return jnp.maximum(best, jnp.max(jnp.where(excluded, _MASKED, t), axis=1)), None

        best, _ = jax.lax.scan(col_block, jnp.full((block_size,), _MASKED, q.dtype), (kb, kid, zb))
        return None, best

    _, best = jax.lax.scan(row_block, None, (qb, pos, zb))
    return best.reshape(-1)[:num_rows]


def embedding_std(z: jax.Array) -> jax.Array:
    """Mean over dims of the per-dim std of the L2-normalised rows of z [N, D]: about 1/sqrt(D) when
    spread over the sphere, 0 when collapsed to one point (as in `contrastive_metrics`)."""
    return jnp.mean(jnp.std(l2_normalize(z), axis=0))


def cross_modal_metrics(a: jax.Array, s: jax.Array, block_size: int = 512,
                        zones: jax.Array | None = None) -> dict:
    """Health of the cross-modal objective (no gradient).

    pos_accuracy: fraction of the 2N anchors (N aerial, N Sentinel-2) whose positive in the other
        modality beats every one of the N - 1 negatives there (strictly: 0 on collapse); with
        zones [N], every one of the negatives the loss uses, those of the anchor's zone.
    aerial_embedding_std / sits_embedding_std: `embedding_std` of each modality (-> 0 on collapse).
    pos_cosine: mean cosine of the positive pairs.
    """
    an, sn = jax.lax.stop_gradient(_pair(a, s, "cross_modal_metrics"))
    n = an.shape[0]
    _check_zones(zones, n)
    block = min(block_size, n)
    pos = jnp.sum(an * sn, axis=-1)
    ids = jnp.arange(n)
    wins = jnp.concatenate([pos > _best_other(an, sn, ids, block, zones),
                            pos > _best_other(sn, an, ids, block, zones)])
    return {"pos_accuracy": jnp.mean(wins.astype(jnp.float32)),
            "aerial_embedding_std": jnp.mean(jnp.std(an, axis=0)),
            "sits_embedding_std": jnp.mean(jnp.std(sn, axis=0)),
            "pos_cosine": jnp.mean(pos)}


# -- VICReg ----------------------------------------------------------------------------------------
# Bardes, Ponce & LeCun 2022, as their reference code (facebookresearch/vicreg, main_vicreg.py):
# invariance = MSE over N and D; variance = mean_d relu(1 - sqrt(var_d + 1e-4)) per branch, unbiased
# var, averaged over the two branches; covariance = sum of squared off-diagonal entries of the
# unbiased covariance / D, summed over the branches; weights 25 / 25 / 1. The reference code
# all-gathers the branches before the variance and covariance terms. Here plain jnp reductions over
# the batch axis do that: under jit on a batch sharded over 'data' the program still means the
# global batch, and GSPMD inserts the cross-device sums (tests/test_objectives.py checks the terms
# against a one-device float64 reference on 1 to 8 devices).
VICREG_EPS = 1e-4


def _variance_term(z):
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + VICREG_EPS)
    return jnp.mean(jax.nn.relu(1.0 - std))


def _covariance_term(z):
    n, d = z.shape
    zc = z - jnp.mean(z, axis=0)
    cov = jnp.dot(zc.T, zc, precision=_PRECISION) / (n - 1)
    off_diagonal = cov - jnp.diag(jnp.diag(cov))
    return jnp.sum(jnp.square(off_diagonal)) / d


def vicreg_terms(z1: jax.Array, z2: jax.Array) -> dict:
    """The unweighted VICReg terms of two branches' embeddings z1, z2 [N, D] (N >= 2), float32:
    {'invariance', 'variance', 'covariance'}."""
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"vicreg: z1 and z2 must both be [N, D] with N >= 2; got {z1.shape} and "
                         f"{z2.shape}.")
    z1, z2 = z1.astype(_float(z1)), z2.astype(_float(z2))
    return {"invariance": jnp.mean(jnp.square(z1 - z2)),
            "variance": 0.5 * (_variance_term(z1) + _variance_term(z2)),
            "covariance": _covariance_term(z1) + _covariance_term(z2)}


def vicreg(z1: jax.Array, z2: jax.Array, invariance_weight=25.0, variance_weight=25.0,
           covariance_weight=1.0) -> tuple[jax.Array, dict]:
    """VICReg loss (weighted sum of `vicreg_terms`) and the terms themselves."""
    terms = vicreg_terms(z1, z2)
    loss = (invariance_weight * terms["invariance"] + variance_weight * terms["variance"]
            + covariance_weight * terms["covariance"])
    return loss, terms


def vicreg_metrics(z1: jax.Array, z2: jax.Array) -> dict:
    """Health of a VICReg run (no gradient): the three terms, `embedding_std` of the normalised
    embeddings of both branches (-> 0 on collapse; ~1/sqrt(D) when spread), and raw_std, the mean
    per-dim std of the raw embeddings that the variance hinge pushes to 1."""
    z1, z2 = jax.lax.stop_gradient((z1, z2))
    z = jnp.concatenate([z1, z2]).astype(_float(z1))
    return {**vicreg_terms(z1, z2), "embedding_std": embedding_std(z),
            "raw_std": jnp.mean(jnp.std(z, axis=0))}


# -- dense (pixel-level) contrastive ---------------------------------------------------------------
# DenseCL (Wang et al. 2021) / PixPro (Xie et al. 2021) style, with the correspondence known from
# the augmentation instead of matched features (lcssl.data.augment.view_correspondence): pixel p
# of view 1 and the pixel of view 2 that sees the same ground point are a positive pair; every
# other view-2 pixel of the global batch (other places, and the rest of the same place) is a
# negative; a view-1 pixel that falls outside view 2 is no anchor. Symmetric: view-2 anchors
# against view-1 keys the same way. Shapes: f1, f2 [B, h, w, C] pixel embeddings at the loss
# resolution; match12 [B, h*w] int32 (index of the view-2 pixel of the same sample), valid12
# [B, h*w] bool, and match21, valid21 the other way.


def _dense_positive_logits(q, k, match):
    """q, k [B, h*w, C] unit rows; match [B, h*w] -> q_p . k_match(p) [B, h*w]."""
    partner = jnp.take_along_axis(k, match[..., None].astype(jnp.int32), axis=1)
    return jnp.sum(q * partner, axis=-1)


def _dense_inputs(f1, f2, match12, valid12, match21, valid21):
    if f1.shape != f2.shape or f1.ndim != 4:
        raise ValueError(f"dense_info_nce: f1 and f2 must both be [B, h, w, C]; got {f1.shape} and "
                         f"{f2.shape}.")
    b, h, w, c = f1.shape
    for name, x in (("match12", match12), ("valid12", valid12), ("match21", match21),
                    ("valid21", valid21)):
        if x.shape != (b, h * w):
            raise ValueError(f"dense_info_nce: {name} must be [B, h*w] = {(b, h * w)}, got {x.shape}.")
    u1 = l2_normalize(f1.reshape(b, h * w, c))
    u2 = l2_normalize(f2.reshape(b, h * w, c))
    return u1, u2


def dense_info_nce(f1, f2, match12, valid12, match21, valid21, temperature) -> jax.Array:
    """Dense InfoNCE, naive: the [B h w, B h w] logits in memory. Mean over the anchors with a
    positive (valid12 of view 1, valid21 of view 2) of lse - positive logit; 0 when there is none."""
    u1, u2 = _dense_inputs(f1, f2, match12, valid12, match21, valid21)
    c = u1.shape[-1]
    logits = jnp.dot(u1.reshape(-1, c), u2.reshape(-1, c).T, precision=_PRECISION) / temperature
    lse12 = jax.nn.logsumexp(logits, axis=1).reshape(valid12.shape)
    lse21 = jax.nn.logsumexp(logits, axis=0).reshape(valid21.shape)
    pos12 = _dense_positive_logits(u1, u2, match12) / temperature
    pos21 = _dense_positive_logits(u2, u1, match21) / temperature
    total = (jnp.sum(jnp.where(valid12, lse12 - pos12, 0.0))
             + jnp.sum(jnp.where(valid21, lse21 - pos21, 0.0)))
    count = jnp.sum(valid12) + jnp.sum(valid21)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def dense_info_nce_blockwise(f1, f2, match12, valid12, match21, valid21, temperature,
                             block_size: int = 512, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """`dense_info_nce` in [block_size, block_size] tiles, forward and backward: the logits of
    B h w pixels against B h w never exist whole. mesh: as `nt_xent_blockwise` (the batch axis is
    sharded on 'data'; a sample's two views and its matches are on one device)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    inv_sqrt_t = jax.lax.rsqrt(jnp.asarray(temperature, _float(f1)))
    _dense_inputs(f1, f2, match12, valid12, match21, valid21)  # shape checks on the global arrays

    def local(f1, f2, match12, valid12, match21, valid21, axis_name):
        u1, u2 = _dense_inputs(f1, f2, match12, valid12, match21, valid21)
        c = u1.shape[-1]
        q1, q2 = (u1 * inv_sqrt_t).reshape(-1, c), (u2 * inv_sqrt_t).reshape(-1, c)
        w12 = valid12.reshape(-1).astype(q1.dtype)
        w21 = valid21.reshape(-1).astype(q1.dtype)
        block = min(block_size, q1.shape[0])
        lse = (_sum_weighted_lse(q1, q2, w12, None, block, axis_name)
               + _sum_weighted_lse(q2, q1, w21, None, block, axis_name))
        pos = (jnp.sum(jnp.where(valid12, _dense_positive_logits(u1, u2, match12), 0.0))
               + jnp.sum(jnp.where(valid21, _dense_positive_logits(u2, u1, match21), 0.0)))
        return jnp.stack([lse - pos / temperature, jnp.sum(w12) + jnp.sum(w21)])

    total, count = _on_mesh(local, mesh, (f1, f2, match12, valid12, match21, valid21), f1.shape[0],
                            "dense_info_nce_blockwise")
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def dense_metrics(f1, f2, match12, valid12, match21, valid21) -> dict:
    """Health of the dense objective (no gradient).

    pos_accuracy: fraction of the view-1 anchors with a positive whose positive beats every other
        pixel of the same sample's view 2 (within the sample: B (h w)^2 work, no global matrix).
    pos_cosine: mean cosine of the positive pixel pairs. valid_fraction: share of the anchors of
    both views that have a positive. embedding_std: `embedding_std` of all pixel embeddings
    (-> 0 on collapse).
    """
    f1, f2 = jax.lax.stop_gradient((f1, f2))
    u1, u2 = _dense_inputs(f1, f2, match12, valid12, match21, valid21)
    sims = jnp.einsum("bpc,bqc->bpq", u1, u2, precision=_PRECISION)  # [B, hw, hw]
    pos = jnp.take_along_axis(sims, match12[..., None].astype(jnp.int32), axis=2)[..., 0]
    others = jnp.where(jnp.arange(sims.shape[2]) == match12[..., None], _MASKED, sims)
    wins = (pos > jnp.max(others, axis=2)) & valid12
    n12 = jnp.maximum(jnp.sum(valid12), 1)
    c = u1.shape[-1]
    return {"pos_accuracy": jnp.sum(wins) / n12,
            "pos_cosine": jnp.sum(jnp.where(valid12, pos, 0.0)) / n12,
            "valid_fraction": (jnp.sum(valid12) + jnp.sum(valid21)) / (2 * valid12.size),
            "embedding_std": jnp.mean(jnp.std(jnp.concatenate([u1, u2]).reshape(-1, c), axis=0))}
