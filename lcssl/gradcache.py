"""Gradient caching for contrastive losses (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"), and exact gradient accumulation for supervised losses.

NT-Xent couples every sample to every other one, so plain gradient accumulation would shrink the set
of negatives. GradCache keeps the loss on the full batch and only chunks the encoder:

  pass 1  embed each chunk with the parameters frozen (lax.map: one chunk's activations alive)
          -> z_all; loss and dL/dz_all on the whole batch (the loss only needs the embeddings)
  pass 2  re-embed each chunk under jax.vjp and pull dL/dz_chunk back to the parameters,
          summing over chunks (lax.scan)

The result equals `jax.value_and_grad` of the full-batch loss whenever the embedding of a sample
does not depend on the other samples of its chunk, at the cost of a second encoder forward pass.
`embed_fn` must be deterministic given (params, chunk): both passes must see the same z, so random
draws (dropout, augmentation) must come from keys carried inside the inputs.

Chunk layout on a mesh: the batch [B, ...] arrives sharded on 'data' (n shards of B/n rows). Chunk c
takes rows c*per .. (c+1)*per - 1 of *every* shard (per = B / (n * num_chunks)), so each device
chunks its own shard, every chunk spans all devices, and no rows move between devices.

Batch norm: in the chunked path train-mode statistics are those of one chunk of the global batch
(B / num_chunks samples, still reduced across all devices, as SimCLR's global BN), not of the whole
batch. The result is then the exact gradient of that chunked objective (tests/test_gradcache.py),
not of the full-batch one, and the two differ a lot at small chunks: on the tiny U-T&T SimCLR
model, 32 views, the gradient's relative error is 1.0 with 2 chunks (cosine 0.46) and 2.6 with 8
(bench/gradcache_bn.py; docs/BENCHMARKS.md, 2026-12-04). `aux` (e.g. updated batch_stats) is the
mean over chunks of each chunk's aux (integer leaves: the last chunk's). For the first batch norm
layer's running mean that is exactly the full-batch update; the running variance gets the mean of
the per-chunk variances (below the full-batch variance by the spread of the chunk means), and deeper
layers see inputs normalized per chunk, so their statistics differ too.
`accumulate_gradients` treats aux the same way.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcssl import flops
from lcssl.sharding import DATA_AXIS, num_data_shards

PyTree = Any


def _batch_size(tree: PyTree) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"All inputs must share one leading (batch) size; found {sorted(sizes)}.")
    return sizes.pop()


def split_chunks(tree: PyTree, num_chunks: int, mesh: Mesh | None = None) -> PyTree:
    """[B, ...] -> [num_chunks, B / num_chunks, ...]; on a mesh each chunk takes a slice of every shard.

    Without a mesh the chunks are contiguous row ranges.
    """
    shards = 1 if mesh is None else num_data_shards(mesh)
    batch = _batch_size(tree)
    if num_chunks < 1 or batch % (shards * num_chunks):
        raise ValueError(
            f"The batch ({batch}) must be divisible by data devices x chunks "
            f"({shards} x {num_chunks} = {shards * num_chunks})."
        )
    per = batch // (shards * num_chunks)

    def split(x):
        x = x.reshape(shards, num_chunks, per, *x.shape[1:]).swapaxes(0, 1)
        x = x.reshape(num_chunks, shards * per, *x.shape[3:])
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, DATA_AXIS)))
        return x

    return jax.tree.map(split, tree)


def merge_chunks(tree: PyTree, mesh: Mesh | None = None) -> PyTree:
    """Inverse of `split_chunks`: [num_chunks, B / num_chunks, ...] -> [B, ...] in the original order."""
    shards = 1 if mesh is None else num_data_shards(mesh)

    def merge(x):
        num_chunks, rows = x.shape[:2]
        x = x.reshape(num_chunks, shards, rows // shards, *x.shape[2:]).swapaxes(0, 1)
        x = x.reshape(num_chunks * rows, *x.shape[3:])
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA_AXIS)))
        return x

    return jax.tree.map(merge, tree)


def _mean_over_chunks(stacked: PyTree) -> PyTree:
    def reduce(x):
        return jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.inexact) else x[-1]

    return jax.tree.map(reduce, stacked)


def grad_cached_value_and_grad(
    embed_fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
    params: PyTree,
    inputs: PyTree,
    loss_fn: Callable[[PyTree], tuple[jax.Array, PyTree]],
    num_chunks: int,
    mesh: Mesh | None = None,
) -> tuple[tuple[jax.Array, PyTree, PyTree], PyTree]:
    """Value and parameter gradient of loss_fn(embed(inputs)) with the encoder run in chunks.

    embed_fn(params, chunk_inputs) -> (z, aux): z [b, ...] (a pytree is fine), aux anything.
    inputs: pytree of arrays with leading batch axis B. loss_fn(z_all) -> (loss, metrics).
    mesh: pass the training mesh when inputs are sharded on 'data' (see the module docstring).
    Returns ((loss, metrics, aux), grads), grads with the structure of params.
    """
    chunks = split_chunks(inputs, num_chunks, mesh)
    frozen = jax.lax.stop_gradient(params)
    z_chunks, aux_chunks = jax.lax.map(lambda chunk: embed_fn(frozen, chunk), chunks)
    z_all = merge_chunks(z_chunks, mesh)

    (loss, metrics), dz_all = jax.value_and_grad(loss_fn, has_aux=True)(z_all)
    dz_chunks = split_chunks(dz_all, num_chunks, mesh)

    def backprop_chunk(grads, xs):
        chunk, dz = xs
        # The forward of pass 1 again: lcssl.flops counts it as recomputation, not model FLOPs.
        with jax.named_scope(flops.RECOMPUTE_SCOPE):
            _, pullback = jax.vjp(lambda p: embed_fn(p, chunk)[0], params)
        (chunk_grads,) = pullback(dz)
        return jax.tree.map(jnp.add, grads, chunk_grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backprop_chunk, zeros, (chunks, dz_chunks))
    return (loss, metrics, _mean_over_chunks(aux_chunks)), grads


def accumulate_gradients(
    loss_and_grad_fn: Callable[[PyTree, PyTree], tuple[tuple[jax.Array, tuple[jax.Array, PyTree]], PyTree]],
    params: PyTree,
    batch: PyTree,
    num_microbatches: int,
    mesh: Mesh | None = None,
) -> tuple[tuple[jax.Array, jax.Array, PyTree], PyTree]:
    """Exact gradient accumulation for weighted-mean losses (supervised fine-tuning).

    loss_and_grad_fn(params, microbatch) -> ((loss, (weight, aux)), grads), i.e.
    `jax.value_and_grad(f, has_aux=True)` of an f returning (loss, (weight, aux)) where
    loss = numerator / weight (e.g. `weighted_cross_entropy`'s (loss, weight_sum)). Microbatches
    are combined as sum(weight_k * loss_k) / sum(weight_k), and likewise the gradients, which is the
    full-batch weighted mean even when microbatches hold different numbers of labelled pixels (a plain
    mean of microbatch losses would not be). With weight = 1 this is the plain mean. A batch without
    any weight gives loss 0 and zero gradients.
    Returns ((loss, total_weight, aux averaged over microbatches), grads).
    """
    microbatches = split_chunks(batch, num_microbatches, mesh)
    # Sums in float32 (float64 for float64 params: the tests' exact comparisons).
    acc_dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(params))

    def step(carry, microbatch):
        numerator, total_weight, grad_sum = carry
        (loss, (weight, aux)), grads = loss_and_grad_fn(params, microbatch)
        weight = jnp.asarray(weight, acc_dtype)
        grad_sum = jax.tree.map(lambda acc, g: acc + weight * g, grad_sum, grads)
        return (numerator + weight * loss, total_weight + weight, grad_sum), aux

    init = (jnp.zeros((), acc_dtype), jnp.zeros((), acc_dtype), jax.tree.map(jnp.zeros_like, params))
    (numerator, total_weight, grad_sum), aux = jax.lax.scan(step, init, microbatches)
    safe_weight = jnp.where(total_weight > 0, total_weight, 1.0)
    grads = jax.tree.map(lambda g: (g / safe_weight).astype(g.dtype), grad_sum)
    return (numerator / safe_weight, total_weight, _mean_over_chunks(aux)), grads
