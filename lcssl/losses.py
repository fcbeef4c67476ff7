"""Losses and their diagnostics: pure functions of arrays.

Contrastive (SimCLR, Chen et al. 2020): `nt_xent` builds the whole [2N, 2N] similarity matrix;
`nt_xent_blockwise` gives the same value and gradient in O(block_size^2 + N D) working memory. Under
jit, with z sharded on 'data', both see the *global* batch: every anchor has all 2N - 2 negatives from
all devices, and the gradient is that of the global loss (no per-device loss, no 1/devices factor).

Supervised: `weighted_cross_entropy` with the ignore label skipped.

Shapes: z1, z2 [N, D] (any float dtype; maths in float32); logits [..., K]; labels [...] int.
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


def l2_normalize(z: jax.Array) -> jax.Array:
    """Float32 unit rows; rows with norm below NORM_EPS are scaled by 1 / NORM_EPS instead."""
    z = z.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True))
    return z / jnp.maximum(norm, NORM_EPS)


def _views(z1: jax.Array, z2: jax.Array) -> jax.Array:
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {z1.shape} and {z2.shape}.")
    return l2_normalize(jnp.concatenate([z1, z2], axis=0))  # [2N, D]


def _positive_logits(zn: jax.Array, temperature) -> jax.Array:
    """s(i, pos(i)) / T for the 2N anchors, pos(i) = i + N mod 2N; O(N D), no matrix."""
    n = zn.shape[0] // 2
    partner = jnp.roll(zn, n, axis=0)
    return jnp.sum(zn * partner, axis=-1) / temperature


def nt_xent(z1: jax.Array, z2: jax.Array, temperature) -> jax.Array:
    """SimCLR NT-Xent, mean over the 2N anchors; z1[i] and z2[i] are the positive pair.

    loss_i = -log( exp(s_ip / T) / sum_{k != i} exp(s_ik / T) ), s = cosine similarity: the
    denominator has 2N - 1 terms (the positive and the 2N - 2 negatives; self excluded).
    """
    zn = _views(z1, z2)
    two_n = zn.shape[0]
    logits = jnp.dot(zn, zn.T, precision=_PRECISION) / temperature  # [2N, 2N] float32
    logits = jnp.where(jnp.eye(two_n, dtype=bool), _MASKED, logits)
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


def _tile_mask(rows: jax.Array, cols: jax.Array, num_keys: int) -> jax.Array:
    """True where the logit is not a term: self-pairs and padding columns."""
    return (rows[:, None] == cols[None, :]) | (cols[None, :] >= num_keys)


def _tiles(u: jax.Array, block_size: int, first_id=0):
    """[M, D] -> ([nb, block, D] zero-padded, row ids [nb, block] starting at first_id)."""
    padded = u.shape[0] + (-u.shape[0]) % block_size
    u = jnp.pad(u, ((0, padded - u.shape[0]), (0, 0)))
    nb = padded // block_size
    return u.reshape(nb, block_size, -1), (first_id + jnp.arange(padded)).reshape(nb, block_size)


def _keys(u: jax.Array, axis_name):
    """The key rows (whole global batch) and the global id of this device's first query row."""
    if axis_name is None:
        return u, 0
    return (jax.lax.all_gather(u, axis_name, tiled=True),
            jax.lax.axis_index(axis_name) * u.shape[0])


def _row_lse(u: jax.Array, keys: jax.Array, first_id, block_size: int) -> jax.Array:
    """Per query row log-sum-exp over keys k != self of u_i . u_k, online over key tiles."""
    num_keys = keys.shape[0]
    qb, qid = _tiles(u, block_size, first_id)
    kb, kid = _tiles(keys, block_size)

    def row_block(_, row):
        ur, ir = row

        def col_block(carry, col):
            m, s = carry
            uc, ic = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            t = jnp.where(_tile_mask(ir, ic, num_keys), _MASKED, t)
            m_new = jnp.maximum(m, jnp.max(t, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(t - m_new[:, None]), axis=1)
            return (m_new, s), None

        zeros = jnp.zeros_like(ur[:, 0])  # like ur, so that it is device-varying inside shard_map
        (m, s), _ = jax.lax.scan(col_block, (zeros + _MASKED, zeros), (kb, kid))
        return None, m + jnp.log(s)

    _, lse = jax.lax.scan(row_block, None, (qb, qid))
    return lse.reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sum_lse(u: jax.Array, block_size: int, axis_name) -> jax.Array:
    keys, first_id = _keys(u, axis_name)
    return jnp.sum(_row_lse(u, keys, first_id, block_size)[: u.shape[0]])


def _sum_lse_fwd(u, block_size, axis_name):
    keys, first_id = _keys(u, axis_name)
    lse = _row_lse(u, keys, first_id, block_size)
    return jnp.sum(lse[: u.shape[0]]), (u, lse)


def _sum_lse_bwd(block_size, axis_name, residuals, g):
    u, lse = residuals
    keys, first_id = _keys(u, axis_name)  # re-gathered rather than kept: O(N D) either way
    num_rows, num_keys = u.shape[0], keys.shape[0]
    qb, qid = _tiles(u, block_size, first_id)
    kb, kid = _tiles(keys, block_size)
    lse_b = lse.reshape(qb.shape[0], block_size)
    row_weight = jnp.where(jnp.arange(qid.size).reshape(qid.shape) < num_rows, g, 0.0)  # no padding

    def row_block(du_keys, row):
        ur, ir, lr, wr = row

        def col_block(du_r, col):
            uc, ic = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            p = jnp.where(_tile_mask(ir, ic, num_keys), 0.0, jnp.exp(t - lr[:, None]))
            p = p * wr[:, None]
            du_r = du_r + jnp.dot(p, uc, precision=_PRECISION)
            return du_r, jnp.dot(p.T, ur, precision=_PRECISION)

        du_r, du_k = jax.lax.scan(col_block, jnp.zeros_like(ur), (kb, kid))
        return du_keys + du_k, du_r

    du_keys, du_rows = jax.lax.scan(row_block, jnp.zeros_like(kb), (qb, qid, lse_b, row_weight))
    du_keys = du_keys.reshape(-1, u.shape[1])[:num_keys]
    if axis_name is not None:  # every device's P^T u_query lands on the rows' owners
        du_keys = jax.lax.psum_scatter(du_keys, axis_name, tiled=True)
    return (du_rows.reshape(-1, u.shape[1])[:num_rows] + du_keys,)


_sum_lse.defvjp(_sum_lse_fwd, _sum_lse_bwd)


def _blockwise_terms(z1, z2, temperature, block_size, axis_name):
    """sum over the given anchors of (lse_i - positive logit_i); z1[i], z2[i] on the same device."""
    zn = _views(z1, z2)
    inv_sqrt_t = jax.lax.rsqrt(jnp.asarray(temperature, jnp.float32))
    sum_lse = _sum_lse(zn * inv_sqrt_t, min(block_size, zn.shape[0]), axis_name)
    return sum_lse - jnp.sum(_positive_logits(zn, temperature))


def nt_xent_blockwise(z1: jax.Array, z2: jax.Array, temperature, block_size: int = 512,
                      mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """`nt_xent` without the [2N, 2N] matrix: [block_size, block_size] tiles, forward and backward.

    Working memory is O(block_size^2 + N D); time is that of the naive loss plus one recomputation
    of the similarities in the backward pass (as in FlashAttention's recomputation). block_size
    need not divide 2N (the last tile is padded and masked).
    mesh: pass the training mesh when z1, z2 are sharded on 'data' so that each device computes only
    its own anchors' tiles (shard_map); without it XLA runs every tile on every device (same result).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    two_n = 2 * z1.shape[0]
    if mesh is None or mesh.shape[DATA_AXIS] == 1:
        return _blockwise_terms(z1, z2, temperature, block_size, None) / two_n
    if z1.shape[0] % mesh.shape[DATA_AXIS]:
        raise ValueError(f"The number of pairs ({z1.shape[0]}) is not divisible by the number of data "
                         f"devices ({mesh.shape[DATA_AXIS]}).")

    def local(a, b, t):
        # Local anchors are z1[rows] and z2[rows] of this device, so positives stay on-device; the
        # keys are gathered in device order, a permutation of the batch, which lse does not see.
        return jax.lax.psum(_blockwise_terms(a, b, t, block_size, DATA_AXIS), DATA_AXIS) / two_n

    return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P()), out_specs=P())(
        z1, z2, jnp.asarray(temperature, jnp.float32))


def contrastive_metrics(z1: jax.Array, z2: jax.Array, temperature, block_size: int = 512) -> dict:
    """SSL health diagnostics (no gradient), tiled like `nt_xent_blockwise`.

    pos_accuracy: fraction of the 2N anchors whose positive beats every one of its 2N - 2
        negatives (strictly; a collapsed encoder, where all similarities tie, scores 0).
    embedding_std: mean over dims of the per-dim std of the L2-normalised embeddings: about
        1/sqrt(D) when spread over the sphere, -> 0 on collapse.
    pos_cosine / neg_cosine: mean cosine similarity of positive pairs / of negative pairs.
    temperature is accepted for symmetry with the loss; rankings and cosines do not depend on it.
    """
    del temperature
    zn = jax.lax.stop_gradient(_views(z1, z2))
    two_n, _ = zn.shape
    n = two_n // 2
    block_size = min(block_size, two_n)
    pos = jnp.sum(zn * jnp.roll(zn, n, axis=0), axis=-1)  # [2N]
    ub, idx = _tiles(zn, block_size)

    def row_block(_, row):
        ur, ir = row
        partner = (ir + n) % two_n

        def col_block(best, col):
            uc, ic = col
            t = jnp.dot(ur, uc.T, precision=_PRECISION)
            excluded = _tile_mask(ir, ic, two_n) | (partner[:, None] == ic[None, :])
            return jnp.maximum(best, jnp.max(jnp.where(excluded, _MASKED, t), axis=1)), None

        best, _ = jax.lax.scan(col_block, jnp.full((block_size,), _MASKED, jnp.float32), (ub, idx))
        return None, best

    _, best_negative = jax.lax.scan(row_block, None, (ub, idx))
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
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != ignore_label
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    if class_weights is None:
        weights = valid.astype(jnp.float32)
    else:
        weights = jnp.where(valid, jnp.asarray(class_weights, jnp.float32)[safe_labels], 0.0)
    weight_sum = jnp.sum(weights)
    numerator = jnp.sum(weights * ce)
    loss = jnp.where(weight_sum > 0, numerator / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)
    return loss, weight_sum
