"""What a task (one training objective) gives the loop, and the pieces every task shares.

    task = tasks.get(config.task).build(ctx)      # ctx: Context, what the loop knows before the task
    state = sharding.init_sharded(task.init, mesh, rng)
    state, report = task.warm_start(state)         # fine-tuning: load a checkpoint's subtrees
    step = jax.jit(task.train_step, out_shardings=..., donate_argnums=0)
    state, metrics = step(state, batch)            # metrics: an instance of task.metrics (clu)
    scalars = task.evaluate(state)                 # every task.eval_every_steps and at the end
    results = task.final(state)                    # JSON-ready, into eval_results.json

A task module (lcssl/tasks/<name>.py) provides `USES_LABELS` (does the step read labels: then the
epoch is over config.label_fraction of the split), `default_config()` (its hyperparameters,
`config.<name>.*`) and `build(ctx) -> Task`. See docs/DESIGN.md, "Tasks".
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics

from lcssl import evaluate, models
from lcssl.errors import UserError

# XLA's RngBitGenerator instead of threefry: the same statistical quality for initialisers, dropout
# and augmentations, and programs that compile several times faster (threefry unrolls per draw).
RNG_IMPL = "rbg"


@flax.struct.dataclass
class TrainState:
    step: jax.Array         # int32 scalar: number of optimizer updates done
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array          # uint32 raw data of the base key (RNG_IMPL); see step_key
    # Arrays a task owns beside the model (BYOL's EMA target network); {} for most. Sharded,
    # checkpointed and resumed like the rest of the state.
    task_state: Any = flax.struct.field(default_factory=dict)


def step_key(state: TrainState) -> jax.Array:
    """The key of the step the state is at: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=RNG_IMPL), state.step)


@dataclasses.dataclass(frozen=True)
class Context:
    """What the loop knows before it builds a task: the config, the data and the devices."""
    config: ml_collections.ConfigDict
    card: Mapping[str, Any]                # dataset_card.json
    mesh: jax.sharding.Mesh
    model_cfg: ml_collections.ConfigDict   # config.model with the card's shapes (train.model_config_for)
    stats: Any                             # normalize.NormStats from the card
    augment_cfg: ml_collections.ConfigDict  # config.augment with the card's footprint and bands
    lr: optax.Schedule
    num_steps: int                         # optimizer updates of the whole run (schedules)
    eval_batches: Callable[[str], Iterable[Mapping[str, Any]]]  # split -> host batches (eval order)

    @property
    def class_names(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def num_dates(self) -> int:
        return int(self.card["sits"]["max_dates"])


def _no_warm_start(state):
    return state, None


def _nothing(state) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Task:
    """One objective, built for one run. Everything but `warm_start`, `evaluate` and `final` is pure.

    init(rng) -> TrainState                the fresh state (the loop jits it with out_shardings)
    train_step(state, batch) -> (state, metrics)   one update on a global sharded batch
    batch_keys                              host-batch fields the step reads (others stay on the host)
    transfer_keys                           top-level subtrees of the segmentation model (UTT) that a
                                            fine-tuning run loads from this task's checkpoint, found
                                            under params[transfer_prefix] (stored in the input spec)
    warm_start(state) -> (state, report)    before step 0 of a fresh run (not on resume); the report,
                                            if any, goes to loaded_weights.json
    evaluate(state) -> {tag: float}         periodic scalars ('probe/accuracy', 'val/miou', ...)
    best_metric                             a tag of evaluate's output: the loop keeps best/ by it
    final(state) -> dict                    results of the final (or best) state, JSON-ready
    """
    name: str
    model: Any
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, metrics.Collection]]
    metrics: type
    batch_keys: tuple[str, ...]
    transfer_keys: tuple[str, ...]
    transfer_prefix: str | None = None
    warm_start: Callable[[TrainState], tuple[TrainState, dict | None]] = _no_warm_start
    evaluate: Callable[[TrainState], dict] = _nothing
    eval_every_steps: int = 0               # 0: only after the last step
    best_metric: str | None = None
    final: Callable[[TrainState], dict] = _nothing


# ------------------------------------------------------------------------------------------------
# Shared by the tasks: optimizer, fresh state, update
# ------------------------------------------------------------------------------------------------

def make_optimizer(config, lr: optax.Schedule, encoder_keys=(),
                   finetune: ml_collections.ConfigDict | None = None) -> optax.GradientTransformation:
    """SGD / LARS / AdamW; weight decay and LARS trust ratio skip biases and norm scales (ndim 1).

    With `encoder_keys` (fine-tuning), finetune.finetune_mode (finetune: config.supervised) acts on
    those subtrees: 'linear' freezes them (zero updates), 'partial' trains them at
    finetune.encoder_lr_scale x the learning rate, 'full' like the rest.
    """
    opt = config.optimizer

    def decay_mask(tree):  # a function, not a tree: multi_transform hands each part a masked tree
        return jax.tree.map(lambda p: p.ndim > 1, tree)

    def build(schedule):
        if opt.name == "sgd":
            return optax.chain(optax.add_decayed_weights(opt.weight_decay, decay_mask),
                               optax.sgd(schedule, momentum=opt.momentum or None,
                                         nesterov=opt.nesterov))
        if opt.name == "lars":
            return optax.lars(schedule, weight_decay=opt.weight_decay, weight_decay_mask=decay_mask,
                              trust_ratio_mask=decay_mask, momentum=opt.momentum,
                              nesterov=opt.nesterov)
        if opt.name == "adamw":
            return optax.adamw(schedule, weight_decay=opt.weight_decay, mask=decay_mask)
        raise UserError(f"optimizer.name must be 'sgd', 'lars' or 'adamw', found {opt.name!r}")

    mode = finetune.finetune_mode if encoder_keys else "full"
    if mode == "full":
        return build(lr)

    def labels(params):  # top-level subtrees: the loaded ones are 'encoder', the rest 'head'
        return {k: ("encoder" if k in encoder_keys else "head") for k in params}

    if mode == "linear":
        encoder_tx = optax.set_to_zero()
    elif mode == "partial":
        encoder_tx = build(lambda step: finetune.encoder_lr_scale * lr(step))
    else:
        raise UserError(f"supervised.finetune_mode must be 'linear', 'partial' or 'full', found {mode!r}")
    return optax.multi_transform({"encoder": encoder_tx, "head": build(lr)}, labels)


def state_init(model, model_cfg, num_dates: int, tx: optax.GradientTransformation, seed: int,
               task_state: Callable[[Any], Any] | None = None) -> Callable[[jax.Array], TrainState]:
    """init(rng) -> a fresh TrainState of `model` (variables from zero inputs of the model's shapes);
    `task_state(params)`, if given, makes the state the task owns from the fresh params."""
    def init(rng):
        dummy = models.dummy_inputs(model_cfg, batch=2, num_dates=num_dates)
        variables = model.init({"params": rng, "dropout": rng}, *dummy, train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed, impl=RNG_IMPL)),
                          task_state=task_state(params) if task_state else {})

    return init


def apply_gradients(state: TrainState, grads, batch_stats, tx) -> TrainState:
    """The optimizer update: step + 1, new params, opt_state and batch-norm statistics."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)


def apply_model(model, params, batch_stats, x, train: bool):
    """model.apply on x's models.INPUT_KEYS; dropout from x['dropout_key'][0]."""
    return model.apply({"params": params, "batch_stats": batch_stats},
                       *(x[k] for k in models.INPUT_KEYS),
                       train=train, rngs={"dropout": x["dropout_key"][0]}, mutable=["batch_stats"])


def variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


# ------------------------------------------------------------------------------------------------
# Shared eval hook of the pre-training tasks
# ------------------------------------------------------------------------------------------------

def probe_config() -> ml_collections.ConfigDict:
    """config.probe: the online linear probe of every pre-training task (lcssl/evaluate.py): ridge
    regression on frozen pooled embeddings predicting each labelled patch's majority class,
    compared with always guessing the most frequent class."""
    c = ml_collections.ConfigDict()
    c.every_steps = 1000
    c.train_split = "train"
    c.eval_split = "val"
    c.examples = 1024
    c.ridge = 1e-2
    # Ridge chosen among these by 5-fold cross-validation on the probe's training patches (the
    # eval split stays unseen); empty: `ridge` as it is.
    c.ridge_candidates = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    return c


def linear_probe(ctx: Context, model) -> Callable[[TrainState], dict]:
    """probe(state) -> {'accuracy', 'baseline_accuracy', ...} of `model`'s 'embedding' output (a
    jitted forward over ctx.eval_batches), or {} when the card lacks a probe split."""
    c, splits = ctx.config.probe, ctx.card["splits"]
    embed_step = jax.jit(functools.partial(evaluate.embed_step, model=model, stats=ctx.stats,
                                           num_classes=len(ctx.class_names)))

    def probe(state) -> dict:
        if c.train_split not in splits or c.eval_split not in splits:
            return {}
        train = evaluate.collect_embeddings(embed_step, variables(state),
                                            ctx.eval_batches(c.train_split), ctx.mesh, c.examples)
        held_out = evaluate.collect_embeddings(embed_step, variables(state),
                                               ctx.eval_batches(c.eval_split), ctx.mesh, c.examples)
        return evaluate.linear_probe(*train, *held_out, len(ctx.class_names), c.ridge,
                                     tuple(c.ridge_candidates))

    return probe


def probe_scalars(result: Mapping[str, Any]) -> dict:
    """The probe's result as 'probe/...' scalars (none when the probe had no usable patch)."""
    if result.get("accuracy") is None:
        return {}
    return {f"probe/{k}": v for k, v in result.items()}
