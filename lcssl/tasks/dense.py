"""Dense (pixel-level) contrastive pre-training, DenseCL (Wang et al. 2021) / PixPro (Xie et al.
2021) style, with the correspondence known from the augmentation: it pre-trains the aerial decoder
as well as the encoder, and fine-tuning loads both.

Two augmented views of each patch go through the SimCLR model with its dense head on the aerial
decoder's output (model.projector.dense, dense_source='decoder', forced on here; 'utt' or 'unet'),
average-pooled to a dense.grid x dense.grid grid first (the loss resolution). The geometry of the
two views (lcssl.data.augment.view_geometry: crop box, flips, rot90, from the step's augmentation
key) maps each grid cell of view 1 to the cell of view 2 that sees the same ground point; that pair
is positive, every other view-2 cell of the global batch a negative, cells that fall outside the
other view are no anchors (lcssl.losses.dense_info_nce; symmetric). As in DenseCL, a global
NT-Xent term on 'projection' is mixed in: loss = (1 - dense_weight) * global + dense_weight * dense.
Health: pixel positive accuracy (within the sample), positive cosine, share of cells with a
partner, pixel embedding std (-> 0 on collapse), and the global term's embedding std.
"""
import functools

import flax
import jax
import ml_collections
import optax
from clu import metrics

from lcssl import losses, models
from lcssl.data import augment, normalize
from lcssl.errors import UserError
from lcssl.tasks import base
from lcssl.tasks.simclr import interleave

USES_LABELS = False


def default_config() -> ml_collections.ConfigDict:
    """config.dense: temperature, loss_impl 'naive' | 'blockwise' (block_size rows per tile, each
    device its own rows), grid (cells per side of the loss resolution; divides the aerial size),
    dense_weight (DenseCL's lambda = 0.5)."""
    c = ml_collections.ConfigDict()
    c.temperature = 0.2  # DenseCL, MoCo v2's temperature
    c.loss_impl = "naive"
    c.block_size = 256
    c.grid = 8
    c.dense_weight = 0.5
    return c


@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    dense_loss: metrics.Average.from_output("dense_loss")
    global_loss: metrics.Average.from_output("global_loss")
    pos_accuracy: metrics.Average.from_output("pos_accuracy")
    pos_cosine: metrics.Average.from_output("pos_cosine")
    valid_fraction: metrics.Average.from_output("valid_fraction")
    embedding_std: metrics.Average.from_output("embedding_std")  # pixels; -> 0 on collapse
    global_embedding_std: metrics.Average.from_output("global_embedding_std")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


def model_config(model_cfg: ml_collections.ConfigDict, grid: int) -> ml_collections.ConfigDict:
    """The run's model config with the dense head on the decoder, pooled to grid x grid."""
    if model_cfg.variant not in ("utt", "unet"):
        raise UserError(f"config.task='dense' needs the aerial decoder: set --config.model.variant to "
                         f"'utt' or 'unet' (found {model_cfg.variant!r})")
    if grid < 1 or model_cfg.aerial_size % grid:
        raise UserError(f"config.dense.grid={grid} must be >= 1 and divide the aerial size "
                         f"{model_cfg.aerial_size}")
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.projector.dense = True
    cfg.projector.dense_source = "decoder"
    cfg.projector.dense_grid = grid
    return cfg


def train_step(state: base.TrainState, batch, *, model, tx, stats, augment_cfg, task_cfg, lr,
               mesh=None) -> tuple[base.TrainState, Metrics]:
    """One dense update on a global batch of B patches (2B views)."""
    aug_key, drop_key = jax.random.split(base.step_key(state))
    normalized = normalize.normalize(batch, stats)
    view1, view2 = augment.simclr_views(aug_key, normalized, augment_cfg)
    geom1, geom2 = augment.view_geometry(aug_key, normalized, augment_cfg)
    match = augment.view_correspondence(geom1, geom2, (task_cfg.grid, task_cfg.grid))
    pairs = (match["match12"], match["valid12"], match["match21"], match["valid21"])
    inputs = {k: interleave(view1[k], view2[k]) for k in models.INPUT_KEYS}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["aerial"].shape[0])
    t = task_cfg.temperature

    def views(z):  # [2B, ...] interleaved -> view 1, view 2 [B, ...]
        z = z.reshape((-1, 2) + z.shape[1:])
        return z[:, 0], z[:, 1]

    def loss_fn(params):
        out, mutated = base.apply_model(model, params, state.batch_stats, inputs, train=True)
        f1, f2 = views(out["dense_projection"])
        z1, z2 = views(out["projection"])
        if task_cfg.loss_impl == "naive":
            dense_loss = losses.dense_info_nce(f1, f2, *pairs, t)
            global_loss = losses.nt_xent(z1, z2, t)
        elif task_cfg.loss_impl == "blockwise":
            dense_loss = losses.dense_info_nce_blockwise(f1, f2, *pairs, t, task_cfg.block_size, mesh=mesh)
            global_loss = losses.nt_xent_blockwise(z1, z2, t, task_cfg.block_size, mesh=mesh)
        else:
            raise UserError(f"dense.loss_impl must be 'naive' or 'blockwise', found {task_cfg.loss_impl!r}")
        w = task_cfg.dense_weight
        loss = (1.0 - w) * global_loss + w * dense_loss
        health = dict(losses.dense_metrics(f1, f2, *pairs), dense_loss=dense_loss,
                      global_loss=global_loss,
                      global_embedding_std=losses.embedding_std(jax.numpy.concatenate([z1, z2])))
        return loss, (health, mutated["batch_stats"])

    (loss, (health, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = base.apply_gradients(state, grads, batch_stats, tx)
    return new_state, Metrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **health)


def build(ctx: base.Context) -> base.Task:
    config = ctx.config
    model_cfg = model_config(ctx.model_cfg, config.dense.grid)
    model = models.build_ssl_model(model_cfg)
    tx = base.make_optimizer(config, ctx.lr)
    probe = base.linear_probe(ctx, model)
    return base.Task(
        name="dense", model=model,
        init=base.state_init(model, model_cfg, ctx.num_dates, tx, config.seed),
        train_step=functools.partial(train_step, model=model, tx=tx, stats=ctx.stats,
                                     augment_cfg=ctx.augment_cfg, task_cfg=config.dense,
                                     lr=ctx.lr, mesh=ctx.mesh),
        metrics=Metrics,
        batch_keys=models.INPUT_KEYS,
        # The decoder too: it is what this objective adds over the image-level ones.
        transfer_keys=models.encoder_keys(model_cfg) + ("aerial_decoder",), transfer_prefix="backbone",
        evaluate=lambda state: base.probe_scalars(probe(state)),
        eval_every_steps=config.probe.every_steps,
        final=lambda state: {"probe": probe(state)})
