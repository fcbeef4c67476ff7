"""VICReg pre-training (Bardes, Ponce & LeCun 2022): two augmented views of each patch, no negatives.

loss = invariance_weight * MSE(z1, z2) + variance_weight * variance hinge + covariance_weight *
off-diagonal covariance (lcssl.losses.vicreg), on the projector outputs. The variance and covariance
terms are statistics of the *global* batch: plain jnp reductions over the batch axis of the sharded
array, which GSPMD sums across devices (tested equal on 1 to 8 devices in tests/test_objectives.py).
VICReg's own projector is a 3-layer 8192-wide "expander" with batch norm; set model.projector
(hidden, out, num_layers, batch_norm) for it: the task uses whatever projector the config builds.
Health: the three terms, `embedding_std` of the normalised projections (-> 0 on collapse) and
raw_std, the per-dim std the variance hinge pushes towards 1.
The two views, the update and the probe are lcssl/tasks/pretraining.py's; fine-tuning loads the
backbone's encoder subtrees.
"""
import functools

import ml_collections

from lcssl import losses
from lcssl.tasks import base, pretraining

USES_LABELS = False
# embedding_std -> 0 on collapse; raw_std: the per-dim std the variance hinge pushes towards 1.
HEALTH = ("invariance", "variance", "covariance", "embedding_std", "raw_std")


def default_config() -> ml_collections.ConfigDict:
    """config.vicreg: the weights of the three terms (the paper's 25 / 25 / 1)."""
    c = ml_collections.ConfigDict()
    c.invariance_weight = 25.0
    c.variance_weight = 25.0
    c.covariance_weight = 1.0
    return c


def objective_loss(out, views, state, *, cfg):
    z1, z2 = pretraining.split_views(out["projection"])
    loss, _ = losses.vicreg(z1, z2, cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight)
    return loss, losses.vicreg_metrics(z1, z2)


def build(ctx: base.Context) -> base.Task:
    return pretraining.build_task(
        ctx, "vicreg", functools.partial(objective_loss, cfg=ctx.config.vicreg), HEALTH)
