"""Supervised segmentation, from scratch or fine-tuning a pre-trained checkpoint
(`supervised.init_from`) or published ResNet34 weights (`supervised.init_encoder_from`,
lcssl/pretrained.py).

Flips / rot90, class-weighted cross-entropy on the segmentation logits plus `aux_loss_weight` x the
time-series branch's, optional exact gradient accumulation (`grad_accum_steps`). Fine-tuning copies
exactly the subtrees the pre-training task declared (its input spec's `transfer`; the model's
encoder for older checkpoints) and, with finetune_mode='linear', keeps the encoder frozen (weights
and batch-norm statistics). Validation mIoU every eval_every_steps picks the best checkpoint, whose
val and test scores are the run's results.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics
from ml_collections import config_dict

from lcssl import checkpoint as ckpt_lib
from lcssl import evaluate, gradcache, losses, models, pretrained, sharding
from lcssl.data import augment, normalize
from lcssl.errors import UserError
from lcssl.metrics import official_miou
from lcssl.tasks import base

USES_LABELS = True


def default_config() -> ml_collections.ConfigDict:
    """config.supervised: where fine-tuning starts (init_from, a checkpoint; or init_encoder_from,
    published weights; neither: from scratch), what it trains (finetune_mode, encoder_lr_scale),
    adapt_bands, the loss's class_weights and aux_loss_weight, grad_accum_steps. Field reference:
    lcssl/configs.py. label_fraction and label_seed are not here: the loop reads them (the epoch's
    length, the labelled subset the input pipeline draws, the checkpoint's data position)."""
    c = ml_collections.ConfigDict()
    c.init_from = config_dict.placeholder(str)
    c.init_encoder_from = config_dict.placeholder(str)
    c.finetune_mode = "full"
    c.adapt_bands = False
    c.encoder_lr_scale = 0.1
    c.class_weights = "card"
    c.aux_loss_weight = 0.5
    c.grad_accum_steps = 1
    return c


# clu reads these annotations at run time: no `from __future__ import annotations` in this module.
@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    ce: metrics.Average.from_output("ce")
    aux_ce: metrics.Average.from_output("aux_ce")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


def train_step(state: base.TrainState, batch, *, model, tx, stats, augment_cfg, class_weights,
               aux_loss_weight: float, grad_accum_steps: int, frozen_keys=(), lr,
               mesh=None) -> tuple[base.TrainState, Metrics]:
    """One supervised update: weighted CE (+ aux) over the labelled pixels of the global batch."""
    aug_key, drop_key = jax.random.split(base.step_key(state))
    batch = augment.supervised_augment(aug_key, normalize.normalize(batch, stats), augment_cfg)
    inputs = {k: batch[k] for k in (*models.INPUT_KEYS, "label")}
    inputs["dropout_key"] = jax.random.split(drop_key, inputs["label"].shape[0])

    def loss_fn(params, x):
        out, mutated = base.apply_model(model, params, state.batch_stats, x, train=True)
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
    new_state = base.apply_gradients(state, grads, batch_stats, tx)
    return new_state, Metrics.single_from_model_output(
        loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr(state.step), **parts)


def class_weights_for(config, card) -> np.ndarray | None:
    spec, k = config.supervised.class_weights, len(card["classes"])
    if spec == "none":
        return None
    if spec == "card":
        weights = card.get("class_weights")
        if weights is None:
            raise UserError(f"supervised.class_weights='card' but {config.data_dir}/dataset_card.json "
                            "has no class_weights; rebuild the dataset or set "
                            "--config.supervised.class_weights=none")
    else:
        weights = [float(w) for w in spec.split(",")]
    if len(weights) != k:
        raise UserError(f"supervised.class_weights has {len(weights)} values but the dataset has {k} "
                        f"classes {card['classes']}")
    return np.asarray(weights, np.float32)


# ------------------------------------------------------------------------------------------------
# Fine-tuning: what is loaded from the pre-training checkpoint
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


def declared_transfer(init_from: str, default_keys) -> tuple[tuple[str, ...], str | None]:
    """(subtrees, prefix) the task that wrote the checkpoint declared in its input spec (a
    pre-training task: its model's subtrees under 'backbone'; a segmentation run: its encoder, prefix
    None); a checkpoint from before tasks declared them: the model's encoder under 'backbone'."""
    transfer = ckpt_lib.read_input_spec(init_from).get("transfer")
    if not transfer:
        return tuple(default_keys), "backbone"
    return tuple(transfer["keys"]), transfer["prefix"]


def load_pretrained(state: base.TrainState, init_from: str, keys, card, data_dir, mesh,
                    adapt_bands: bool = False, prefix: str | None = "backbone"
                    ) -> tuple[base.TrainState, dict]:
    """Copies exactly params/batch_stats[prefix][k] for k in `keys` from a checkpoint; with
    adapt_bands, first remaps the first convolutions' input channels to the dataset's bands."""
    params, batch_stats, spec, step = ckpt_lib.load_encoder(
        init_from, keys, prefix=prefix, sharding=sharding.replicated(mesh))
    for warning in ckpt_lib.check_input_spec(spec, card, source=init_from, target=data_dir,
                                             adapt_bands=adapt_bands):
        logging.warning("supervised.init_from: %s", warning)
    adapted = {}
    if adapt_bands:
        params = jax.tree.map(lambda x: x, params)  # a copy of the containers, arrays shared
        adapted = _adapt_band_kernels(params, spec, card)
    for name, have, new in (("params", state.params, params),
                            ("batch_stats", state.batch_stats, batch_stats)):
        want = jax.tree.map(lambda x: (x.shape, x.dtype), {k: have.get(k) for k in new})
        found = jax.tree.map(lambda x: (x.shape, x.dtype), new)
        if want != found:
            raise UserError(
                f"supervised.init_from={init_from}: the {name} {sorted(new)} in the checkpoint do not "
                "fit this model (different model config?). Use the same --config.model.* as the "
                "pre-training run (its model config is in the checkpoint's input_spec).")
    report = {
        "init_from": ckpt_lib.resolve_checkpoint_dir(init_from), "step": step,
        "loaded": [jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_leaves_with_path({"params": params, "batch_stats": batch_stats})],
        "new": sorted(k for k in state.params if k not in params),
        "adapted_bands": adapted,
    }
    logging.info("Fine-tuning from %s (step %d): loaded %d arrays %s; new: %s",
                 report["init_from"], step, len(report["loaded"]), sorted(params), report["new"])
    return state.replace(params={**state.params, **params},
                         batch_stats={**state.batch_stats, **batch_stats}), report


# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------

def build(ctx: base.Context) -> base.Task:
    config, cfg, card, mesh = ctx.config, ctx.config.supervised, ctx.card, ctx.mesh
    model = models.build_model(ctx.model_cfg)
    encoder_keys = models.encoder_keys(ctx.model_cfg)
    transfer, prefix = encoder_keys, "backbone"
    if cfg.init_from and cfg.init_encoder_from:
        raise UserError("set one of --config.supervised.init_from (an lcssl checkpoint) and "
                        "--config.supervised.init_encoder_from (published ResNet34 weights), not both")
    if cfg.init_from:
        transfer, prefix = declared_transfer(cfg.init_from, encoder_keys)
    elif cfg.init_encoder_from:
        transfer = (pretrained.ENCODER_KEY,)
    fine_tuning = bool(cfg.init_from or cfg.init_encoder_from)
    tx = base.make_optimizer(config, ctx.lr, transfer if fine_tuning else (), cfg)
    frozen = transfer if fine_tuning and cfg.finetune_mode == "linear" else ()

    def warm_start(state):
        if not fine_tuning:
            return state, None
        if cfg.init_encoder_from:
            return pretrained.warm_start(state, cfg.init_encoder_from, card, ctx.model_cfg)
        return load_pretrained(state, cfg.init_from, transfer, card, config.data_dir, mesh,
                               cfg.adapt_bands, prefix)

    confusion_step = jax.jit(functools.partial(evaluate.confusion_step, model=model,
                                               stats=ctx.stats, num_classes=len(ctx.class_names)))

    def scores(state, split) -> dict:
        split_scores = evaluate.evaluate_split(confusion_step, base.variables(state),
                                               ctx.eval_batches(split), mesh, ctx.class_names)
        return {**split_scores, **official_miou(split_scores, card.get("official_miou"))}

    has_val = config.val_split in card["splits"]
    if not has_val:
        logging.warning("No %r split in %s: no validation, the final weights are evaluated.",
                        config.val_split, config.data_dir)

    def validate(state) -> dict:
        if not has_val:
            return {}
        val = scores(state, config.val_split)
        return {"val/miou": val["miou"] or 0.0, "val/oa": val["oa"] or 0.0}

    # The pre-training tasks' linear probe, run on this model's encoder too: on an encoder trained
    # with labels it shows what the probe can tell apart (the study reports both).
    probe = base.linear_probe(ctx, model)

    def final(state) -> dict:
        results = {}
        for split in (config.val_split, config.test_split):
            if split in card["splits"]:
                results[split] = scores(state, split)
                logging.info("%s", evaluate.format_scores(results[split], split))
        results["probe"] = probe(state)
        return results

    return base.Task(
        name="supervised", model=model,
        init=base.state_init(model, ctx.model_cfg, ctx.num_dates, tx, config.seed),
        train_step=functools.partial(
            train_step, model=model, tx=tx, stats=ctx.stats, augment_cfg=ctx.augment_cfg,
            class_weights=class_weights_for(config, card), aux_loss_weight=cfg.aux_loss_weight,
            grad_accum_steps=cfg.grad_accum_steps, frozen_keys=frozen, lr=ctx.lr, mesh=mesh),
        metrics=Metrics,
        batch_keys=(*models.INPUT_KEYS, "label"),
        # A segmentation run's encoder can start another fine-tuning (the study's oracle: the
        # encoder trained with every label); its own model's subtrees, no prefix.
        transfer_keys=tuple(encoder_keys), transfer_prefix=None,
        warm_start=warm_start, evaluate=validate, eval_every_steps=config.eval_every_steps,
        best_metric="val/miou" if has_val else None, final=final)
