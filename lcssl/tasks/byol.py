"""BYOL pre-training (Grill et al. 2020): the online network predicts the target network's
projection of the other view; the target is an exponential moving average of the online network.

Online: backbone -> projector -> predictor (models.PredictionHead, model.projector.predictor forced
on here). Target: backbone -> projector with the EMA weights, held in the state the task owns
(state.task_state['target'], sharded and checkpointed with the rest), run in training mode on the
same two views (its batch norm uses the batch's statistics; its running averages are not kept).
Loss (the paper's eq. 2, symmetrised): for each patch, the normalised MSE between the online
prediction of view 1 and the target projection of view 2, plus the same with the views swapped,
2 - 2 cos each, averaged over the global batch; no gradient reaches the target. After each update
target <- tau target + (1 - tau) online, with tau from `byol.base_momentum` (0.996) to 1 along a
cosine over the run's steps (the paper's section 3.2). Fine-tuning loads the online encoder.
"""
import jax
import jax.numpy as jnp
import ml_collections

from lcssl import losses, models
from lcssl.tasks import base, pretraining

USES_LABELS = False
# embedding_std of the online projections: -> 0 on collapse; pos_cosine: prediction vs target.
HEALTH = ("pos_cosine", "embedding_std", "target_momentum")


def default_config() -> ml_collections.ConfigDict:
    """config.byol: base_momentum, the EMA decay of the target network at step 0 (tau_base)."""
    c = ml_collections.ConfigDict()
    c.base_momentum = 0.996
    return c


def target_momentum(step, num_steps: int, base_momentum: float) -> jax.Array:
    """tau(k) = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at step 0, 1 at the last."""
    progress = jnp.minimum(step, num_steps) / max(num_steps, 1)
    return 1.0 - (1.0 - base_momentum) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """[B, D], [B, D] -> [B]: ||p / |p| - t / |t| ||^2 = 2 - 2 cos(p, t), per row."""
    p = prediction / jnp.linalg.norm(prediction, axis=-1, keepdims=True).clip(1e-12)
    t = target / jnp.linalg.norm(target, axis=-1, keepdims=True).clip(1e-12)
    return jnp.sum((p - t) ** 2, axis=-1)


def byol_loss(p1, p2, t1, t2) -> jax.Array:
    """Symmetrised BYOL loss of a global batch: mean(l(p1, t2) + l(p2, t1)); the targets constant."""
    t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
    return jnp.mean(regression_loss(p1, t2) + regression_loss(p2, t1))


def target_params(params) -> dict:
    """The target network's part of the online params: all but the predictor."""
    return {k: v for k, v in params.items() if k != "predictor"}


def build(ctx: base.Context) -> base.Task:
    cfg, num_steps = ctx.config.byol, ctx.num_steps
    model_cfg = ml_collections.ConfigDict(ctx.model_cfg.to_dict())
    model_cfg.projector.predictor = True
    target_model = models.build_ssl_model(model_cfg).clone(predictor=False)

    def objective_loss(out, views, state):
        target, _ = base.apply_model(target_model, state.task_state["target"], state.batch_stats,
                                     views.inputs, train=True)
        p1, p2 = pretraining.split_views(out["prediction"])
        t1, t2 = pretraining.split_views(target["projection"])
        loss = byol_loss(p1, p2, t1, t2)
        return loss, {
            "pos_cosine": 1.0 - loss / 4.0,  # each of the two terms is 2 - 2 cos
            "embedding_std": losses.embedding_std(out["projection"]),
            "target_momentum": target_momentum(state.step, num_steps, cfg.base_momentum)}

    def update_target(old, new):  # EMA of the updated online weights, tau of the step just taken
        tau = target_momentum(old.step, num_steps, cfg.base_momentum)
        return {"target": jax.tree.map(lambda t, o: t + (1.0 - tau) * (o - t),
                                       old.task_state["target"], target_params(new.params))}

    return pretraining.build_task(
        ctx, "byol", objective_loss, HEALTH, model_cfg=model_cfg,
        init_task_state=lambda params: {"target": target_params(params)},
        update_task_state=update_target)
