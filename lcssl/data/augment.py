"""Augmentations for the aerial + Sentinel-2 patch (SimCLR's, Chen et al. 2020), pure JAX, on the device.

    two_views(key, batch, cfg)          -> (view1, view2)   two random views of a normalised batch
    view_geometry(key, batch, cfg)      -> (geom1, geom2)   where those views' pixels come from
    map_view_points(points, geom_a, geom_b) -> (points_b, valid)   view a -> view b coordinates
    view_correspondence(geom1, geom2, (h, w)) -> matches of an h x w grid between the two views
    supervised_augment(key, batch, cfg) -> batch            flips / rot90, alike on aerial, sits, label

Batch (normalised, see lcssl/data/normalize.py):
    aerial [B, H, W, Ca] float32, sits [B, T, h, w, Cs] float32, dates [B, T] int32,
    sits_valid [B, T] bool, optionally label [B, H, W] int32; other keys pass through.

Each example's parameters are row i of one [B, n] uniform draw from the key, so a view depends
only on the key, the batch size and the example's position, not on how the batch is sharded.

Geometry is applied alike to both modalities so they stay aligned. The aerial patch is centred on
the SITS crop and covers its central `footprint_px` SITS pixels (DESIGN.md, "Footprint"). An aerial
crop box is a ground box; the SITS crop gets the same ground-space zoom about the same ground
point, converted into SITS pixels, and flips / rot90 about the common centre act alike.

Photometric ops touch `photometric_bands` only: the elevation band of FLAIR #2 (index 4) is a
height, not a colour, and is never jittered, blurred or lit. The data are standardised, so nothing
is clipped to a [0, 1] range.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Geometry, alike on aerial, SITS and label.
    c.crop_prob = 1.0  # SimCLR applies its random crop to every view (Chen et al. 2020, sec. 3).
    c.crop_min_keep = 0.8  # seminar slides: "cropping randomly and resizing (20%)": keep 80-100 % of the side
    c.flip = True
    c.rot90 = True  # aerial and S2 imagery are north-up but land cover has no orientation
    c.footprint_px = 10.24  # SITS pixels covered by the aerial patch: 512 px * 0.2 m / 10 m
    # Colour (SimCLR colour distortion, applied with probability 0.8, strength s; brightness and
    # contrast factors in [1 - 0.8 s, 1 + 0.8 s], Chen et al. 2020, appendix A). s = 0.5 as SimCLR
    # used for CIFAR-10; hue and saturation have no meaning for NIR, so a per-band gain replaces them.
    c.photometric_bands = (0, 1, 2, 3)  # R, G, B, NIR of FLAIR #2 and Hameln; never elevation (4)
    c.color_prob = 0.8
    c.brightness = 0.4  # 0.8 s
    c.contrast = 0.4  # 0.8 s
    c.band_gain = 0.1  # our choice: a mild per-band gain (sensor / atmosphere differences)
    # Brightness and lighting are gains on radiance. In standardised units a gain g maps z to
    # g z + (g - 1) d, with d = band mean / std (the standardised distance of zero radiance below the
    # mean; lcssl.data.normalize.dark_level_z computes it from the dataset card). 0 makes the gains
    # act about the dataset mean instead.
    c.dark_level_z = 0.0
    # Gaussian blur: sigma uniform in [0.1, 2.0] px, probability 0.5 (Chen et al. 2020, appendix A).
    c.blur_prob = 0.5
    c.blur_sigma_px = (0.1, 2.0)
    # Lighting (seminar slides: "simulation of different lighting condition"): a linear illumination
    # gradient across the patch and, with shadow_prob, a soft-edged disc shadow. Our choices.
    c.lighting_prob = 0.5
    c.lighting_gradient = 0.3  # max relative gain change from the centre to the edge midpoint
    c.shadow_prob = 0.5
    c.shadow_gain = (0.4, 0.8)  # radiance gain inside the shadow
    c.shadow_radius = (0.1, 0.4)  # fraction of the patch side
    c.shadow_softness = 0.05  # edge width, fraction of the patch side
    # Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation"), with torchvision's
    # RandomErasing defaults: area 2-33 %, aspect 0.3-3.3, p 0.5. The rectangle is set to 0, the
    # band mean after standardisation. All aerial bands are erased: it is an occlusion, and leaving
    # elevation visible would tell the model what is under it.
    c.erase_prob = 0.5
    c.erase_area = (0.02, 0.33)
    c.erase_aspect = (0.3, 3.3)
    # Sentinel-2 time series. Our choices: drop dates (cloud gaps the filter missed, other revisit
    # patterns) and add small noise, in standardised units.
    c.date_dropout_prob = 0.5
    c.date_dropout_rate = 0.2
    c.sits_noise_prob = 0.5
    c.sits_noise_std = 0.05
    # Sentinel-2 radiometry per view (off by default): a per-band gain in [1 - x, 1 + x] and offset
    # in [-y, y] standardised units, and a per-date gain, drawn for each view. Zones differ in
    # exactly this way (atmosphere, sensor, illumination; data_prep.synth.Realism models it), so
    # views that differ in it teach an encoder to look past it, at the phenology.
    c.sits_view_gain = 0.0
    c.sits_view_offset = 0.0
    c.sits_date_gain = 0.0
    return c


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def two_views(key: jax.Array, batch: Mapping[str, Any], cfg: ml_collections.ConfigDict
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two independently augmented views of a normalised batch, same keys and shapes as `batch`.

    A `label` in the batch follows the geometry (nearest neighbour, IGNORE_LABEL kept) and is
    untouched by photometric ops, so it stays aligned with its view's aerial patch.
    """
    _check_batch(batch, cfg)
    return _two_views(key, dict(batch), ml_collections.FrozenConfigDict(cfg))


# Jitted with the (hashable, frozen) config static: inside the train step's jit this is inlined;
# called eagerly it compiles once instead of dispatching hundreds of small ops.
@functools.partial(jax.jit, static_argnums=2)
def _two_views(key, batch, cfg):
    key1, key2 = jax.random.split(key)
    return _augment_batch(key1, batch, cfg), _augment_batch(key2, batch, cfg)


def supervised_augment(key: jax.Array, batch: Mapping[str, Any], cfg: ml_collections.ConfigDict
                       ) -> dict[str, Any]:
    """Random flips and 90-degree rotations (per `cfg.flip`, `cfg.rot90`), alike on `aerial`,
    `sits` and `label`. Exact permutations of pixels: no interpolation, labels stay integers."""
    _check_square(batch, cfg)
    return _supervised_augment(key, dict(batch), ml_collections.FrozenConfigDict(cfg))


@functools.partial(jax.jit, static_argnums=2)
def _supervised_augment(key, batch, cfg):
    b = batch["aerial"].shape[0]
    u = _uniforms(key, b, _D4_DRAWS)

    def one(u, aerial, sits, label):
        d4 = _dihedral_from(u, cfg)
        return _dihedral(aerial, (0, 1), d4), _dihedral(sits, (1, 2), d4), _dihedral(label, (0, 1), d4)

    out = dict(batch)
    sits = batch.get("sits", jnp.zeros((b, 1, 1, 1, 1)))
    label = batch.get("label", jnp.zeros(batch["aerial"].shape[:3], jnp.int32))
    aerial, sits, label = jax.vmap(one)(u, batch["aerial"], sits, label)
    out["aerial"] = aerial
    if "sits" in batch:
        out["sits"] = sits
    if "label" in batch:
        out["label"] = label
    return out


# ---------------------------------------------------------------------------------------------
# View geometry (for pixel-level objectives)
# ---------------------------------------------------------------------------------------------
# A view's geometry in fractions of the patch side, so that it holds at any resolution (aerial,
# decoder output, a pooled grid). A point at fraction x of the view (pixel i of n has its centre
# at (i + 0.5) / n) comes from the crop at fraction y, with x = flip1(flip0(transpose(y))) (the
# order `_dihedral` applies them; a flip maps y to 1 - y), and from the patch at
# origin + keep * y (`_crop_resize`: output pixel u' samples the input at o + keep u').


def view_geometry(key: jax.Array, batch: Mapping[str, Any], cfg: ml_collections.ConfigDict
                  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The geometry of the two views `two_views(key, batch, cfg)` returns, from the same draws
    (it does not change them): per view {'origin': [B, 2] crop corner (row, col) and 'keep': [B]
    crop side, fractions of the patch side; 'transpose', 'flip0', 'flip1': [B] bool}."""
    _check_batch(batch, cfg)
    return _view_geometry(key, batch["aerial"].shape, batch["sits"].shape,
                          ml_collections.FrozenConfigDict(cfg))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _view_geometry(key, aerial_shape, sits_shape, cfg):
    def one(view_key):
        k_u, _ = jax.random.split(view_key)  # as _augment_batch splits it
        draws = _VIEW_DRAWS + (("band", aerial_shape[-1]), ("date", sits_shape[1]))
        u = _uniforms(k_u, aerial_shape[0], draws)
        keep = jnp.where(u["crop"] < cfg.crop_prob, _between(u["keep"], (cfg.crop_min_keep, 1.0)), 1.0)
        transpose, flip0, flip1 = jax.vmap(lambda u: _dihedral_from(u, cfg))(u)
        square = aerial_shape[1] == aerial_shape[2]  # _dihedral transposes square patches only
        return {"origin": u["crop_pos"] * (1.0 - keep)[:, None], "keep": keep,
                "transpose": transpose & square, "flip0": flip0, "flip1": flip1}

    key1, key2 = jax.random.split(key)  # as _two_views splits it
    return one(key1), one(key2)


def _select(geom, name, points):
    return geom[name].reshape(geom[name].shape + (1,) * (points.ndim - 2))


def map_view_points(points: jax.Array, geom_a: Mapping[str, jax.Array], geom_b: Mapping[str, jax.Array]
                    ) -> tuple[jax.Array, jax.Array]:
    """points [B, ..., 2] (row, col) fractions of view a's side -> the same ground points in view
    b's fractions [B, ..., 2], and valid [B, ...]: the point lies inside view b ([0, 1) both ways)."""
    def crop_from_view(p, g):
        row, col = p[..., 0], p[..., 1]
        col = jnp.where(_select(g, "flip1", p), 1.0 - col, col)
        row = jnp.where(_select(g, "flip0", p), 1.0 - row, row)
        t = _select(g, "transpose", p)
        return jnp.stack([jnp.where(t, col, row), jnp.where(t, row, col)], axis=-1)

    def view_from_crop(p, g):
        t = _select(g, "transpose", p)
        row = jnp.where(t, p[..., 1], p[..., 0])
        col = jnp.where(t, p[..., 0], p[..., 1])
        row = jnp.where(_select(g, "flip0", p), 1.0 - row, row)
        col = jnp.where(_select(g, "flip1", p), 1.0 - col, col)
        return jnp.stack([row, col], axis=-1)

    def expand(x, p):  # [B, ...] -> broadcast against p [B, ..., 2]
        return x.reshape(x.shape[:1] + (1,) * (p.ndim - 2) + x.shape[1:])

    points = jnp.asarray(points, jnp.float32)
    ground = expand(geom_a["origin"], points) + expand(geom_a["keep"][:, None], points) * crop_from_view(points, geom_a)
    crop_b = (ground - expand(geom_b["origin"], points)) / expand(geom_b["keep"][:, None], points)
    out = view_from_crop(crop_b, geom_b)
    valid = jnp.all((out >= 0.0) & (out < 1.0), axis=-1)
    return out, valid


def grid_points(batch_size: int, size: tuple[int, int]) -> jax.Array:
    """Centres of an h x w pixel grid as (row, col) fractions, [B, h * w, 2], row-major."""
    h, w = size
    rows = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    cols = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(h * w, 2)
    return jnp.broadcast_to(grid, (batch_size, h * w, 2))


def view_correspondence(geom1: Mapping[str, jax.Array], geom2: Mapping[str, jax.Array],
                        size: tuple[int, int]) -> dict[str, jax.Array]:
    """Matches between the two views' h x w grids (pixels flattened row-major): {'match12' [B, h w]
    int32: the view-2 pixel containing view-1 pixel p's centre, 'valid12' [B, h w] bool: that
    centre lies inside view 2, and 'match21', 'valid21' the other way}."""
    h, w = size
    points = grid_points(geom1["keep"].shape[0], size)
    scale = jnp.array([h, w], jnp.float32)
    out = {}
    for name, ga, gb in (("12", geom1, geom2), ("21", geom2, geom1)):
        mapped, valid = map_view_points(points, ga, gb)
        cell = jnp.clip(jnp.floor(mapped * scale).astype(jnp.int32), 0, jnp.array([h - 1, w - 1]))
        out["match" + name] = cell[..., 0] * w + cell[..., 1]
        out["valid" + name] = valid
    return out


# ---------------------------------------------------------------------------------------------
# One view of one example
# ---------------------------------------------------------------------------------------------


# The per-example random parameters, as (name, count) of U[0, 1) draws. One threefry call per view
# for the whole batch: one call per parameter made XLA's CPU compile take tens of seconds.
_D4_DRAWS = (("rot", 1), ("hflip", 1), ("vflip", 1))
_VIEW_DRAWS = _D4_DRAWS + (
    ("crop", 1), ("keep", 1), ("crop_pos", 2),
    ("color", 1), ("brightness", 1), ("contrast", 1),  # + ("band", Ca)
    ("light", 1), ("light_amp", 1), ("light_dir", 1), ("shadow", 1), ("shadow_gain", 1),
    ("shadow_pos", 2), ("shadow_radius", 1),
    ("blur", 1), ("blur_sigma", 1),
    ("erase", 1), ("erase_area", 1), ("erase_aspect", 1), ("erase_pos", 2),
    ("dropout", 1), ("noise", 1),  # + ("date", T)
)


_SITS_RADIOMETRY_STREAM = 17  # fold_in tag of the Sentinel-2 radiometry draws


def _sits_radiometry_on(cfg) -> bool:
    return bool(cfg.get("sits_view_gain") or cfg.get("sits_view_offset") or cfg.get("sits_date_gain"))


def _uniforms(key, b, draws):
    """{name: [b] or [b, count]} of U[0, 1) draws from a single call."""
    total = sum(count for _, count in draws)
    u = jax.random.uniform(key, (b, total))
    out, start = {}, 0
    for name, count in draws:
        out[name] = u[:, start] if count == 1 else u[:, start:start + count]
        start += count
    return out


def _normal(key, shape):
    """Standard normal by Box-Muller: jax.random.normal's erfinv took XLA's CPU compiler seconds."""
    u = jax.random.uniform(key, (2,) + tuple(shape))
    return jnp.sqrt(-2.0 * jnp.log1p(-u[0])) * jnp.cos(2.0 * math.pi * u[1])


def _between(u, bounds):
    low, high = bounds
    return low + (high - low) * u


def _augment_batch(key, batch, cfg):
    aerial, sits = batch["aerial"], batch["sits"]
    b = aerial.shape[0]
    has_label = "label" in batch
    label = batch["label"] if has_label else jnp.zeros(aerial.shape[:3], jnp.int32)
    k_u, k_noise = jax.random.split(key)
    draws = _VIEW_DRAWS + (("band", aerial.shape[-1]), ("date", sits.shape[1]))
    u = _uniforms(k_u, b, draws)
    noise = _normal(k_noise, sits.shape) if cfg.sits_noise_prob > 0 else None
    if _sits_radiometry_on(cfg):  # its own stream: the other draws stay what they were without it
        u.update(_uniforms(jax.random.fold_in(key, _SITS_RADIOMETRY_STREAM), b,
                           (("sits_gain", sits.shape[-1]), ("sits_offset", sits.shape[-1]),
                            ("sits_date_gain", sits.shape[1]))))
    one = lambda u, a, s, d, v, l, n: _augment_example(u, a, s, d, v, l, n, cfg)  # noqa: E731
    aerial, sits, dates, valid, label = jax.vmap(one)(
        u, aerial, sits, batch["dates"], batch["sits_valid"], label, noise)
    out = dict(batch, aerial=aerial, sits=sits, dates=dates, sits_valid=valid)
    if has_label:
        out["label"] = label
    return out


def _augment_example(u, aerial, sits, dates, valid, label, noise, cfg):
    """u: this example's draws; aerial [H, W, Ca], sits [T, h, w, Cs], dates [T], valid [T],
    label [H, W], noise [T, h, w, Cs] standard normal."""
    # Geometry: crop + resize, then the dihedral group (flips, rot90), alike on all three.
    if cfg.crop_prob > 0:
        aerial, sits, label = _crop_resize(u, aerial, sits, label, cfg)
    d4 = _dihedral_from(u, cfg)
    aerial = _dihedral(aerial, (0, 1), d4)
    sits = _dihedral(sits, (1, 2), d4)
    label = _dihedral(label, (0, 1), d4)

    # Photometric, aerial photometric bands only.
    photometric = np.zeros(aerial.shape[-1], bool)
    photometric[list(cfg.photometric_bands)] = True
    lit = aerial
    # An op with probability 0 is left out of the graph (the test configs rely on it, and so does
    # a config that turns an op off to save compute).
    if cfg.color_prob > 0:
        lit = _color(u, lit, cfg)
    if cfg.lighting_prob > 0:
        lit = _lighting(u, lit, cfg)
    if cfg.blur_prob > 0:
        lit = _blur(u, lit, cfg)
    aerial = jnp.where(photometric, lit, aerial)

    # Occlusion, all aerial bands.
    if cfg.erase_prob > 0:
        aerial = _erase(u, aerial, cfg)

    # Time series.
    if cfg.date_dropout_prob > 0:
        valid = _date_dropout(u, valid, cfg)
    if cfg.sits_noise_prob > 0:
        sits = sits + jnp.where(u["noise"] < cfg.sits_noise_prob, cfg.sits_noise_std, 0.0) * noise
    if _sits_radiometry_on(cfg):
        gain = _between(u["sits_gain"], (1 - cfg.sits_view_gain, 1 + cfg.sits_view_gain))  # [Cs]
        offset = _between(u["sits_offset"], (-cfg.sits_view_offset, cfg.sits_view_offset))  # [Cs]
        per_date = _between(u["sits_date_gain"], (1 - cfg.sits_date_gain, 1 + cfg.sits_date_gain))  # [T]
        sits = sits * gain * per_date[:, None, None, None] + offset
    sits = jnp.where(valid[:, None, None, None], sits, 0.0)  # padded / dropped dates read 0 (normalize)
    dates = jnp.where(valid, dates, 0)  # DESIGN.md: padded dates have date 0
    return aerial, sits, dates, valid, label


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _crop_resize(u, aerial, sits, label, cfg):
    """Crops a square box keeping `keep` of the side at a random position and resizes it back.

    In pixel coordinates (pixel i covers [i, i + 1]) an output aerial pixel u' samples the input at
    u = o + keep u'. Relative to the patch centre, that is the ground map x = keep x' + c with
    c = o + keep H / 2 - H / 2 the crop centre's offset. The SITS crop gets the same map in its own
    pixels (c scaled by footprint_px / H) about its own centre, which is the same ground point.
    `jax.image.scale_and_translate` wants the forward map out = in * scale + translation.
    """
    size = jnp.array(aerial.shape[:2], jnp.float32)  # [H, W]
    sits_size = jnp.array(sits.shape[1:3], jnp.float32)  # [h, w]
    keep = jnp.where(u["crop"] < cfg.crop_prob, _between(u["keep"], (cfg.crop_min_keep, 1.0)), 1.0)
    origin = u["crop_pos"] * (1.0 - keep) * size  # crop box corner, aerial px
    centre_offset = origin + (keep - 1.0) * size / 2  # crop centre - patch centre, aerial px
    sits_offset = centre_offset * cfg.footprint_px / size  # same ground offset, SITS px

    scale = jnp.full((2,), 1.0 / keep)
    aerial = jax.image.scale_and_translate(
        aerial, aerial.shape, (0, 1), scale, -origin / keep, method="linear", antialias=True)
    sits_translation = -(sits_size / 2 * (1.0 - keep) + sits_offset) / keep
    sits = jax.image.scale_and_translate(
        sits, sits.shape, (1, 2), scale, sits_translation, method="linear", antialias=True)
    # Labels: nearest neighbour, as two 1-D takes (output pixel centre u' + 0.5 -> input pixel).
    rows = _nearest_index(origin[0], keep, aerial.shape[0])
    cols = _nearest_index(origin[1], keep, aerial.shape[1])
    label = jnp.take(jnp.take(label, rows, axis=0), cols, axis=1)
    return aerial, sits, label


def _nearest_index(origin, keep, size):
    centres = origin + (jnp.arange(size, dtype=jnp.float32) + 0.5) * keep
    return jnp.clip(jnp.floor(centres).astype(jnp.int32), 0, size - 1)


def _dihedral_from(u, cfg):
    """An element of the dihedral group of the square as (transpose, flip axis 0, flip
    axis 1), applied in that order. rot90 k times == transpose if k is odd, then flips:
    k=1 (flip 0), k=2 (flip 0 and 1), k=3 (flip 1), as in numpy.rot90."""
    false = jnp.zeros((), bool)
    transpose, flip0, flip1 = false, false, false
    if cfg.rot90:
        k = jnp.minimum(jnp.floor(4 * u["rot"]), 3).astype(jnp.int32)
        transpose = (k % 2) == 1
        flip0 = (k == 1) | (k == 2)
        flip1 = (k == 2) | (k == 3)
    if cfg.flip:
        flip1 = flip1 ^ (u["hflip"] < 0.5)  # with the rotations: all 8 elements
        if not cfg.rot90:
            flip0 = flip0 ^ (u["vflip"] < 0.5)
    return transpose, flip0, flip1


def _dihedral(x, axes, d4):
    transpose, flip0, flip1 = d4
    a0, a1 = axes
    if x.shape[a0] == x.shape[a1]:
        x = jnp.where(transpose, jnp.swapaxes(x, a0, a1), x)
    x = jnp.where(flip0, jnp.flip(x, a0), x)
    return jnp.where(flip1, jnp.flip(x, a1), x)


# ---------------------------------------------------------------------------------------------
# Photometric (aerial)
# ---------------------------------------------------------------------------------------------


def _gain(z, gain, cfg):
    """A gain on radiance, in standardised units (see `dark_level_z` in default_config)."""
    return gain * z + (gain - 1.0) * cfg.dark_level_z


def _color(u, z, cfg):
    do = u["color"] < cfg.color_prob
    brightness = _between(u["brightness"], (1 - cfg.brightness, 1 + cfg.brightness))
    band = _between(u["band"], (1 - cfg.band_gain, 1 + cfg.band_gain))  # [Ca]
    contrast = _between(u["contrast"], (1 - cfg.contrast, 1 + cfg.contrast))
    gain = jnp.where(do, brightness * band, 1.0)
    contrast = jnp.where(do, contrast, 1.0)
    z = _gain(z, gain, cfg)
    # Contrast about the example's own band means (torchvision blends with the grayscale mean,
    # which has no meaning once NIR is a band).
    mean = z.mean(axis=(0, 1))
    return (z - mean) * contrast + mean


def _lighting(u, z, cfg):
    """Multiplies radiance by a smooth field: 1 + a (cos t x + sin t y), x, y in [-1, 1], times a
    soft disc shadow of gain g (a sigmoid edge), which darkens and flattens what it covers."""
    height, width = z.shape[:2]
    y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
    x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
    amp = _between(u["light_amp"], (-cfg.lighting_gradient, cfg.lighting_gradient))
    angle = 2 * math.pi * u["light_dir"]
    field = 1.0 + amp * (jnp.cos(angle) * x[None, :] + jnp.sin(angle) * y[:, None])  # [H, W]

    centre = _between(u["shadow_pos"], (-1.0, 1.0))
    radius = 2 * _between(u["shadow_radius"], cfg.shadow_radius)
    dist = jnp.sqrt((y[:, None] - centre[0]) ** 2 + (x[None, :] - centre[1]) ** 2)
    inside = jax.nn.sigmoid((radius - dist) / (2 * cfg.shadow_softness))  # [H, W] in (0, 1)
    shadow_gain = _between(u["shadow_gain"], cfg.shadow_gain)
    has_shadow = u["shadow"] < cfg.shadow_prob
    field = field * (1.0 - jnp.where(has_shadow, 1.0 - shadow_gain, 0.0) * inside)

    do = u["light"] < cfg.lighting_prob
    field = jnp.where(do, field, 1.0)[..., None]
    return _gain(z, field, cfg)


def _blur(u, z, cfg):
    """Separable Gaussian blur with a per-example sigma; the kernel is truncated at 3 sigma_max so
    its size is static. Reflect padding keeps the borders from darkening towards 0."""
    sigma_max = cfg.blur_sigma_px[1]
    radius = int(math.ceil(3 * sigma_max))
    do = u["blur"] < cfg.blur_prob
    sigma = _between(u["blur_sigma"], cfg.blur_sigma_px)
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (taps / sigma) ** 2)
    weights = weights / weights.sum()
    weights = jnp.where(do, weights, (taps == 0).astype(jnp.float32))  # identity when not blurring
    for axis in (0, 1):
        z = _conv1d(z, weights, axis, radius)
    return z


def _conv1d(z, weights, axis, radius):
    pad = [(0, 0)] * z.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(z, pad, mode="reflect")
    n = z.shape[axis]
    out = jnp.zeros_like(z)
    for i in range(2 * radius + 1):
        out = out + weights[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
    return out


def _erase(u, z, cfg):
    height, width = z.shape[:2]
    area = _between(u["erase_area"], cfg.erase_area) * height * width
    log_aspect = _between(u["erase_aspect"], (math.log(cfg.erase_aspect[0]), math.log(cfg.erase_aspect[1])))
    eh = jnp.clip(jnp.round(jnp.sqrt(area * jnp.exp(log_aspect))), 1, height)
    ew = jnp.clip(jnp.round(jnp.sqrt(area / jnp.exp(log_aspect))), 1, width)
    corner = u["erase_pos"] * (jnp.array([height, width]) - jnp.array([eh, ew]) + 1)
    y0, x0 = jnp.floor(corner[0]), jnp.floor(corner[1])
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    in_rows = (rows >= y0) & (rows < y0 + eh)
    in_cols = (cols >= x0) & (cols < x0 + ew)
    do = u["erase"] < cfg.erase_prob
    box = do & in_rows[:, None] & in_cols[None, :]
    return jnp.where(box[..., None], 0.0, z)


# ---------------------------------------------------------------------------------------------
# Time series
# ---------------------------------------------------------------------------------------------


def _date_dropout(u, valid, cfg):
    """Marks a random share of the valid dates invalid; at least one valid date always survives
    (the one with the highest draw), and padded dates stay padded."""
    valid = valid.astype(bool)
    draw = u["date"]  # [T]
    do = u["dropout"] < cfg.date_dropout_prob
    kept = valid & ~(do & (draw < cfg.date_dropout_rate))
    survivor = valid & (jnp.arange(valid.shape[0]) == jnp.argmax(jnp.where(valid, draw, -1.0)))
    return jnp.where(kept.any(), kept, survivor)


# ---------------------------------------------------------------------------------------------
# Checks (trace time)
# ---------------------------------------------------------------------------------------------


def _check_batch(batch, cfg):
    for name in ("aerial", "sits", "dates", "sits_valid"):
        if name not in batch:
            raise ValueError(f"augment: batch has no '{name}' (found keys {sorted(batch)})")
    if not jnp.issubdtype(batch["aerial"].dtype, jnp.floating):
        raise ValueError(f"augment: aerial must be normalised float (lcssl.data.normalize.normalize first), "
                         f"found dtype {batch['aerial'].dtype}")
    bands = batch["aerial"].shape[-1]
    bad = [i for i in cfg.photometric_bands if not 0 <= i < bands]
    if bad:
        raise ValueError(f"augment: photometric_bands {tuple(cfg.photometric_bands)} has indices {bad} outside "
                         f"the {bands} aerial bands")
    if not 0 < cfg.crop_min_keep <= 1:
        raise ValueError(f"augment: crop_min_keep must be in (0, 1], found {cfg.crop_min_keep}")
    _check_square(batch, cfg)


def _check_square(batch, cfg):
    if not cfg.rot90:
        return
    for name, axes in (("aerial", (1, 2)), ("sits", (2, 3)), ("label", (1, 2))):
        if name in batch:
            shape = batch[name].shape
            if shape[axes[0]] != shape[axes[1]]:
                raise ValueError(f"augment: rot90 needs square patches, '{name}' has shape {shape}; "
                                 f"set augment.rot90 = False")
