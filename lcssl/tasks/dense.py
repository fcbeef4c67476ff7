"""Dense (pixel-level) contrastive pre-training, DenseCL (Wang et al. 2021) / PixPro (Xie et al.
2021) style, with the correspondence known from the augmentation: it pre-trains the aerial decoder
as well as the encoder, and fine-tuning loads both.

Two augmented views of each patch (lcssl/tasks/pretraining.py) go through the pre-training model with its dense head on the aerial
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

import jax
import ml_collections

from lcssl import losses, models
from lcssl.data import augment
from lcssl.errors import UserError
from lcssl.tasks import base, pretraining

USES_LABELS = False
# embedding_std: of the pixels, -> 0 on collapse.
HEALTH = ("dense_loss", "global_loss", "pos_accuracy", "pos_cosine", "valid_fraction", "embedding_std",
          "global_embedding_std")


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


def objective_loss(out, views, state, *, cfg, augment_cfg, mesh=None):
    """(1 - dense_weight) NT-Xent + dense_weight pixel InfoNCE between the cells of the two views
    that see the same ground (their correspondence from the views' geometry)."""
    geom1, geom2 = augment.view_geometry(views.key, views.batch, augment_cfg)
    match = augment.view_correspondence(geom1, geom2, (cfg.grid, cfg.grid))
    pairs = (match["match12"], match["valid12"], match["match21"], match["valid21"])
    f1, f2 = pretraining.split_views(out["dense_projection"])
    z1, z2 = pretraining.split_views(out["projection"])
    t = cfg.temperature
    if cfg.loss_impl == "naive":
        dense_loss = losses.dense_info_nce(f1, f2, *pairs, t)
        global_loss = losses.nt_xent(z1, z2, t)
    else:
        dense_loss = losses.dense_info_nce_blockwise(f1, f2, *pairs, t, cfg.block_size, mesh=mesh)
        global_loss = losses.nt_xent_blockwise(z1, z2, t, cfg.block_size, mesh=mesh)
    loss = (1.0 - cfg.dense_weight) * global_loss + cfg.dense_weight * dense_loss
    return loss, dict(losses.dense_metrics(f1, f2, *pairs), dense_loss=dense_loss,
                      global_loss=global_loss,
                      global_embedding_std=losses.embedding_std(jax.numpy.concatenate([z1, z2])))


def build(ctx: base.Context) -> base.Task:
    cfg = ctx.config.dense
    if cfg.loss_impl not in ("naive", "blockwise"):
        raise UserError(f"dense.loss_impl must be 'naive' or 'blockwise', found {cfg.loss_impl!r}")
    model_cfg = model_config(ctx.model_cfg, cfg.grid)
    return pretraining.build_task(
        ctx, "dense", functools.partial(objective_loss, cfg=cfg, augment_cfg=ctx.augment_cfg,
                                        mesh=ctx.mesh), HEALTH,
        model_cfg=model_cfg,
        # The decoder too: it is what this objective adds over the image-level ones.
        transfer_keys=models.encoder_keys(model_cfg) + ("aerial_decoder",))
