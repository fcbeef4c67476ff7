"""Cross-modal contrastive pre-training: the aerial patch and the Sentinel-2 series of the same place
are the positive pair (symmetric InfoNCE, as CLIP, Radford et al. 2021; the cross-modal term of
OMNISat-style multimodal pre-training), every other place of the global batch is a negative.

The model is the SimCLR model with per-modality heads (model.projector.per_modality, forced on here,
'utt' only): 'aerial_projection' comes from the aerial encoder's deepest level *before* fusion and
'sits_projection' from the U-TAE map, so neither branch sees the other modality and the task is not
trivially solved through the fusion. Two augmented views of each patch go through the model
together (lcssl/tasks/pretraining.py); the cross-modal term pairs view 1's aerial with view 2's series and view 2's aerial with
view 1's series (mean of the two). Optional intra-modal SimCLR terms (NT-Xent between the two
views' aerial projections, and between their series projections) are added with the weights
`crossmodal.aerial_weight` and `crossmodal.sits_weight` (0: off).
`crossmodal.negatives='same_zone'`: each anchor's negatives are only the other modality's rows of
its own zone (and, in the intra-modal terms, both views of the other patches of its zone):
DARLING's in-domain negatives (Zhang et al. 2022, lcssl/tasks/pretraining.py); the loss is still the
mean over the global batch, and pos_accuracy ranks the positive against those negatives only.
Health: cross-modal positive accuracy (the series of the same place ranks first among the batch's
series, and vice versa), each modality's embedding std (-> 0 on collapse), positive cosine.
Fine-tuning loads the aerial encoder and the U-TAE; the fusion is not trained by this objective and
starts fresh.
"""
import functools

import ml_collections

from lcssl import losses
from lcssl.errors import UserError
from lcssl.tasks import base, pretraining

USES_LABELS = False
TRANSFER_KEYS = ("aerial_encoder", "utae")
HEALTH = ("cross_loss", "pos_accuracy", "aerial_embedding_std", "sits_embedding_std", "pos_cosine")


def default_config() -> ml_collections.ConfigDict:
    """config.crossmodal: temperature, loss_impl 'naive' | 'blockwise' (tiles of block_size rows,
    each device its own rows), the weights of the optional intra-modal SimCLR terms, and negatives
    'all' (every other place of the global batch) | 'same_zone' (only those of the anchor's zone:
    DARLING's in-domain negatives)."""
    c = ml_collections.ConfigDict()
    c.temperature = 0.1
    c.loss_impl = "naive"
    c.block_size = 256
    c.aerial_weight = 0.0
    c.sits_weight = 0.0
    c.negatives = "all"
    return c


def model_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's model config with the per-modality heads on; a clear error for a one-modality model."""
    if model_cfg.variant != "utt":
        raise UserError(f"config.task='crossmodal' needs both modalities: set --config.model.variant=utt "
                         f"(found {model_cfg.variant!r})")
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.projector.per_modality = True
    return cfg


def objective_loss(out, views, state, *, cfg, mesh=None):
    """Symmetric cross-modal InfoNCE between one view's aerial and the other view's series, plus
    the optional intra-modal NT-Xent terms."""
    t = cfg.temperature
    zones = pretraining.negative_zones(views, cfg.negatives)

    def cross(a, s):
        if cfg.loss_impl == "naive":
            return losses.cross_modal_info_nce(a, s, t, zones=zones)
        return losses.cross_modal_info_nce_blockwise(a, s, t, cfg.block_size, mesh=mesh, zones=zones)

    def intra(z1, z2):
        if cfg.loss_impl == "naive":
            return losses.nt_xent(z1, z2, t, zones=zones)
        return losses.nt_xent_blockwise(z1, z2, t, cfg.block_size, mesh=mesh, zones=zones)

    a1, a2 = pretraining.split_views(out["aerial_projection"])
    s1, s2 = pretraining.split_views(out["sits_projection"])
    cross_loss = 0.5 * (cross(a1, s2) + cross(a2, s1))
    loss = cross_loss
    if cfg.aerial_weight:
        loss = loss + cfg.aerial_weight * intra(a1, a2)
    if cfg.sits_weight:
        loss = loss + cfg.sits_weight * intra(s1, s2)
    return loss, dict(losses.cross_modal_metrics(a1, s2, cfg.block_size, zones=zones), cross_loss=cross_loss)


def build(ctx: base.Context) -> base.Task:
    cfg = ctx.config.crossmodal
    if cfg.loss_impl not in ("naive", "blockwise"):
        raise UserError(f"crossmodal.loss_impl must be 'naive' or 'blockwise', found {cfg.loss_impl!r}")
    return pretraining.build_task(
        ctx, "crossmodal", functools.partial(objective_loss, cfg=cfg, mesh=ctx.mesh), HEALTH,
        model_cfg=model_config(ctx.model_cfg), transfer_keys=TRANSFER_KEYS,
        extra_batch_keys=pretraining.negatives_batch_keys(ctx, "crossmodal"))
