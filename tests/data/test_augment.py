"""SimCLR augmentations: shapes, determinism, band safety, cross-modal alignment, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcssl.data import augment
from lcssl.data.schema import IGNORE_LABEL

S2_GSD_M = 10.0


def _batch(b=8, size=16, sits_size=8, t=5, seed=0):
    rng = np.random.default_rng(seed)
    valid = np.ones((b, t), bool)
    valid[:, -2:] = False  # two padded dates
    valid[0, 1:] = False  # one example with a single valid date
    sits = rng.normal(size=(b, t, sits_size, sits_size, 3)).astype(np.float32) * valid[:, :, None, None, None]
    return {
        "aerial": rng.normal(size=(b, size, size, 5)).astype(np.float32),
        "sits": sits,
        "dates": (np.arange(1, t + 1)[None] * 30 * valid).astype(np.int32),
        "sits_valid": valid,
        "label": rng.integers(0, 4, size=(b, size, size)).astype(np.int32),
        "example_valid": np.ones((b,), bool),
    }


def _geometry_only(**overrides):
    cfg = augment.default_config()
    cfg.color_prob = cfg.lighting_prob = cfg.blur_prob = cfg.erase_prob = 0.0
    cfg.date_dropout_prob = cfg.sits_noise_prob = 0.0
    cfg.update(overrides)
    return cfg


def test_views_keep_shapes_dtypes_and_differ():
    batch = _batch()
    v1, v2 = augment.two_views(jax.random.key(0), batch, augment.default_config())
    for view in (v1, v2):
        assert set(view) == set(batch)
        for name, value in batch.items():
            assert view[name].shape == value.shape and view[name].dtype == value.dtype, name
        assert np.all(np.isfinite(view["aerial"])) and np.all(np.isfinite(view["sits"]))
    assert not np.allclose(v1["aerial"], v2["aerial"])
    assert not np.allclose(v1["sits"], v2["sits"])


def test_deterministic_given_key():
    batch = _batch()
    cfg = augment.default_config()
    a1, _ = augment.two_views(jax.random.key(3), batch, cfg)
    b1, _ = augment.two_views(jax.random.key(3), batch, cfg)
    c1, _ = augment.two_views(jax.random.key(4), batch, cfg)
    for name in batch:
        np.testing.assert_array_equal(a1[name], b1[name])
    assert not np.allclose(a1["aerial"], c1["aerial"])


def test_elevation_band_untouched_by_photometric_ops():
    batch = _batch()
    # Every photometric op always on; geometry and erasing (an occlusion of all bands) off.
    cfg = _geometry_only(crop_prob=0.0, flip=False, rot90=False, color_prob=1.0, lighting_prob=1.0,
                         shadow_prob=1.0, blur_prob=1.0)
    v1, v2 = augment.two_views(jax.random.key(1), batch, cfg)
    for view in (v1, v2):
        np.testing.assert_array_equal(view["aerial"][..., 4], batch["aerial"][..., 4])
        assert not np.allclose(view["aerial"][..., :4], batch["aerial"][..., :4])


def test_photometric_changes_are_not_clipped():
    batch = _batch()
    batch["aerial"] = batch["aerial"] * 3.0  # standardised data well outside [0, 1]
    cfg = _geometry_only(crop_prob=0.0, flip=False, rot90=False, color_prob=1.0)
    v1, _ = augment.two_views(jax.random.key(2), batch, cfg)
    assert float(v1["aerial"].min()) < -3.0 and float(v1["aerial"].max()) > 3.0


def test_brightness_is_a_gain_on_radiance():
    # With dark_level_z = d (zero radiance sits d standard deviations below the mean), brightness
    # multiplies radiance: (z' + d) / (z + d) is the same for every pixel and band of an example.
    batch = _batch()
    d = 2.5
    cfg = _geometry_only(crop_prob=0.0, flip=False, rot90=False, color_prob=1.0, contrast=0.0,
                         band_gain=0.0, dark_level_z=d)
    v1, _ = augment.two_views(jax.random.key(4), batch, cfg)
    radiance_in = batch["aerial"][..., :4] + d
    radiance_out = np.asarray(v1["aerial"][..., :4]) + d
    gain = np.median(radiance_out / radiance_in, axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(radiance_out, gain * radiance_in, atol=1e-4)
    assert np.ptp(gain) > 0.05  # the gain differs between examples


def _gaussian(coords_m, centre_m, sigma_m):
    y, x = coords_m
    return np.exp(-((y - centre_m[0]) ** 2 + (x - centre_m[1]) ** 2) / (2 * sigma_m ** 2))


def _centroid_m(image, pixel_m):
    """Weighted centroid of a [n, n] image, metres from the image centre."""
    n = image.shape[0]
    coords = (np.arange(n) + 0.5 - n / 2) * pixel_m
    w = np.clip(image, 0, None)
    total = w.sum()
    cy = (w.sum(1) * coords).sum() / total
    cx = (w.sum(0) * coords).sum() / total
    return np.array([cy, cx])


# Aerial 64 px covering 24 S2 px (240 m, 3.75 m / px) centred in a 40 x 40 S2 crop (400 m). A
# Gaussian marker (sigma 10 m) at (+20 m, -30 m) from the patch centre is drawn in both.
MARKER_SIZE, MARKER_SITS_SIZE, MARKER_FOOTPRINT_PX = 64, 40, 24.0
MARKER_AERIAL_M = MARKER_FOOTPRINT_PX * S2_GSD_M / MARKER_SIZE
MARKER_M, MARKER_SIGMA_M = (20.0, -30.0), 10.0


def _marker_batch(b=16, t=2):
    a_coords = (np.arange(MARKER_SIZE) + 0.5 - MARKER_SIZE / 2) * MARKER_AERIAL_M
    s_coords = (np.arange(MARKER_SITS_SIZE) + 0.5 - MARKER_SITS_SIZE / 2) * S2_GSD_M
    a_img = _gaussian(np.meshgrid(a_coords, a_coords, indexing="ij"), MARKER_M, MARKER_SIGMA_M)
    s_img = _gaussian(np.meshgrid(s_coords, s_coords, indexing="ij"), MARKER_M, MARKER_SIGMA_M)
    return {
        "aerial": np.broadcast_to(a_img[None, :, :, None], (b, MARKER_SIZE, MARKER_SIZE, 4)).astype(np.float32),
        "sits": np.broadcast_to(s_img[None, None, :, :, None],
                                (b, t, MARKER_SITS_SIZE, MARKER_SITS_SIZE, 2)).astype(np.float32),
        "dates": np.ones((b, t), np.int32),
        "sits_valid": np.ones((b, t), bool),
        "label": (a_img[None] > 0.5).repeat(b, 0).astype(np.int32),
    }


def _marker_centroids(view):
    """[(aerial centroid, SITS centroid)] per example, metres of the view grid from its centre.

    In the view both modalities share the zoom 1 / keep, so measuring both on the view grid
    (aerial px = MARKER_AERIAL_M, S2 px = 10 m) compares like with like. The marker is 36 m
    off-centre: a zoom mismatch (up to 1 / 0.8) would move one centroid by up to 9 m, so the
    centroids check scale as well as position, flips and rotations.
    """
    return [(_centroid_m(np.asarray(view["aerial"][i, :, :, 0]), MARKER_AERIAL_M),
             _centroid_m(np.asarray(view["sits"][i, 1, :, :, 1]), S2_GSD_M))
            for i in range(view["aerial"].shape[0])]


ALIGN_TOL_M = 1.0  # = 0.1 S2 pixel = 0.27 aerial pixel


def test_geometry_keeps_aerial_and_sits_aligned():
    # Random crop-resize, flips and rot90: the marker must sit at the same place in both views.
    cfg = _geometry_only(footprint_px=MARKER_FOOTPRINT_PX)
    v1, v2 = augment.two_views(jax.random.key(7), _marker_batch(), cfg)
    moved = 0
    for view in (v1, v2):
        for i, (a_c, s_c) in enumerate(_marker_centroids(view)):
            np.testing.assert_allclose(a_c, s_c, atol=ALIGN_TOL_M, err_msg=f"example {i}")
            moved += not np.allclose(a_c, MARKER_M, atol=ALIGN_TOL_M)
    assert moved > 16  # the geometry really changed the views


def test_alignment_check_catches_a_wrong_footprint():
    # The check above has teeth: telling the augmentation a wrong footprint (36 instead of 24 S2 px)
    # converts the crop into the wrong SITS zoom and translation, and the markers drift apart.
    cfg = _geometry_only(footprint_px=1.5 * MARKER_FOOTPRINT_PX)
    v1, _ = augment.two_views(jax.random.key(7), _marker_batch(), cfg)
    worst = max(np.abs(a_c - s_c).max() for a_c, s_c in _marker_centroids(v1))
    assert worst > ALIGN_TOL_M


def test_simclr_label_follows_crop_and_flips():
    # The aerial band 0 carries the label's value; the label is resampled by nearest neighbour, the
    # aerial linearly. With zoom <= 1.25 the linear support of an output pixel lies inside the
    # input pixels that its 5 x 5 output neighbourhood takes by nearest neighbour, so wherever the
    # label is uniform over that neighbourhood the aerial value must equal it exactly.
    rng = np.random.default_rng(5)
    b, size = 8, 32
    classes = rng.integers(0, 3, size=(b, size // 8, size // 8)).repeat(8, 1).repeat(8, 2)
    classes[:, :8, :8] = IGNORE_LABEL
    aerial = np.where(classes == IGNORE_LABEL, -5.0, classes).astype(np.float32)
    batch = {"aerial": np.repeat(aerial[..., None], 4, -1), "sits": np.zeros((b, 2, 8, 8, 2), np.float32),
             "dates": np.ones((b, 2), np.int32), "sits_valid": np.ones((b, 2), bool),
             "label": classes.astype(np.int32)}
    v1, _ = augment.two_views(jax.random.key(0), batch, _geometry_only())
    label = np.asarray(v1["label"])
    value = np.asarray(v1["aerial"][..., 0])
    windows = np.lib.stride_tricks.sliding_window_view(label, (5, 5), axis=(1, 2))
    uniform = windows.min(axis=(-1, -2)) == windows.max(axis=(-1, -2))  # [b, size - 4, size - 4]
    inner_label, inner_value = label[:, 2:-2, 2:-2], value[:, 2:-2, 2:-2]
    expected = np.where(inner_label == IGNORE_LABEL, -5.0, inner_label)
    assert uniform.mean() > 0.4  # enough pixels for the check to mean something
    np.testing.assert_allclose(inner_value[uniform], expected[uniform], atol=1e-5)
    assert set(np.unique(label)) <= {0, 1, 2, IGNORE_LABEL}
    assert not np.array_equal(label, batch["label"])


def test_supervised_augment_keeps_label_aligned_and_exact():
    batch = _batch()
    # Encode each pixel's label into aerial band 0.
    batch["aerial"][..., 0] = batch["label"]
    out = augment.supervised_augment(jax.random.key(0), batch, augment.default_config())
    np.testing.assert_array_equal(out["aerial"][..., 0], out["label"])
    assert out["label"].dtype == jnp.int32
    # Exact permutations: the multiset of values per example is unchanged, and something moved.
    for i in range(8):
        np.testing.assert_array_equal(np.sort(out["aerial"][i].ravel()), np.sort(batch["aerial"][i].ravel()))
    assert not np.array_equal(out["label"], batch["label"])
    np.testing.assert_array_equal(out["sits_valid"], batch["sits_valid"])


def test_date_dropout_keeps_one_date_and_padding():
    batch = _batch()
    cfg = _geometry_only(date_dropout_prob=1.0, date_dropout_rate=0.9)
    v1, v2 = augment.two_views(jax.random.key(11), batch, cfg)
    for view in (v1, v2):
        valid = np.asarray(view["sits_valid"])
        assert np.all(valid.sum(1) >= 1)
        assert not np.any(valid & ~batch["sits_valid"])  # padded dates stay padded
        assert valid.sum() < batch["sits_valid"].sum()  # dropout happened
        assert np.all(np.asarray(view["dates"])[~valid] == 0)
        assert np.all(np.asarray(view["sits"])[~valid] == 0)


def test_jit_on_batch_sharded_over_8_devices_matches_unsharded():
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
    batch = _batch()
    cfg = augment.default_config()
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    views = jax.jit(lambda k, b: augment.two_views(k, b, cfg))(jax.random.key(2), sharded)
    assert views[0]["aerial"].sharding.spec[0] == "data"
    reference = augment.two_views(jax.random.key(2), batch, cfg)
    for got, want in zip(views, reference):
        for name in batch:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_bad_photometric_band_is_reported():
    cfg = augment.default_config()
    cfg.photometric_bands = (0, 1, 7)
    with pytest.raises(ValueError, match="outside the 5 aerial bands"):
        augment.two_views(jax.random.key(0), _batch(), cfg)


def test_supervised_augment_keeps_sits_aligned():
    out = augment.supervised_augment(jax.random.key(3), _marker_batch(), augment.default_config())
    orientations = set()
    for i, (a_c, s_c) in enumerate(_marker_centroids(out)):
        np.testing.assert_allclose(a_c, s_c, atol=ALIGN_TOL_M, err_msg=f"example {i}")
        orientations.add(tuple(np.round(a_c).astype(int)))
    assert len(orientations) >= 4  # several of the 8 flips / rotations drawn
    labelled = np.asarray(out["label"]) == 1
    assert np.all(np.asarray(out["aerial"][..., 0])[labelled] > 0.5)


# --- Known answers of the photometric and occlusion ops, one op at a time ------------------------

def _cfg(**fields):
    cfg = augment.default_config()
    for name, value in fields.items():
        cfg[name] = value
    return cfg


def test_blur_is_the_normalised_gaussian_and_keeps_flat_areas_flat():
    cfg = _cfg(blur_prob=0.5, blur_sigma_px=(1.0, 1.0))  # sigma exactly 1 px, radius 3
    impulse = np.zeros((15, 15, 1), np.float32)
    impulse[7, 7] = 1.0
    taps = np.arange(-3, 4)
    g = np.exp(-0.5 * taps ** 2)
    g /= g.sum()
    expected = np.zeros((15, 15))
    expected[4:11, 4:11] = np.outer(g, g)
    blurred = augment._blur({"blur": jnp.float32(0.2), "blur_sigma": jnp.float32(0.5)},
                            jnp.asarray(impulse), cfg)
    np.testing.assert_allclose(blurred[..., 0], expected, atol=1e-7)
    flat = jnp.full((15, 15, 2), 3.0)  # reflect padding: borders do not darken
    # float32: two passes of 7-term weighted sums, each a few ulps (1.2e-7) off.
    np.testing.assert_allclose(augment._blur({"blur": 0.2, "blur_sigma": 0.5}, flat, cfg), flat,
                               rtol=1e-5)
    kept = augment._blur({"blur": jnp.float32(0.7), "blur_sigma": jnp.float32(0.5)},
                         jnp.asarray(impulse), cfg)  # draw above blur_prob: identity
    np.testing.assert_array_equal(kept, impulse)


@pytest.mark.parametrize("pos, rows", [((0.0, 0.0), slice(0, 4)), ((0.999, 0.999), slice(4, 8))])
def test_random_erasing_zeroes_the_drawn_rectangle_in_every_band(pos, rows):
    # Area 25% of 8 x 8 at aspect 1: a 4 x 4 box; its corner spans the 5 positions 0..4.
    cfg = _cfg(erase_prob=0.5, erase_area=(0.25, 0.25), erase_aspect=(1.0, 1.0))
    z = jnp.ones((8, 8, 5))
    u = {"erase": jnp.float32(0.1), "erase_area": jnp.float32(0.3),
         "erase_aspect": jnp.float32(0.6), "erase_pos": jnp.asarray(pos, jnp.float32)}
    expected = np.ones((8, 8, 5), np.float32)
    expected[rows, rows] = 0.0
    np.testing.assert_array_equal(augment._erase(u, z, cfg), expected)
    np.testing.assert_array_equal(augment._erase(dict(u, erase=jnp.float32(0.9)), z, cfg), z)


def test_lighting_gradient_and_shadow_are_the_documented_gains():
    cfg = _cfg(lighting_prob=0.5, lighting_gradient=0.3, shadow_prob=0.5, shadow_gain=(0.5, 0.5),
               shadow_radius=(0.25, 0.25), shadow_softness=0.05, dark_level_z=0.0)
    h = w = 8
    x = (np.arange(w) + 0.5) / w * 2 - 1
    y = (np.arange(h) + 0.5) / h * 2 - 1
    u = {"light": jnp.float32(0.1), "light_amp": jnp.float32(1.0), "light_dir": jnp.float32(0.0),
         "shadow": jnp.float32(0.9), "shadow_pos": jnp.full(2, 0.5), "shadow_radius": jnp.float32(0.0),
         "shadow_gain": jnp.float32(0.0)}
    z = jnp.full((h, w, 1), 2.0)
    # Direction 0, amplitude +0.3: gain 1 + 0.3 x along the columns, alike on every row.
    np.testing.assert_allclose(augment._lighting(u, z, cfg)[..., 0],
                               2.0 * np.broadcast_to(1 + 0.3 * x, (h, w)), rtol=1e-6)
    # No gradient (amplitude 0 at u = 0.5), a centred disc of radius 0.5 at gain 0.5.
    shadowed = augment._lighting(dict(u, light_amp=jnp.float32(0.5), shadow=jnp.float32(0.1)), z, cfg)
    dist = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    inside = 1 / (1 + np.exp(-(0.5 - dist) / 0.1))
    np.testing.assert_allclose(shadowed[..., 0], 2.0 * (1 - 0.5 * inside), rtol=1e-5)
    # With dark_level_z = d, a gain g maps z to g z + (g - 1) d: zero radiance stays zero.
    dark = augment._lighting(u, jnp.full((h, w, 1), -1.5), _cfg(**{**cfg.to_dict(), "dark_level_z": 1.5}))
    np.testing.assert_allclose(dark, -1.5, rtol=1e-6)
    off = augment._lighting(dict(u, light=jnp.float32(0.9)), z, cfg)
    np.testing.assert_array_equal(off, z)


def test_elevation_is_never_photometrically_changed_but_is_erased():
    batch = _batch()
    cfg = _cfg(crop_prob=0.0, flip=False, rot90=False, color_prob=1.0, lighting_prob=1.0,
               blur_prob=1.0, erase_prob=1.0, erase_area=(0.25, 0.25), date_dropout_prob=0.0,
               sits_noise_prob=0.0)
    view, _ = augment.two_views(jax.random.key(3), batch, cfg)
    elevation, out = batch["aerial"][..., 4], np.asarray(view["aerial"][..., 4])
    erased = out == 0.0
    assert erased.any(axis=(1, 2)).all()  # every example lost a rectangle of elevation
    np.testing.assert_array_equal(out[~erased], elevation[~erased])
    assert not np.allclose(view["aerial"][..., :4], batch["aerial"][..., :4])


def test_sentinel2_radiometry_per_view_is_a_gain_per_band_and_date_plus_an_offset():
    """sits' = sits x gain[band] x gain[date] + offset[band] on valid dates, within the configured
    bounds; off by default, and turning it on leaves every other draw as it was."""
    batch = _batch()
    batch["sits_valid"] = np.ones_like(batch["sits_valid"])
    batch["sits"] = np.abs(batch["sits"]) + 1.0  # no zero, so each ratio is defined
    plain = _geometry_only(crop_prob=0.0, flip=False, rot90=False)
    on = _geometry_only(crop_prob=0.0, flip=False, rot90=False, sits_view_gain=0.2, sits_view_offset=0.0,
                        sits_date_gain=0.1)
    (p1, _), (v1, v2) = augment.two_views(jax.random.key(5), batch, plain), \
        augment.two_views(jax.random.key(5), batch, on)
    np.testing.assert_array_equal(p1["sits"], batch["sits"])
    np.testing.assert_array_equal(v1["aerial"], p1["aerial"])  # the other draws are unchanged
    ratio = np.asarray(v1["sits"]) / batch["sits"]  # [B, T, h, w, C]: gain[c] x gain[t]
    assert np.allclose(ratio, ratio[:, :, :1, :1, :], rtol=1e-6)  # one factor per example, date, band
    r = ratio[:, :, 0, 0, :]
    assert np.allclose(r / r[:, :1, :], (r / r[:, :1, :])[:, :, :1], rtol=1e-5)  # separable: date x band
    assert np.all((r > 0.8 * 0.9 - 1e-6) & (r < 1.2 * 1.1 + 1e-6)) and r.std() > 0.01
    assert not np.allclose(v1["sits"], v2["sits"])  # each view its own radiometry
    offset = _geometry_only(crop_prob=0.0, flip=False, rot90=False, sits_view_offset=0.3)
    o1, _ = augment.two_views(jax.random.key(5), batch, offset)
    shift = np.asarray(o1["sits"]) - batch["sits"]
    assert np.allclose(shift, shift[:, :1, :1, :1, :], atol=1e-6) and np.all(np.abs(shift) <= 0.3 + 1e-6)
