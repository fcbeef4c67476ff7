"""Masked-date reconstruction, a temporal pretext: hide some dates of each Sentinel-2 series from the
U-TAE and reconstruct their bands from the dates it still sees, after Presto (Tseng et al. 2023,
"Lightweight, pre-trained transformers for remote sensing timeseries": masked timesteps,
reconstructed per pixel, MSE on the normalised bands) and SatMAE's temporal masking (Cong et al.
2022). To predict a hidden date from the others, the U-TAE's map has to hold the phenological curve
of each pixel, which is what tells grass, crop and deciduous apart.

Hiding: each of the two augmented views of a patch (lcssl/tasks/pretraining.py) hides its own
round(masked_dates.mask_ratio x n) of its n valid dates (round half up, at most n - 1: one date
always stays visible), drawn per view from the step's augmentation key (hidden_dates). Only dates
valid in the view are candidates: padded dates and those the view's date dropout removed are never
targets. A hidden date is marked invalid for the encoder (the L-TAE gives it attention weight
exactly 0) and its values are zeroed, as date dropout does; its date stays in the `dates` input as
the query of the head (the U-TAE reads no date of an invalid entry).

Target: the view's own normalised series before hiding, after its augmentation (crop, flips and
noise alike on every date, so a hidden date is predictable from the visible ones; the per-date
gain of augment.sits_date_gain, off by default, is not, and only adds a floor to the loss).
Reconstruction: models.DateReconstructionHead on the U-TAE's output map [2B, h, w, C] and the
date's sinusoidal encoding -> [2B, T, h, w, bands]. Loss: MSE over the hidden (date, pixel, band)
cells of both views of the global batch (a sum over cells / their count), so every hidden cell
weighs the same and the loss is the same on any number of devices.

The aerial image is not routed: it covers only the central footprint of the series grid and the
fusion runs from the series to the aerial levels, not back. The task pre-trains the U-TAE alone
(model.variant forced to 'utae': no aerial forward, and the online probe reads the series
embedding this loss trains); fine-tuning loads 'utae', the head stays behind, and the aerial
encoder and fusion start fresh.

Health: the MSE of two trivial predictors on the same cells, each hidden date as the per-pixel mean
of the visible dates (mean_baseline_mse) or as the visible date nearest in time
(nearest_baseline_mse); relative_mse = loss / the better of the two (< 1: the model predicts more
than a mean or an interpolation would); hidden_dates per view.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from lcssl.errors import UserError
from lcssl.tasks import base, pretraining

USES_LABELS = False
HEALTH = ("mean_baseline_mse", "nearest_baseline_mse", "relative_mse", "hidden_dates")
_HIDE_STREAM = 23  # fold_in tag of the hidden-date draw on the augmentation key


def default_config() -> ml_collections.ConfigDict:
    """config.masked_dates: mask_ratio, the share of each view's valid dates hidden. MAE-style
    methods (SatMAE, Presto) hide 75% of their tokens; 0.5 is our choice for series of a few dates
    (the synthetic benchmark's 8 leave 4 to infer a curve from)."""
    c = ml_collections.ConfigDict()
    c.mask_ratio = 0.5
    return c


def model_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's model config reduced to the U-TAE, with the reconstruction head on."""
    if model_cfg.variant not in ("utt", "utae"):
        raise UserError(f"config.task='masked_dates' needs the Sentinel-2 branch: set "
                        f"--config.model.variant to 'utt' or 'utae' (found {model_cfg.variant!r})")
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.variant = "utae"
    cfg.projector.date_reconstruction = True
    return cfg


def hidden_dates(key: jax.Array, valid: jax.Array, mask_ratio: float) -> jax.Array:
    """valid [N, T] bool -> hidden [N, T] bool: per row, the round(mask_ratio n) valid dates of
    lowest U[0, 1) draw (n valid dates; at most n - 1). Row i's draws are row i of one [N, T] draw,
    so a row's dates depend on the key and its position only, not on the sharding."""
    draw = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(draw, axis=-1), axis=-1)
    n = jnp.sum(valid, axis=-1, keepdims=True)
    count = jnp.minimum(jnp.floor(mask_ratio * n + 0.5), n - 1)
    return valid & (rank < count)


def hide_dates(views: pretraining.Views, *, mask_ratio: float) -> pretraining.Views:
    """The views with some valid dates hidden from the encoder; targets {'sits': the series before
    hiding [2B, T, h, w, C], 'hidden' [2B, T] bool}."""
    x = views.inputs
    hidden = hidden_dates(jax.random.fold_in(views.key, _HIDE_STREAM), x["sits_valid"], mask_ratio)
    inputs = dict(x, sits=jnp.where(hidden[:, :, None, None, None], 0.0, x["sits"]),
                  sits_valid=x["sits_valid"] & ~hidden)
    return dataclasses.replace(views, inputs=inputs, targets={"sits": x["sits"], "hidden": hidden})


def masked_mse(prediction: jax.Array, target: jax.Array, hidden: jax.Array) -> jax.Array:
    """[N, T, h, w, C] twice, hidden [N, T] -> the mean of (prediction - target)^2 over the hidden
    dates' cells of the whole batch (0 when no date is hidden)."""
    error = jnp.where(hidden[:, :, None, None, None], (prediction - target) ** 2, 0.0)
    # A float count: the cells of a large batch overflow int32.
    cells = jnp.sum(hidden).astype(error.dtype) * error[0, 0].size
    return jnp.sum(error) / jnp.maximum(cells, 1)


def visible_mean(sits: jax.Array, visible: jax.Array) -> jax.Array:
    """[N, T, h, w, C], [N, T] -> [N, T, h, w, C]: each pixel's mean over the visible dates."""
    weight = visible[:, :, None, None, None].astype(sits.dtype)
    count = jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1)
    return jnp.broadcast_to(jnp.sum(weight * sits, axis=1, keepdims=True) / count, sits.shape)


def nearest_visible(sits: jax.Array, dates: jax.Array, visible: jax.Array) -> jax.Array:
    """[N, T, h, w, C], dates [N, T], [N, T] -> [N, T, h, w, C]: each date as the visible date
    nearest to it in time."""
    gap = jnp.abs(dates[:, :, None] - dates[:, None, :])  # [N, target, source]
    source = jnp.argmin(jnp.where(visible[:, None, :], gap, jnp.iinfo(gap.dtype).max), axis=-1)
    return jnp.take_along_axis(sits, source[:, :, None, None, None], axis=1)


def reconstruction_terms(prediction, sits, dates, hidden, visible):
    """prediction, sits [N, T, h, w, C], dates [N, T] int, hidden, visible [N, T] bool -> (loss,
    health): the masked MSE and the trivial predictors' on the same cells."""
    loss = masked_mse(prediction, sits, hidden)
    mean_mse = masked_mse(visible_mean(sits, visible), sits, hidden)
    nearest_mse = masked_mse(nearest_visible(sits, dates, visible), sits, hidden)
    baseline = jnp.minimum(mean_mse, nearest_mse)
    return loss, {"mean_baseline_mse": mean_mse, "nearest_baseline_mse": nearest_mse,
                  "relative_mse": loss / jnp.maximum(baseline, 1e-12),
                  "hidden_dates": jnp.mean(jnp.sum(hidden, axis=-1))}


def objective_loss(out, views, state):
    x = views.inputs
    return reconstruction_terms(out["date_reconstruction"], views.targets["sits"], x["dates"],
                                views.targets["hidden"], x["sits_valid"])


def build(ctx: base.Context) -> base.Task:
    mask_ratio = ctx.config.masked_dates.mask_ratio
    if not 0 < mask_ratio < 1:
        raise UserError(f"masked_dates.mask_ratio must be in (0, 1), found {mask_ratio}")
    # Transfer: the encoder of the 'utae' variant, i.e. 'utae'.
    return pretraining.build_task(
        ctx, "masked_dates", objective_loss, HEALTH, model_cfg=model_config(ctx.model_cfg),
        outputs=("date_reconstruction",),
        prepare_views=lambda views: hide_dates(views, mask_ratio=mask_ratio))
