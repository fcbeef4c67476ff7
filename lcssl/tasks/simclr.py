"""SimCLR pre-training (Chen et al. 2020): NT-Xent between two augmented views of each patch.

NT-Xent runs over the *global* batch (every anchor has all 2B - 2 negatives of all devices), naive,
blockwise (each device computes only its own anchors' tiles, under shard_map on the mesh) or with
gradient caching (`simclr.loss_impl`). `simclr.negatives='same_zone'` keeps in each anchor's
denominator its positive and only the negatives of its own zone (both views of the other patches of
that zone; DARLING's in-domain negatives, Zhang et al. 2022, lcssl/tasks/pretraining.py); the loss
is still the mean over the global batch, and pos_accuracy ranks the positive against those
negatives only. The two views, the update and the probe are lcssl/tasks/pretraining.py's.
Fine-tuning loads the backbone's encoder subtrees; the projector stays behind.
"""
import functools

import ml_collections

from lcssl import losses
from lcssl.errors import UserError
from lcssl.tasks import base, pretraining

USES_LABELS = False
HEALTH = ("pos_accuracy", "embedding_std", "pos_cosine", "neg_cosine")  # embedding_std -> 0 on collapse


def default_config() -> ml_collections.ConfigDict:
    """config.simclr: temperature, loss_impl 'naive' | 'blockwise' | 'gradcache', block_size (rows
    of the logits per block), num_chunks (gradcache), negatives 'all' (every other patch of the
    global batch) | 'same_zone' (only those of the anchor's zone: DARLING's in-domain negatives)."""
    c = ml_collections.ConfigDict()
    c.temperature = 0.1
    c.loss_impl = "naive"
    c.block_size = 256
    c.num_chunks = 4
    c.negatives = "all"
    return c


def objective_loss(out, views, state, *, cfg, mesh=None):
    """NT-Xent of the two views' projections, and the contrastive health scalars."""
    z1, z2 = pretraining.split_views(out["projection"])
    zones = pretraining.negative_zones(views, cfg.negatives)
    if cfg.loss_impl == "naive":
        loss = losses.nt_xent(z1, z2, cfg.temperature, zones=zones)
    else:
        loss = losses.nt_xent_blockwise(z1, z2, cfg.temperature, cfg.block_size, mesh=mesh, zones=zones)
    return loss, losses.contrastive_metrics(z1, z2, cfg.temperature, cfg.block_size, zones=zones)


def build(ctx: base.Context) -> base.Task:
    cfg = ctx.config.simclr
    if cfg.loss_impl not in ("naive", "blockwise", "gradcache"):
        raise UserError(f"simclr.loss_impl must be 'naive', 'blockwise' or 'gradcache', "
                        f"found {cfg.loss_impl!r}")
    return pretraining.build_task(
        ctx, "simclr", functools.partial(objective_loss, cfg=cfg, mesh=ctx.mesh), HEALTH, outputs=("projection",),
        grad_chunks=cfg.num_chunks if cfg.loss_impl == "gradcache" else 0,
        extra_batch_keys=pretraining.negatives_batch_keys(ctx, "simclr"))
