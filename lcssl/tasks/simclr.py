"""SimCLR pre-training (Chen et al. 2020): NT-Xent between two augmented views of each patch.

The two views of each patch go through the SimCLR model together ([2B], interleaved so that no row
moves between devices) so batch norm sees both views; NT-Xent runs over the *global* batch (every
anchor has all 2B - 2 negatives of all devices), naive, blockwise (each device computes only its
own anchors' tiles, under shard_map on the mesh) or with gradient caching (`simclr.loss_impl`).
Fine-tuning loads the backbone's encoder subtrees; the projector stays behind.
"""
import functools

import flax
import jax
import ml_collections
import optax
from clu import metrics

from lcssl import gradcache, losses, models
from lcssl.data import augment, normalize
from lcssl.errors import UserError
from lcssl.tasks import base

USES_LABELS = False


def default_config() -> ml_collections.ConfigDict:
    """config.simclr: temperature, loss_impl 'naive' | 'blockwise' | 'gradcache', block_size (rows
    of the logits per block), num_chunks (gradcache)."""
    c = ml_collections.ConfigDict()
    c.temperature = 0.1
    c.loss_impl = "naive"
    c.block_size = 256
    c.num_chunks = 4
    return c


# clu reads these annotations at run time: no `from __future__ import annotations` in this module.
@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    pos_accuracy: metrics.Average.from_output("pos_accuracy")
    embedding_std: metrics.Average.from_output("embedding_std")  # -> 0 on collapse
    pos_cosine: metrics.Average.from_output("pos_cosine")
    neg_cosine: metrics.Average.from_output("neg_cosine")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, ...], [B, ...] -> [2B, ...] with rows a0, b0, a1, b1, ...: each device keeps its rows."""
    return jax.numpy.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def train_step(state: base.TrainState, batch, *, model, tx, stats, augment_cfg, simclr_cfg, lr,
               mesh=None) -> tuple[base.TrainState, Metrics]:
    """One SimCLR update on a global batch of B patches (2B views)."""
    aug_key, drop_key = jax.random.split(base.step_key(state))
    view1, view2 = augment.simclr_views(aug_key, normalize.normalize(batch, stats), augment_cfg)
    inputs = {k: interleave(view1[k], view2[k]) for k in models.INPUT_KEYS}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["aerial"].shape[0])
    temperature = simclr_cfg.temperature

    def embed(params, x):
        out, mutated = base.apply_model(model, params, state.batch_stats, x, train=True)
        return out["projection"], mutated["batch_stats"]

    def contrast(z):  # z [2B, D] interleaved -> the two views [B, D] each
        z = z.reshape(-1, 2, z.shape[-1])
        z1, z2 = z[:, 0], z[:, 1]
        if simclr_cfg.loss_impl == "naive":
            loss = losses.nt_xent(z1, z2, temperature)
        else:
            loss = losses.nt_xent_blockwise(z1, z2, temperature, simclr_cfg.block_size, mesh=mesh)
        return loss, losses.contrastive_metrics(z1, z2, temperature, simclr_cfg.block_size)

    if simclr_cfg.loss_impl == "gradcache":
        (loss, health, batch_stats), grads = gradcache.grad_cached_value_and_grad(
            embed, state.params, inputs, contrast, simclr_cfg.num_chunks, mesh)
    elif simclr_cfg.loss_impl in ("naive", "blockwise"):
        def loss_fn(params):
            z, batch_stats = embed(params, inputs)
            loss, health = contrast(z)
            return loss, (health, batch_stats)
        (loss, (health, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    else:
        raise UserError(f"simclr.loss_impl must be 'naive', 'blockwise' or 'gradcache', "
                         f"found {simclr_cfg.loss_impl!r}")
    new_state = base.apply_gradients(state, grads, batch_stats, tx)
    return new_state, Metrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **health)


def build(ctx: base.Context) -> base.Task:
    config = ctx.config
    model = models.build_ssl_model(ctx.model_cfg)
    tx = base.make_optimizer(config, ctx.lr)
    probe = base.linear_probe(ctx, model)
    return base.Task(
        name="simclr", model=model,
        init=base.state_init(model, ctx.model_cfg, ctx.num_dates, tx, config.seed),
        train_step=functools.partial(train_step, model=model, tx=tx, stats=ctx.stats,
                                     augment_cfg=ctx.augment_cfg, simclr_cfg=config.simclr,
                                     lr=ctx.lr, mesh=ctx.mesh),
        metrics=Metrics,
        batch_keys=models.INPUT_KEYS,  # never the label: it stays off the host->device link
        transfer_keys=models.encoder_keys(ctx.model_cfg), transfer_prefix="backbone",
        evaluate=lambda state: base.probe_scalars(probe(state)),
        eval_every_steps=config.probe.every_steps,
        final=lambda state: {"probe": probe(state)})
