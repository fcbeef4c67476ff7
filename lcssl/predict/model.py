"""The model side of prediction: a run's weights as a forward function, its aerial-only path,
test-time augmentation, and the device step (normalize, forward, resample, weigh).

    logits_fn, spec, class_names = load_model("runs/ft")
    logits_fn(batch) -> [B, H, W, K] float32        # batch: normalized model input, sharded
    logits_fn.aerial_only(batch) -> [B, H, W, K]    # 'utt' models: no Sentinel-2 contribution
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from absl import logging
import numpy as np

from lcssl.errors import UserError

CHECKPOINT_ADVICE = ("Point --checkpoint at the workdir of a supervised or fine-tuning run "
                     "(python -m lcssl.main --config=configs/finetune_*.py), or at its "
                     "checkpoints/ or best/ folder.")
# Test-time augmentation: views as (number of 90 degree rotations, horizontal flip first).
TTA_VIEWS = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True), (2, False)),    # identity, h-, v-flip, both
    "d4": tuple((k, f) for f in (False, True) for k in range(4)),   # + the 90 degree rotations
}


class Forward:
    """The jitted forward pass of a segmentation model with its (replicated) weights."""

    def __init__(self, model, variables):
        import jax

        self.model, self.variables = model, variables

        @jax.jit
        def fused(variables, batch):
            return model.apply(variables, batch["aerial"], batch["sits"], batch["dates"],
                               batch["sits_valid"], train=False)["logits"]

        @jax.jit
        def aerial(variables, batch):
            return model.apply(variables, batch["aerial"], method=aerial_logits)

        self._fused, self._aerial = fused, aerial

    def __call__(self, batch):
        return self._fused(self.variables, batch)

    def aerial_only(self, batch):
        return self._aerial(self.variables, batch)


def trained_without_sits(model_cfg) -> bool:
    """A U-T&T trained with modality dropout has learnt to predict from the aerial image alone
    (lcssl.models.fusion: the series' contribution dropped at every level)."""
    return (model_cfg.get("variant", "utt") == "utt"
            and float(model_cfg.get("modality_dropout") or 0) > 0)


def aerial_logits(model, aerial):
    """What a U-T&T computes when modality dropout drops the series: the aerial levels go to the
    decoder unfused (Fusion returns them unchanged), then the segmentation head."""
    import jax.numpy as jnp

    levels = model.aerial_encoder(aerial, False)
    return model.seg_head(model.aerial_decoder(levels, False)).astype(jnp.float32)


def load_spec(path: str) -> dict:
    """The input spec of the checkpoint `load_model(path)` loads, read without its weights."""
    from lcssl import checkpoint as ckpt_lib

    return ckpt_lib.read_weights_spec(path, flag="--checkpoint", advice=CHECKPOINT_ADVICE)


def load_model(path: str, mesh=None) -> tuple[Forward, dict, list[str]]:
    """(logits_fn, input_spec, class_names) of the run at `path` (a workdir or its checkpoints dir),
    through lcssl.checkpoint.restore_weights.

    logits_fn(batch) -> logits [B, H, W, K] float32, with batch the *normalized* model input
    {'aerial' [B, H, W, Ca], 'sits' [B, T, h, w, Cs], 'dates' [B, T] int32, 'sits_valid' [B, T]}
    (lcssl.data.normalize with the spec's statistics), sharded on the mesh's 'data' axis; the
    weights are replicated on `mesh` (default: every device).
    """
    import jax
    import ml_collections

    from lcssl import checkpoint as ckpt_lib
    from lcssl import models, sharding

    variables, spec, directory, step = ckpt_lib.restore_weights(
        path, flag="--checkpoint", advice=CHECKPOINT_ADVICE)
    if "seg_head" not in variables["params"] and "utae" not in variables["params"]:
        raise UserError(
            f"--checkpoint={path}: {directory} (step {step}) has no segmentation head (params: "
            f"{sorted(variables['params'])}); a pre-training checkpoint cannot map land cover: "
            "fine-tune it first (configs/finetune_*.py) and predict with that run.")
    model_cfg = ml_collections.ConfigDict(spec["model"])
    mesh = mesh or sharding.make_mesh()
    variables = jax.device_put(variables, sharding.replicated(mesh))
    logging.info("Loaded %s step %d: model %r, %d classes", directory, step, models.variant(model_cfg),
                 model_cfg.num_classes)
    return Forward(models.build_model(model_cfg), variables), spec, list(spec["classes"])


# --- Test-time augmentation --------------------------------------------------------------------------

def _view(x, k: int, flip: bool, axes: tuple[int, int]):
    import jax.numpy as jnp

    if flip:
        x = jnp.flip(x, axis=axes[1])
    return jnp.rot90(x, k, axes=axes)


def _unview(y, k: int, flip: bool):
    """The inverse of _view on logits [B, H, W, K]."""
    import jax.numpy as jnp

    y = jnp.rot90(y, -k, axes=(1, 2))
    return jnp.flip(y, axis=2) if flip else y


@functools.cache
def _jitted_view(k: int, flip: bool):
    import jax

    def view(batch):
        out = dict(batch, aerial=_view(batch["aerial"], k, flip, (1, 2)))
        if "sits" in batch:
            out["sits"] = _view(batch["sits"], k, flip, (2, 3))
        return out

    return jax.jit(view), jax.jit(functools.partial(_unview, k=k, flip=flip))


def with_tta(fn: Callable, tta: str) -> Callable:
    """fn(batch) -> logits, averaged over the views of `tta` ('none', 'flips': 4 views,
    'd4': 8 = flips and 90 degree rotations): each view transforms the aerial image and the series
    crop alike (about their centres), its logits are transformed back. Costs one forward pass per
    view."""
    views = TTA_VIEWS[tta]
    if len(views) == 1:
        return fn

    def averaged(batch):
        total = None
        for k, flip in views:
            forward, back = _jitted_view(k, flip)
            y = back(fn(forward(batch)))
            total = y if total is None else total + y
        return total / len(views)

    return averaged


# --- The device step -----------------------------------------------------------------------------

@functools.cache
def _jitted():
    import jax
    import jax.numpy as jnp

    from lcssl.data import normalize

    def weigh(logits, ok, weight, win: int):
        """[B, S, S, K] logits -> resampled to the window's mosaic pixels [B, win, win, K] (when
        the mosaic's gsd is not the checkpoint's), times the blending weight; 0 for padding."""
        if logits.shape[1] != win:
            logits = jax.image.resize(logits, (logits.shape[0], win, win, logits.shape[-1]),
                                      "linear")
        return logits * (weight[None, :, :, None] * ok[:, None, None, None])

    def select(aerial_only, fused, aerial):
        return jnp.where(aerial_only[:, None, None, None], aerial, fused)

    return jax.jit(normalize.normalize), jax.jit(weigh, static_argnums=3), jax.jit(select)


def global_batch_size(batch_size: int | None, mesh) -> int:
    """Windows (or patches) per step over all devices: `batch_size` (--batch-size), checked to
    divide among the devices, or 4 per device."""
    from lcssl import sharding

    batch_size = batch_size or 4 * sharding.num_data_shards(mesh)
    try:
        sharding.check_batch_divisible(batch_size, mesh, "--batch-size")
    except ValueError as e:
        raise UserError(str(e)) from None
    return batch_size


def normalize(batch, stats):
    return _jitted()[0](batch, stats)


class DeviceStep:
    """Host batch -> weighted logits on the device (asynchronous): normalize, forward (fused, or
    with `aerial_only` logits_fn.aerial_only for the windows flagged so), TTA, resample to the
    window, Hann weight."""

    def __init__(self, logits_fn: Callable, stats, mesh, weight: np.ndarray, win: int,
                 tta: str = "none", aerial_only: bool = False):
        import jax

        from lcssl import sharding

        self.mesh, self.stats, self.win = mesh, stats, win
        self.fused = with_tta(logits_fn, tta)
        self.aerial = with_tta(logits_fn.aerial_only, tta) if aerial_only else None
        self.weight = jax.device_put(weight, sharding.replicated(mesh))

    def __call__(self, host: dict[str, Any]):
        from lcssl import sharding

        host = dict(host)
        flags = {k: host.pop(k) for k in ("ok", "aerial_only")}
        batch = normalize(sharding.host_batch_to_global(host, self.mesh), self.stats)
        dev = sharding.host_batch_to_global(flags, self.mesh)
        if not flags["aerial_only"].any():
            logits = self.fused(batch)
        elif flags["aerial_only"][flags["ok"] > 0].all():
            logits = self.aerial(batch)
        else:
            logits = _jitted()[2](dev["aerial_only"], self.fused(batch), self.aerial(batch))
        return _jitted()[1](logits, dev["ok"], self.weight, self.win)
