"""VICReg pre-training (Bardes, Ponce & LeCun 2022): two augmented views of each patch, no negatives.

loss = invariance_weight * MSE(z1, z2) + variance_weight * variance hinge + covariance_weight *
off-diagonal covariance (lcssl.losses.vicreg), on the projector outputs. The variance and covariance
terms are statistics of the *global* batch: plain jnp reductions over the batch axis of the sharded
array, which GSPMD sums across devices (tested equal on 1 to 8 devices in tests/test_objectives.py).
VICReg's own projector is a 3-layer 8192-wide "expander" with batch norm; set model.projector
(hidden, out, num_layers, batch_norm) for it: the task uses whatever projector the config builds.
Health: the three terms, `embedding_std` of the normalised projections (-> 0 on collapse) and
raw_std, the per-dim std the variance hinge pushes towards 1.
Fine-tuning loads the backbone's encoder subtrees.
"""
import functools

import flax
import jax
import ml_collections
import optax
from clu import metrics

from lcssl import losses, models
from lcssl.data import augment, normalize
from lcssl.tasks import base
from lcssl.tasks.simclr import interleave

USES_LABELS = False


def default_config() -> ml_collections.ConfigDict:
    """config.vicreg: the weights of the three terms (the paper's 25 / 25 / 1)."""
    c = ml_collections.ConfigDict()
    c.invariance_weight = 25.0
    c.variance_weight = 25.0
    c.covariance_weight = 1.0
    return c


# clu reads these annotations at run time: no `from __future__ import annotations` in this module.
@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    invariance: metrics.Average.from_output("invariance")
    variance: metrics.Average.from_output("variance")
    covariance: metrics.Average.from_output("covariance")
    embedding_std: metrics.Average.from_output("embedding_std")  # -> 0 on collapse
    raw_std: metrics.Average.from_output("raw_std")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


def train_step(state: base.TrainState, batch, *, model, tx, stats, augment_cfg, vicreg_cfg, lr
               ) -> tuple[base.TrainState, Metrics]:
    """One VICReg update on a global batch of B patches (2B views through the model together)."""
    aug_key, drop_key = jax.random.split(base.step_key(state))
    view1, view2 = augment.simclr_views(aug_key, normalize.normalize(batch, stats), augment_cfg)
    inputs = {k: interleave(view1[k], view2[k]) for k in models.INPUT_KEYS}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["aerial"].shape[0])

    def loss_fn(params):
        out, mutated = base.apply_model(model, params, state.batch_stats, inputs, train=True)
        z = out["projection"].reshape(-1, 2, out["projection"].shape[-1])
        z1, z2 = z[:, 0], z[:, 1]
        loss, _ = losses.vicreg(z1, z2, vicreg_cfg.invariance_weight, vicreg_cfg.variance_weight,
                                vicreg_cfg.covariance_weight)
        return loss, (losses.vicreg_metrics(z1, z2), mutated["batch_stats"])

    (loss, (health, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = base.apply_gradients(state, grads, batch_stats, tx)
    return new_state, Metrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **health)


def build(ctx: base.Context) -> base.Task:
    config = ctx.config
    model = models.build_ssl_model(ctx.model_cfg)
    tx = base.make_optimizer(config, ctx.lr)
    probe = base.linear_probe(ctx, model)
    return base.Task(
        name="vicreg", model=model,
        init=base.state_init(model, ctx.model_cfg, ctx.num_dates, tx, config.seed),
        train_step=functools.partial(train_step, model=model, tx=tx, stats=ctx.stats,
                                     augment_cfg=ctx.augment_cfg, vicreg_cfg=config.vicreg, lr=ctx.lr),
        metrics=Metrics,
        batch_keys=models.INPUT_KEYS,
        transfer_keys=models.encoder_keys(ctx.model_cfg), transfer_prefix="backbone",
        evaluate=lambda state: base.probe_scalars(probe(state)),
        eval_every_steps=config.probe.every_steps,
        final=lambda state: {"probe": probe(state)})
