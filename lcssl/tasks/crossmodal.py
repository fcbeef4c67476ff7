"""Cross-modal contrastive pre-training: the aerial patch and the Sentinel-2 series of the same place
are the positive pair (symmetric InfoNCE, as CLIP, Radford et al. 2021; the cross-modal term of
OMNISat-style multimodal pre-training), every other place of the global batch is a negative.

The model is the SimCLR model with per-modality heads (model.projector.per_modality, forced on here,
'utt' only): 'aerial_projection' comes from the aerial encoder's deepest level *before* fusion and
'sits_projection' from the U-TAE map, so neither branch sees the other modality and the task is not
trivially solved through the fusion. Two augmented views of each patch go through the model
together; the cross-modal term pairs view 1's aerial with view 2's series and view 2's aerial with
view 1's series (mean of the two). Optional intra-modal SimCLR terms (NT-Xent between the two
views' aerial projections, and between their series projections) are added with the weights
`crossmodal.aerial_weight` and `crossmodal.sits_weight` (0: off).
Health: cross-modal positive accuracy (the series of the same place ranks first among the batch's
series, and vice versa), each modality's embedding std (-> 0 on collapse), positive cosine.
Fine-tuning loads the aerial encoder and the U-TAE; the fusion is not trained by this objective and
starts fresh.
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
TRANSFER_KEYS = ("aerial_encoder", "utae")


def default_config() -> ml_collections.ConfigDict:
    """config.crossmodal: temperature, loss_impl 'naive' | 'blockwise' (tiles of block_size rows,
    each device its own rows), and the weights of the optional intra-modal SimCLR terms."""
    c = ml_collections.ConfigDict()
    c.temperature = 0.1
    c.loss_impl = "naive"
    c.block_size = 256
    c.aerial_weight = 0.0
    c.sits_weight = 0.0
    return c


@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    cross_loss: metrics.Average.from_output("cross_loss")
    pos_accuracy: metrics.Average.from_output("pos_accuracy")
    aerial_embedding_std: metrics.Average.from_output("aerial_embedding_std")  # -> 0 on collapse
    sits_embedding_std: metrics.Average.from_output("sits_embedding_std")
    pos_cosine: metrics.Average.from_output("pos_cosine")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


def model_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's model config with the per-modality heads on; a clear error for a one-modality model."""
    if model_cfg.variant != "utt":
        raise UserError(f"config.task='crossmodal' needs both modalities: set --config.model.variant=utt "
                         f"(found {model_cfg.variant!r})")
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.projector.per_modality = True
    return cfg


def train_step(state: base.TrainState, batch, *, model, tx, stats, augment_cfg, task_cfg, lr,
               mesh=None) -> tuple[base.TrainState, Metrics]:
    """One cross-modal update on a global batch of B places (2B views)."""
    aug_key, drop_key = jax.random.split(base.step_key(state))
    view1, view2 = augment.simclr_views(aug_key, normalize.normalize(batch, stats), augment_cfg)
    inputs = {k: interleave(view1[k], view2[k]) for k in models.INPUT_KEYS}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["aerial"].shape[0])
    t = task_cfg.temperature

    def cross(a, s):
        if task_cfg.loss_impl == "naive":
            return losses.cross_modal_info_nce(a, s, t)
        if task_cfg.loss_impl == "blockwise":
            return losses.cross_modal_info_nce_blockwise(a, s, t, task_cfg.block_size, mesh=mesh)
        raise UserError(f"crossmodal.loss_impl must be 'naive' or 'blockwise', "
                         f"found {task_cfg.loss_impl!r}")

    def intra(z1, z2):
        if task_cfg.loss_impl == "naive":
            return losses.nt_xent(z1, z2, t)
        return losses.nt_xent_blockwise(z1, z2, t, task_cfg.block_size, mesh=mesh)

    def views(z):  # [2B, D] interleaved -> view 1, view 2 [B, D]
        z = z.reshape(-1, 2, z.shape[-1])
        return z[:, 0], z[:, 1]

    def loss_fn(params):
        out, mutated = base.apply_model(model, params, state.batch_stats, inputs, train=True)
        a1, a2 = views(out["aerial_projection"])
        s1, s2 = views(out["sits_projection"])
        cross_loss = 0.5 * (cross(a1, s2) + cross(a2, s1))
        loss = cross_loss
        if task_cfg.aerial_weight:
            loss = loss + task_cfg.aerial_weight * intra(a1, a2)
        if task_cfg.sits_weight:
            loss = loss + task_cfg.sits_weight * intra(s1, s2)
        health = losses.cross_modal_metrics(a1, s2, task_cfg.block_size)
        return loss, (dict(health, cross_loss=cross_loss), mutated["batch_stats"])

    (loss, (health, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = base.apply_gradients(state, grads, batch_stats, tx)
    return new_state, Metrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **health)


def build(ctx: base.Context) -> base.Task:
    config = ctx.config
    model_cfg = model_config(ctx.model_cfg)
    model = models.build_ssl_model(model_cfg)
    tx = base.make_optimizer(config, ctx.lr)
    probe = base.linear_probe(ctx, model)
    return base.Task(
        name="crossmodal", model=model,
        init=base.state_init(model, model_cfg, ctx.num_dates, tx, config.seed),
        train_step=functools.partial(train_step, model=model, tx=tx, stats=ctx.stats,
                                     augment_cfg=ctx.augment_cfg, task_cfg=config.crossmodal,
                                     lr=ctx.lr, mesh=ctx.mesh),
        metrics=Metrics,
        batch_keys=models.INPUT_KEYS,
        transfer_keys=TRANSFER_KEYS, transfer_prefix="backbone",
        evaluate=lambda state: base.probe_scalars(probe(state)),
        eval_every_steps=config.probe.every_steps,
        final=lambda state: {"probe": probe(state)})
