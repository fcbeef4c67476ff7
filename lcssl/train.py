"""The one training loop: SimCLR pre-training (`mode='ssl'`) and supervised training / fine-tuning.

Read top to bottom: config -> data -> model -> state -> step -> loop (log, eval, checkpoint).

    host batch (numpy, per host)  --host_batch_to_global-->  global batch sharded on 'data'
      --train step (jit, pure): normalize -> augment -> model -> loss -> grads -> optimizer-->
      new state (replicated), metrics (clu Collection)

SSL: the two views of each patch go through the SimCLR model together ([2B], interleaved so that no
row moves between devices) so batch norm sees both views; NT-Xent runs over the *global* batch
(jit + sharded inputs: every anchor has all 2B - 2 negatives of all devices), naive, blockwise or
with gradient caching (`ssl.loss_impl`). Supervised: flips/rot90, class-weighted cross-entropy on
the segmentation logits plus `aux_loss_weight` x the time-series branch's, optional exact gradient
accumulation. Fine-tuning copies exactly the encoder subtrees of an SSL checkpoint (`init_from`).

Resume is exact: the state holds the step and the base RNG, each step's randomness is
fold_in(rng, step) and the input pipeline is a pure function of (seed, step).
"""
import functools
import os
import signal
import time
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics, parameter_overview

from lcssl import checkpoint as ckpt_lib
from lcssl import evaluate, flops, gradcache, losses, models, sharding
from lcssl import workdir as workdir_lib
from lcssl.data import augment, normalize, pipeline

MODEL_KEYS = ("aerial", "sits", "dates", "sits_valid")
# XLA's RngBitGenerator instead of threefry: the same statistical quality for initialisers, dropout
# and augmentations, and programs that compile several times faster (threefry unrolls per draw).
RNG_IMPL = "rbg"


def step_key(state) -> jax.Array:
    """The key of the step the state is at: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=RNG_IMPL), state.step)


@flax.struct.dataclass
class TrainState:
    step: jax.Array         # int32 scalar: number of optimizer updates done
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array          # uint32 raw data of the base key (RNG_IMPL); see step_key


@flax.struct.dataclass
class SslMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    pos_accuracy: metrics.Average.from_output("pos_accuracy")
    embedding_std: metrics.Average.from_output("embedding_std")  # -> 0 on collapse
    pos_cosine: metrics.Average.from_output("pos_cosine")
    neg_cosine: metrics.Average.from_output("neg_cosine")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class SupervisedMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    ce: metrics.Average.from_output("ce")
    aux_ce: metrics.Average.from_output("aux_ce")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


# ------------------------------------------------------------------------------------------------
# Config -> derived values (pure)
# ------------------------------------------------------------------------------------------------

def model_config_for(model_cfg: ml_collections.ConfigDict, card: Mapping[str, Any]):
    """The model config with every data-dependent field taken from the dataset card."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.num_classes = len(card["classes"])
    cfg.aerial_bands = len(card["aerial"]["bands"])
    cfg.sits_bands = len(card["sits"]["bands"])
    cfg.aerial_size = int(card["aerial"]["size"])
    cfg.aerial_gsd_m = float(card["aerial"]["gsd_m"])
    cfg.sits_size = int(card["sits"]["size"])
    cfg.sits_gsd_m = float(card["sits"]["gsd_m"])
    cfg.footprint_px = cfg.aerial_size * cfg.aerial_gsd_m / cfg.sits_gsd_m
    return cfg


def schedule_lengths(config, card) -> tuple[int, int]:
    """(num_steps, steps_per_epoch) of the training split at config.batch_size."""
    split = card["splits"].get(config.split)
    if split is None:
        raise ValueError(f"split={config.split!r} is not in {config.data_dir}/dataset_card.json "
                         f"(splits: {sorted(card['splits'])}); set --config.split")
    fraction = config.label_fraction if config.mode == "supervised" else 1.0
    examples = max(1, int(round(split["num_examples"] * fraction)))
    steps_per_epoch = max(1, examples // config.batch_size)
    num_steps = config.num_steps or int(config.num_epochs * steps_per_epoch)
    return num_steps, steps_per_epoch


def learning_rate_schedule(config, num_steps: int, steps_per_epoch: int) -> optax.Schedule:
    peak = config.optimizer.learning_rate
    warmup = int(config.schedule.warmup_epochs * steps_per_epoch)
    if config.schedule.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1))
    if config.schedule.name == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.constant_schedule(peak)], [warmup])
    raise ValueError(f"schedule.name must be 'cosine' or 'constant', found {config.schedule.name!r}")


def make_optimizer(config, lr: optax.Schedule, params, encoder_keys=()) -> optax.GradientTransformation:
    """SGD / LARS / AdamW; weight decay and LARS trust ratio skip biases and norm scales (ndim 1).

    Fine-tuning modes act on the encoder subtrees: 'linear' freezes them (zero updates), 'partial'
    trains them at encoder_lr_scale x the learning rate, 'full' like the rest.
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
        raise ValueError(f"optimizer.name must be 'sgd', 'lars' or 'adamw', found {opt.name!r}")

    mode = config.finetune_mode
    if config.mode == "ssl" or mode == "full" or not encoder_keys:
        return build(lr)
    labels = {k: ("encoder" if k in encoder_keys else "head") for k in params}
    if mode == "linear":
        encoder_tx = optax.set_to_zero()
    elif mode == "partial":
        encoder_tx = build(lambda step: config.encoder_lr_scale * lr(step))
    else:
        raise ValueError(f"finetune_mode must be 'linear', 'partial' or 'full', found {mode!r}")
    return optax.multi_transform({"encoder": encoder_tx, "head": build(lr)}, labels)


def class_weights_for(config, card) -> np.ndarray | None:
    spec, k = config.class_weights, len(card["classes"])
    if spec == "none":
        return None
    if spec == "card":
        weights = card.get("class_weights")
        if weights is None:
            raise ValueError(f"class_weights='card' but {config.data_dir}/dataset_card.json has no "
                             "class_weights; rebuild the dataset or set --config.class_weights=none")
    else:
        weights = [float(w) for w in spec.split(",")]
    if len(weights) != k:
        raise ValueError(f"class_weights has {len(weights)} values but the dataset has {k} classes "
                         f"{card['classes']}")
    return np.asarray(weights, np.float32)


# ------------------------------------------------------------------------------------------------
# Steps (pure functions of arrays; jitted in `run`)
# ------------------------------------------------------------------------------------------------

def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, ...], [B, ...] -> [2B, ...] with rows a0, b0, a1, b1, ...: each device keeps its rows."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def _apply(model, params, batch_stats, x, train):
    return model.apply({"params": params, "batch_stats": batch_stats}, *(x[k] for k in MODEL_KEYS),
                       train=train, rngs={"dropout": x["dropout_key"][0]}, mutable=["batch_stats"])


def ssl_train_step(state: TrainState, batch, *, model, tx, stats, augment_cfg, ssl_cfg, lr,
                   mesh=None) -> tuple[TrainState, SslMetrics]:
    """One SimCLR update on a global batch of B patches (2B views)."""
    aug_key, drop_key = jax.random.split(step_key(state))
    view1, view2 = augment.simclr_views(aug_key, normalize.normalize(batch, stats), augment_cfg)
    inputs = {k: _interleave(view1[k], view2[k]) for k in MODEL_KEYS}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["aerial"].shape[0])
    temperature = ssl_cfg.temperature

    def embed(params, x):
        out, mutated = _apply(model, params, state.batch_stats, x, train=True)
        return out["projection"], mutated["batch_stats"]

    def contrast(z):  # z [2B, D] interleaved -> the two views [B, D] each
        z = z.reshape(-1, 2, z.shape[-1])
        z1, z2 = z[:, 0], z[:, 1]
        if ssl_cfg.loss_impl == "naive":
            loss = losses.nt_xent(z1, z2, temperature)
        else:
            loss = losses.nt_xent_blockwise(z1, z2, temperature, ssl_cfg.block_size)
        return loss, losses.contrastive_metrics(z1, z2, temperature, ssl_cfg.block_size)

    if ssl_cfg.loss_impl == "gradcache":
        (loss, health, batch_stats), grads = gradcache.grad_cached_value_and_grad(
            embed, state.params, inputs, contrast, ssl_cfg.num_chunks, mesh)
    elif ssl_cfg.loss_impl in ("naive", "blockwise"):
        def loss_fn(params):
            z, batch_stats = embed(params, inputs)
            loss, health = contrast(z)
            return loss, (health, batch_stats)
        (loss, (health, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    else:
        raise ValueError(f"ssl.loss_impl must be 'naive', 'blockwise' or 'gradcache', "
                         f"found {ssl_cfg.loss_impl!r}")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, SslMetrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **health)


def supervised_train_step(state: TrainState, batch, *, model, tx, stats, augment_cfg, class_weights,
                          aux_loss_weight: float, grad_accum_steps: int, frozen_keys=(), lr,
                          mesh=None) -> tuple[TrainState, SupervisedMetrics]:
    """One supervised update: weighted CE (+ aux) over the labelled pixels of the global batch."""
    aug_key, drop_key = jax.random.split(step_key(state))
    batch = augment.supervised_augment(aug_key, normalize.normalize(batch, stats), augment_cfg)
    inputs = {k: batch[k] for k in (*MODEL_KEYS, "label")}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["label"].shape[0])

    def loss_fn(params, x):
        out, mutated = _apply(model, params, state.batch_stats, x, train=True)
        ce, weight = losses.weighted_cross_entropy(out["logits"], x["label"], class_weights)
        aux_ce = jnp.zeros((), jnp.float32)
        if "aux_logits" in out:
            aux_ce, _ = losses.weighted_cross_entropy(out["aux_logits"], x["label"], class_weights)
        parts = {"ce": ce, "aux_ce": aux_ce}
        return ce + aux_loss_weight * aux_ce, (weight, (mutated["batch_stats"], parts))

    (loss, _, (batch_stats, parts)), grads = gradcache.accumulate_gradients(
        jax.value_and_grad(loss_fn, has_aux=True), state.params, inputs, grad_accum_steps, mesh)
    # A frozen (linear-probe) encoder keeps its batch-norm statistics too.
    batch_stats = {k: state.batch_stats[k] if k in frozen_keys else v for k, v in batch_stats.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, SupervisedMetrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **parts)


# ------------------------------------------------------------------------------------------------
# Side pieces of the loop
# ------------------------------------------------------------------------------------------------

def adapt_input_kernel(kernel: jax.Array, from_bands, to_bands) -> jax.Array:
    """A first-convolution kernel [h, w, len(from_bands), f] for input bands `to_bands`: the input
    channel of each band found by name in `from_bands` is copied, a new band's is zero (the network
    computes what it did on the shared bands and learns the new one from there), a band the data no
    longer has is dropped (standardised inputs average 0, so this is close to a zero input)."""
    from_bands, to_bands = list(from_bands), list(to_bands)
    if kernel.shape[2] != len(from_bands):
        raise ValueError(f"kernel has {kernel.shape[2]} input channels, the checkpoint's input spec "
                         f"names {len(from_bands)} bands {from_bands}")
    zero = jnp.zeros_like(kernel[:, :, 0])
    return jnp.stack([kernel[:, :, from_bands.index(b)] if b in from_bands else zero
                      for b in to_bands], axis=2)


def _adapt_band_kernels(params: dict, spec, card) -> dict:
    """Remaps models.INPUT_KERNELS by band name where the checkpoint's bands differ from the card's."""
    adapted = {}
    for modality, path in models.INPUT_KERNELS.items():
        want, have = list(spec[modality]["bands"]), list(card[modality]["bands"])
        node = params
        for key in path[:-1]:
            node = node.get(key, {})
        if want == have or path[-1] not in node:
            continue
        node[path[-1]] = adapt_input_kernel(node[path[-1]], want, have)
        adapted[modality] = {"kept": [b for b in have if b in want],
                             "new_zero": [b for b in have if b not in want],
                             "dropped": [b for b in want if b not in have]}
    return adapted


def load_pretrained_encoder(state: TrainState, init_from: str, encoder_keys, card, data_dir,
                            mesh, adapt_bands: bool = False) -> tuple[TrainState, dict]:
    """Copies exactly params/batch_stats[k] for k in encoder_keys from an SSL checkpoint's backbone;
    with adapt_bands, first remaps the first convolutions' input channels to the dataset's bands."""
    params, batch_stats, spec, step = ckpt_lib.load_encoder(
        init_from, encoder_keys, sharding=sharding.replicated(mesh))
    for warning in ckpt_lib.check_input_spec(spec, card, source=init_from, target=data_dir,
                                             adapt_bands=adapt_bands):
        logging.warning("init_from: %s", warning)
    adapted = {}
    if adapt_bands:
        params = jax.tree.map(lambda x: x, params)  # a copy of the containers, arrays shared
        adapted = _adapt_band_kernels(params, spec, card)
    for name, have, new in (("params", state.params, params),
                            ("batch_stats", state.batch_stats, batch_stats)):
        want = jax.tree.map(lambda x: (x.shape, x.dtype), {k: have[k] for k in new})
        found = jax.tree.map(lambda x: (x.shape, x.dtype), new)
        if want != found:
            raise ValueError(
                f"init_from={init_from}: the encoder {name} in the checkpoint do not fit this model "
                "(different model config?). Use the same --config.model.* as the pre-training run "
                f"(its model config is in the checkpoint's input_spec).")
    report = {
        "init_from": ckpt_lib.resolve_checkpoint_dir(init_from), "step": step,
        "loaded": [jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_leaves_with_path({"params": params, "batch_stats": batch_stats})],
        "new": sorted(k for k in state.params if k not in params),
        "adapted_bands": adapted,
    }
    logging.info("Fine-tuning from %s (step %d): loaded %d encoder arrays %s; new: %s",
                 report["init_from"], step, len(report["loaded"]), sorted(params), report["new"])
    return state.replace(params={**state.params, **params},
                         batch_stats={**state.batch_stats, **batch_stats}), report


def _summary(collection) -> dict[str, float]:
    return {k: float(evaluate.to_host(v)) for k, v in collection.compute().items()}


class _Preempted:
    """SIGTERM -> save a checkpoint at the end of a step, then exit; `check(step)` after each step.

    One process: a Python SIGTERM handler sets the flag. Several processes (jax.distributed): a
    scheduler may signal only some hosts, and a host that stopped alone would leave the others
    waiting in the checkpoint's collectives. JAX's preemption service catches SIGTERM on whichever
    host gets it and agrees with all of them on one step at which every host saves and stops
    (`multihost_utils.reached_preemption_sync_point`); a Python handler would take SIGTERM away
    from it, so none is installed there, and every host asks at every step.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting.")
        self.requested = True

    def check(self, step: int) -> bool:
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("Preemption notice (SIGTERM on some host): every host saves at "
                                "step %d, then exits.", step)
                self.requested = True
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as `config` says, writing logs, checkpoints and eval_results.json to `workdir`."""
    ssl = config.mode == "ssl"
    if config.mode not in ("ssl", "supervised"):
        raise ValueError(f"mode must be 'ssl' or 'supervised', found {config.mode!r}")
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lib.lock(workdir)  # one run per workdir; released in the final `finally`
    # Here, not at the top: clu's writers import TensorFlow (TensorBoard summaries), which the step
    # functions above must not need (the GPU machine and the benchmarks have no TensorFlow).
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.batch_size, mesh, "batch_size")
    logging.info("Mesh %s over %d processes", dict(mesh.shape), jax.process_count())

    # --- Data -------------------------------------------------------------------------------------
    card = pipeline.load_card(config.data_dir)
    num_steps, steps_per_epoch = schedule_lengths(config, card)
    stats = normalize.stats_from_card(card)
    model_cfg = model_config_for(config.model, card)
    augment_cfg = ml_collections.ConfigDict(config.augment.to_dict())
    augment_cfg.footprint_px = model_cfg.footprint_px
    augment_cfg.photometric_bands = tuple(
        i for i in augment_cfg.photometric_bands if i < model_cfg.aerial_bands)
    spec = ckpt_lib.input_spec(card, model_cfg.to_dict())
    class_names = list(card["classes"])
    num_classes = len(class_names)

    def train_batches(start_step):
        it = pipeline.make_train_iterator(
            config.data_dir, config.split, global_batch_size=config.batch_size, seed=config.seed,
            start_step=start_step, label_fraction=1.0 if ssl else config.label_fraction)
        for host_batch in it:
            if ssl:
                host_batch.pop("label", None)  # SSL never reads labels: keep them off the link
            yield host_batch

    def eval_batches(split):
        return pipeline.make_eval_iterator(config.data_dir, split,
                                           global_batch_size=config.eval_batch_size)

    # --- Model ------------------------------------------------------------------------------------
    model = models.build_ssl_model(model_cfg) if ssl else models.build_model(model_cfg)
    encoder_keys = models.encoder_keys(model_cfg)
    lr = learning_rate_schedule(config, num_steps, steps_per_epoch)

    # --- State (created sharded by a jitted init) ----------------------------------------------
    def init(rng):
        dummy = models.dummy_inputs(model_cfg, batch=2, num_dates=int(card["sits"]["max_dates"]))
        variables = model.init({"params": rng, "dropout": rng}, *dummy, train=False)
        params = variables["params"]
        tx = make_optimizer(config, lr, params, () if ssl else encoder_keys)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(config.seed, impl=RNG_IMPL)))

    rng = jax.random.key(config.seed + 1, impl=RNG_IMPL)
    abstract_state = jax.eval_shape(init, rng)
    state_shardings = sharding.state_shardings(abstract_state, mesh)
    tx = make_optimizer(config, lr, abstract_state.params, () if ssl else encoder_keys)

    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
    has_val = config.val_split in card["splits"]
    if not ssl and not has_val:
        logging.warning("No %r split in %s: no validation, the final weights are evaluated.",
                        config.val_split, config.data_dir)
    best = None if ssl or not has_val else ckpt_lib.Checkpoints(os.path.join(workdir, "best"), keep=1,
                                                 best_metric="val_miou")
    progress = {"seed": config.seed, "split": config.split, "global_batch_size": config.batch_size,
                "label_fraction": config.label_fraction, "num_steps": num_steps}
    start_step = checkpoints.latest_step()
    if start_step is not None:  # resume: any device count; arrays re-laid out on this mesh
        workdir_lib.check_resume(checkpoints, start_step, spec, config.data_dir)  # same data, model
        state, _, saved = checkpoints.restore(
            start_step, ckpt_lib.abstract_like(abstract_state, state_shardings))
        changed = {k: (saved.get(k), v) for k, v in progress.items()
                   if k != "num_steps" and saved.get(k) != v}
        if changed:
            raise ValueError(f"Cannot resume {workdir} exactly: the data order depends on {changed} "
                             "(checkpoint, now). Use the checkpoint's values or a new --workdir.")
        logging.info("Resumed from %s at step %d", checkpoints.directory, start_step)
    else:
        start_step = 0
        state = sharding.init_sharded(init, mesh, rng)
        if not ssl and config.init_from:
            state, report = load_pretrained_encoder(state, config.init_from, encoder_keys, card,
                                                    config.data_dir, mesh, config.adapt_bands)
            ckpt_lib.write_json(os.path.join(workdir, "loaded_weights.json"), report)
    parameter_overview.log_parameter_overview(state.params, include_stats=jax.process_count() == 1)
    logging.info("Model: %s parameters", f"{models.count_params(state.params):,}")
    workdir_lib.write_config(workdir, config, start_step)  # config.json stays the first start's

    # --- Steps --------------------------------------------------------------------------------------
    if ssl:
        step_fn = functools.partial(ssl_train_step, model=model, tx=tx, stats=stats,
                                    augment_cfg=augment_cfg, ssl_cfg=config.ssl, lr=lr, mesh=mesh)
    else:
        step_fn = functools.partial(
            supervised_train_step, model=model, tx=tx, stats=stats, augment_cfg=augment_cfg,
            class_weights=class_weights_for(config, card), aux_loss_weight=config.aux_loss_weight,
            grad_accum_steps=config.grad_accum_steps, lr=lr, mesh=mesh,
            frozen_keys=encoder_keys if config.finetune_mode == "linear" and config.init_from else ())
    train_step = jax.jit(step_fn, out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,))
    eval_model = model
    confusion_step = jax.jit(functools.partial(evaluate.confusion_step, model=eval_model,
                                               stats=stats, num_classes=num_classes))
    embed_step = jax.jit(functools.partial(evaluate.embed_step, model=eval_model, stats=stats,
                                           num_classes=num_classes))

    def variables(s):
        return {"params": s.params, "batch_stats": s.batch_stats}

    # --- Eval ---------------------------------------------------------------------------------------
    def probe(s) -> dict:
        """Online linear probe of the SSL embedding (see lcssl/evaluate.py)."""
        c = config.ssl
        if c.probe_train_split not in card["splits"] or c.probe_eval_split not in card["splits"]:
            return {}
        train = evaluate.collect_embeddings(embed_step, variables(s), eval_batches(c.probe_train_split),
                                            mesh, c.probe_examples)
        held_out = evaluate.collect_embeddings(embed_step, variables(s),
                                               eval_batches(c.probe_eval_split), mesh, c.probe_examples)
        return evaluate.linear_probe(*train, *held_out, num_classes, c.probe_ridge)

    def segmentation_scores(s, split) -> dict:
        return evaluate.evaluate_split(confusion_step, variables(s), eval_batches(split), mesh,
                                       class_names)

    # --- Loop ---------------------------------------------------------------------------------------
    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if jax.process_index() == 0 and config.profile_steps:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                              first_profile=start_step + 10))
    preempted = _Preempted()
    batches = train_batches(start_step)
    pending, checked_step, wait_s, interval_t0 = None, start_step, 0.0, time.perf_counter()
    step = start_step
    step_flops = None  # per device, counted from the step's jaxpr at the first batch
    peak = flops.peak_bf16_flops(jax.devices()[0].device_kind)
    try:
        while step < num_steps:
            t0 = time.perf_counter()
            batch = sharding.host_batch_to_global(next(batches), mesh)
            wait_s += time.perf_counter() - t0
            if step_flops is None:  # an abstract trace: no compile, no device memory
                step_flops = flops.count_flops(train_step, state, batch).total / jax.device_count()
                logging.info("Train step: %.4g TFLOP per device (convolutions and matmuls).",
                             step_flops / 1e12)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, batch)
            step += 1
            pending = step_metrics if pending is None else pending.merge(step_metrics)
            for hook in hooks:
                hook(step)

            last = step == num_steps
            stop = preempted.check(step)  # every step, on every host (see _Preempted)
            save = last or step % config.checkpoint_every_steps == 0 or stop
            if save or step % config.log_every_steps == 0:
                # Every checkpoint is preceded by this check, so a non-finite state is never saved.
                summary = _summary(pending)
                _stop_if_not_finite(summary, checked_step, step, checkpoints)
                elapsed = time.perf_counter() - interval_t0
                summary["input_wait_fraction"] = wait_s / max(elapsed, 1e-9)
                # Achieved throughput of the interval, pauses for eval included; recomputation
                # (GradCache's second forward, remat) counts as work done.
                summary["tflops_per_device"] = (step_flops * (step - checked_step)
                                                / max(elapsed, 1e-9) / 1e12)
                if peak:
                    summary["mfu"] = summary["tflops_per_device"] * 1e12 / peak
                summary["epoch"] = step / steps_per_epoch
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                if summary["input_wait_fraction"] > config.input_bound_warning:
                    logging.warning("Input-bound: %.0f%% of the time since step %d was spent waiting "
                                    "for batches.", 100 * summary["input_wait_fraction"], checked_step)
                pending, checked_step, wait_s, interval_t0 = None, step, 0.0, time.perf_counter()
            if ssl and (step % config.ssl.probe_every_steps == 0 or last):
                result = probe(state)
                if result.get("accuracy") is not None:
                    writer.write_scalars(step, {f"probe/{k}": v for k, v in result.items()})
            if not ssl and has_val and (step % config.eval_every_steps == 0 or last):
                workdir_lib.check_finite(state, step, checkpoints)  # no best/ from a non-finite state
                val = segmentation_scores(state, config.val_split)
                writer.write_scalars(step, {"val/miou": val["miou"] or 0.0, "val/oa": val["oa"] or 0.0})
                best.save(step, state, spec, {**progress, "next_step": step},
                          metrics={"val_miou": val["miou"] or 0.0}, force=True)
            if save:
                workdir_lib.check_finite(state, step, checkpoints)
                checkpoints.save(step, state, spec, {**progress, "next_step": step}, force=True)
            if stop and not last:
                logging.warning("Preempted at step %d; checkpoint saved in %s.", step,
                                checkpoints.directory)
                return {}
        # --- Final evaluation -----------------------------------------------------------------------
        results = {"workdir": os.path.abspath(workdir), "step": step, "mode": config.mode}
        if ssl:
            results["probe"] = probe(state)
        else:
            best_step, restored = step, state
            if best is not None:  # the checkpoint with the best validation mIoU
                best.wait()
                best_step = best.best_step()
                restored, _, _ = best.restore(
                    best_step, ckpt_lib.abstract_like(abstract_state, state_shardings))
            results["best_step"] = best_step
            for split in (config.val_split, config.test_split):
                if split in card["splits"]:
                    results[split] = segmentation_scores(restored, split)
                    logging.info("%s", evaluate.format_scores(results[split],
                                                              f"{split} (step {best_step})"))
        ckpt_lib.write_json(os.path.join(workdir, "eval_results.json"), results)
        return results
    finally:
        preempted.restore()
        checkpoints.wait()
        checkpoints.close()
        if best is not None:
            best.wait()
            best.close()
        writer.flush()
        lock.release()


def _stop_if_not_finite(summary, first_step, step, checkpoints) -> None:
    bad = sorted(k for k in ("loss", "grad_norm") if not np.isfinite(summary.get(k, 0.0)))
    if not bad:
        return
    checkpoints.wait()  # the last good checkpoint finishes writing, and nothing newer is saved
    raise FloatingPointError(
        f"Training stopped: {', '.join(bad)} became NaN or inf between steps {first_step} and {step}. "
        f"The last good checkpoint (step {checkpoints.latest_step()}) in {checkpoints.directory} is "
        "intact; rerun the same command to resume from it, after lowering optimizer.learning_rate, "
        "adding warm-up (schedule.warmup_epochs), raising ssl.temperature or using dtype=float32, "
        "or check the input data for NaNs (data_prep build's QA report).")
