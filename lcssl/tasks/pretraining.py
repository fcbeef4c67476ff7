"""What every pre-training task shares: two augmented views in, one update, the online probe out.

A pre-training objective (simclr.py, crossmodal.py, vicreg.py, dense.py, byol.py,
masked_dates.py) is its loss on the model's outputs, the health scalars it logs beside the loss,
and its config; `build_task` makes the rest:

    views = two_view_inputs(state, batch, stats, augment_cfg)   # [2B] interleaved, dropout keys
    views = prepare_views(views)                                # a task's own change, e.g. hiding dates
    out = model.apply(params, views.inputs)                     # PretrainModel: the two views together
    loss, health = objective_loss(out, views, state)            # the objective's own part
    state = apply_gradients(...); state.task_state = update_task_state(old, new)   # e.g. an EMA
    metrics: loss, grad_norm, learning_rate, *health             # clu Collection (metrics_for)

The two views of each patch go through the model together ([2B], interleaved so that no row
moves between devices), so batch norm sees both views; a loss splits them back with split_views.
Fine-tuning loads the backbone's encoder subtrees unless the objective names others.

Negatives (`<task>.negatives` of the contrastive tasks, `negative_zones`): 'all', every other patch
of the global batch; 'same_zone', only the patches of the anchor's own zone (the host batch's
`zone` index, both views of a patch share it), DARLING's in-domain negatives (Zhang et al. 2022,
"Towards Unsupervised Domain Generalization"): the nuisance a zone's patches share (acquisition
dates, clouds, radiometry) then cannot separate an anchor from its negatives.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from lcssl import gradcache, models
from lcssl.data import augment, normalize, pipeline
from lcssl.errors import UserError
from lcssl.tasks import base

# (model outputs, views, state before the update) -> (scalar loss, {health name: scalar})
ObjectiveLoss = Callable[[Mapping[str, jax.Array], "Views", base.TrainState],
                         tuple[jax.Array, Mapping[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Views:
    """The step's two augmented views of a global batch of B patches.

    inputs: the model inputs (models.INPUT_KEYS) of both views interleaved [2B, ...] (rows
            view1[0], view2[0], view1[1], ...), and 'dropout_key' [2B] per row
    key:    the augmentation key (augment.view_geometry(key, batch, cfg) gives the views' geometry)
    batch:  the normalised batch the views were drawn from [B, ...] (with 'zone' [B] when the
            task's batch_keys ask for it)
    targets: what a task's prepare_views set aside for its loss before changing the inputs (the
            hidden dates and their values for masked_dates); {} for most tasks
    """
    inputs: dict[str, jax.Array]
    key: jax.Array
    batch: dict[str, jax.Array]
    targets: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, ...], [B, ...] -> [2B, ...] with rows a0, b0, a1, b1, ...: each device keeps its rows."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def split_views(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2B, ...] interleaved -> view 1, view 2 [B, ...] (the inverse of interleave)."""
    z = z.reshape((-1, 2) + z.shape[1:])
    return z[:, 0], z[:, 1]


def two_view_inputs(state: base.TrainState, batch, stats, augment_cfg) -> Views:
    """The step key -> two augmented views of the normalised batch, interleaved, with dropout keys."""
    aug_key, drop_key = jax.random.split(base.step_key(state))
    normalized = normalize.normalize(batch, stats)
    view1, view2 = augment.two_views(aug_key, normalized, augment_cfg)
    inputs = {k: interleave(view1[k], view2[k]) for k in models.INPUT_KEYS}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["aerial"].shape[0])
    return Views(inputs=inputs, key=aug_key, batch=normalized)


NEGATIVES = ("all", "same_zone")


def negatives_batch_keys(ctx: base.Context, task: str) -> tuple[str, ...]:
    """The host-batch fields beyond the model inputs that config.<task>.negatives needs: ('zone',)
    for 'same_zone', () for 'all'. A UserError for another value, or for a dataset card that lists
    no zones for the training split."""
    negatives = ctx.config[task].negatives
    if negatives not in NEGATIVES:
        raise UserError(f"{task}.negatives must be 'all' or 'same_zone', found {negatives!r}")
    if negatives == "all":
        return ()
    if pipeline.zone_names(ctx.card, ctx.config.split) is None:
        raise UserError(f"{task}.negatives='same_zone' needs the zones of split {ctx.config.split!r}, which "
                        f"{ctx.config.data_dir}/dataset_card.json does not list; re-run the "
                        "`python -m data_prep build` command that made it, or set "
                        f"--config.{task}.negatives=all")
    return ("zone",)


def negative_zones(views: Views, negatives: str) -> jax.Array | None:
    """The zone index [B] of each patch of the views with same-zone negatives, None with 'all'."""
    return views.batch["zone"] if negatives == "same_zone" else None


def metrics_for(*health: str) -> type:
    """The clu Collection of a pre-training task: loss, grad_norm, learning_rate and its health
    scalars (averaged over the steps between two log lines)."""
    return clu_metrics.Collection.create(
        loss=clu_metrics.Average.from_output("loss"),
        grad_norm=clu_metrics.Average.from_output("grad_norm"),
        learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
        **{name: clu_metrics.Average.from_output(name) for name in health})


def train_step(state: base.TrainState, batch, *, model, tx, stats, augment_cfg, lr,
               objective_loss: ObjectiveLoss, metrics: type, outputs: tuple[str, ...] | None = None,
               grad_chunks: int = 0, update_task_state=None, prepare_views=None, mesh=None):
    """One update on a global batch of B patches (2B views through the model together).

    outputs: the model outputs objective_loss reads (None: all). grad_chunks > 0: gradient caching
    (lcssl.gradcache) with the model run in that many chunks; the loss then sees only `outputs`.
    update_task_state(old_state, new_state) -> the new task_state, after the optimizer update.
    prepare_views(views) -> views: the task's change to the inputs before the forward.
    """
    views = two_view_inputs(state, batch, stats, augment_cfg)
    if prepare_views is not None:
        views = prepare_views(views)

    def forward(params, x):
        out, mutated = base.apply_model(model, params, state.batch_stats, x, train=True)
        if outputs is not None:
            out = {k: out[k] for k in outputs}
        return out, mutated["batch_stats"]

    def objective(out):
        return objective_loss(out, views, state)

    if grad_chunks:
        (loss, health, batch_stats), grads = gradcache.grad_cached_value_and_grad(
            forward, state.params, views.inputs, objective, grad_chunks, mesh)
    else:
        def loss_fn(params):
            out, batch_stats = forward(params, views.inputs)
            loss, health = objective(out)
            return loss, (health, batch_stats)

        (loss, (health, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = base.apply_gradients(state, grads, batch_stats, tx)
    if update_task_state is not None:
        new_state = new_state.replace(task_state=update_task_state(state, new_state))
    return new_state, metrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **health)


def build_task(ctx: base.Context, name: str, objective_loss: ObjectiveLoss, health: tuple[str, ...],
               *, model_cfg=None, transfer_keys: tuple[str, ...] | None = None,
               outputs: tuple[str, ...] | None = None, grad_chunks: int = 0,
               init_task_state: Callable[[Any], Any] | None = None,
               update_task_state=None, prepare_views: Callable[[Views], Views] | None = None,
               extra_batch_keys: tuple[str, ...] = ()) -> base.Task:
    """The Task of a pre-training objective: PretrainModel of `model_cfg` (default: the run's),
    the config's optimizer, train_step above, the online linear probe as evaluate and final, and
    fine-tuning loading `transfer_keys` (default: the encoder) from params['backbone'].
    init_task_state(params) -> the task's own state at step 0 (see base.TrainState.task_state).
    prepare_views(views) -> views: changes the two views' inputs before the forward, keeping what
    the loss needs in views.targets (masked_dates hides dates from the encoder).
    extra_batch_keys: host-batch fields the loss reads from views.batch beyond the model inputs
    (negatives_batch_keys)."""
    config = ctx.config
    model_cfg = model_cfg or ctx.model_cfg
    model = models.build_ssl_model(model_cfg)
    tx = base.make_optimizer(config, ctx.lr)
    probe = base.linear_probe(ctx, model)
    metrics = metrics_for(*health)
    return base.Task(
        name=name, model=model,
        init=base.state_init(model, model_cfg, ctx.num_dates, tx, config.seed, init_task_state),
        train_step=functools.partial(
            train_step, model=model, tx=tx, stats=ctx.stats, augment_cfg=ctx.augment_cfg,
            lr=ctx.lr, objective_loss=objective_loss, metrics=metrics, outputs=outputs,
            grad_chunks=grad_chunks, update_task_state=update_task_state,
            prepare_views=prepare_views, mesh=ctx.mesh),
        metrics=metrics,
        # Never the label: it stays off the host->device link.
        batch_keys=(*models.INPUT_KEYS, *extra_batch_keys),
        transfer_keys=transfer_keys or models.encoder_keys(model_cfg), transfer_prefix="backbone",
        evaluate=lambda state: base.probe_scalars(probe(state)),
        eval_every_steps=config.probe.every_steps,
        final=lambda state: {"probe": probe(state)})
